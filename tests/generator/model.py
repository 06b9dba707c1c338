"""The scenario model: a typed QEMU VM with vfio devices, rendered to a QEMU argv.

A `Scenario` lists its `-device`s in command-line order, each in one option syntax QEMU
accepts (key=val, `driver=` key=val, JSON, QEMU's relaxed JSON with single quotes, or a
`[device]` section of one `-readconfig` file). QEMU realizes key=val and -readconfig
devices first, in command-line order, and JSON ones after them: `realize_order()`
models that. Hot-plug and hot-unplug steps run after start-up through the test's own
monitor (unplug completed through `-qtest`, playing the guest).

Everything that depends on the machine running it (paths, the QEMU binary, a free TCP
port) comes from a `RenderContext`, so a scenario serialises to JSON and replays.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

Value = str | int | bool
#: kv: `vfio-pci,k=v`; kvd: `driver=vfio-pci,k=v`; kvl: `k=v,...,driver=vfio-pci`
Syntax = Literal["kv", "kvd", "kvl", "json", "relaxed", "readconfig"]
CfgStyle = Literal["plain", "tabs", "tight", "wide"]
Machine = Literal["q35", "pc", "virt"]  # virt: aarch64
Monitor = Literal["qmp-unix", "qmp-tcp", "chardev-unix", "qmp-pretty"]
#: wrapper: a shell script that execs QEMU; wrapper-fork: one that runs it as a child
Launcher = Literal["direct", "kvm-link", "wrapper", "wrapper-fork"]
Shape = Literal["hand", "proxmox", "libvirt"]

RAM_MIB = 64
RAM = RAM_MIB << 20
VIOMMU_DRIVERS = ("intel-iommu", "virtio-iommu-pci", "amd-iommu", "arm-smmuv3")
ViommuModel = Literal["intel", "virtio", "amd", "smmu", "none"]
#: QEMU's refusal of a vfio device realized after an amd-iommu that cannot notify it
#: (7.2 always, 10.0 with pt=off): hw/vfio's "requires iommu notifier ..." error
NOTIFIER_REFUSAL = "requires iommu notifier which is not currently supported"
#: the same for a vfio device realized after a `-device arm-smmuv3` (10.2+, aarch64)
MAP_NOTIFIER_REFUSAL = "requires iommu MAP notifier which is not currently supported"


class AmdMode(Enum):
    """What one QEMU build does with a vfio device realized after its amd-iommu
    (measured in tests/integration/test_vfio_ground_truth_amd_arm.py)."""

    REFUSES = "refuses"  # 7.2: QEMU exits (NOTIFIER_REFUSAL); only the wrong order runs
    PASSTHROUGH = "passthrough"  # 10.0 (pt=on): runs, every device keeps all guest RAM
    REMAP = "remap"  # 10.1+: dma-remap=on translates once the AMD-Vi guest programs it


VFIO_DRIVERS = ("vfio-pci", "vfio-pci-nohotplug")  # the latter: a subtype, not hot-pluggable
BRIDGE_DRIVERS = (
    "pcie-root-port",
    "pcie-pci-bridge",
    "pci-bridge",
    "i82801b11-bridge",
    "pxb",
    "pxb-pcie",
)


def main_bus(machine: Machine) -> str:
    return "pci.0" if machine == "pc" else "pcie.0"


@dataclass(frozen=True)
class Device:
    """One `-device`: driver, id (None: anonymous), properties in option order, syntax."""

    driver: str
    id: str | None = None
    props: tuple[tuple[str, Value], ...] = ()
    syntax: Syntax = "kv"
    group: int | None = None  # vfio-pci: its own IOMMU group (and sysfs directory)
    long_option: bool = False  # spelled `--device` (QEMU accepts both)

    def prop(self, key: str) -> Value | None:
        return next((v for k, v in self.props if k == key), None)

    @property
    def bus(self) -> str | None:
        v = self.prop("bus")
        return v if isinstance(v, str) else None

    @property
    def vfio(self) -> bool:
        return self.driver in VFIO_DRIVERS

    @property
    def viommu(self) -> bool:
        return self.driver in VIOMMU_DRIVERS

    @property
    def json_form(self) -> bool:
        return self.syntax in ("json", "relaxed")


@dataclass(frozen=True)
class HotOp:
    """A step after start-up: device_add of a vfio-pci, or device_del + guest completion.

    `del` names the device by its IOMMU group: the runner finds it (named or anonymous)
    through QEMU, as a user's script would by its host device.
    """

    action: Literal["add", "del"]
    group: int
    id: str | None = None  # add: the new device's id (None: anonymous)
    bus: str | None = None  # add: the root port's id


@dataclass(frozen=True)
class Scenario:
    machine: Machine
    devices: tuple[Device, ...]  # command-line order
    monitor: Monitor = "qmp-unix"
    launcher: Launcher = "direct"
    shape: Shape = "hand"
    bus_bypass: bool = False  # -machine default-bus-bypass-iommu=on
    machine_last: bool = False  # `-machine type=...` after the devices (Proxmox)
    hotplug: tuple[HotOp, ...] = ()
    name: str = ""  # corpus cases: the regression class
    cfg_name: str = "vm.cfg"
    monitor_name: str = "vm.qmp"
    machine_alias: str = ""  # a versioned type, e.g. pc-q35-7.2 (libvirt writes those)
    machine_flag: str = "-machine"  # or -M
    implied_type: bool = False  # `-machine q35,...` rather than `type=q35,...`
    nodefaults: bool = True  # without: QEMU adds its default VGA and NIC (anonymous)
    cfg_style: CfgStyle = "plain"  # whitespace in -readconfig files (QEMU's sscanf)
    #: other options as managers write them (before the devices); "{work}" is the run's
    #: directory
    extra: tuple[str, ...] = ()
    cfg_relative: bool = False  # -readconfig NAME, relative to QEMU's working directory
    cfg_deleted: bool = False  # the -readconfig files are gone by inspection time

    # ------------------------------------------------------------ derived facts

    @property
    def viommu(self) -> Device | None:
        return next((d for d in self.devices if d.viommu), None)

    @property
    def viommu_model(self) -> ViommuModel:
        v = self.viommu
        if v is None:
            return "none"
        models = {"intel-iommu": "intel", "amd-iommu": "amd", "arm-smmuv3": "smmu"}
        return models.get(v.driver, "virtio")  # type: ignore[return-value]

    @property
    def guest(self) -> bool:
        """Run a guest that turns translation on (the VT-d guest for intel, the AMD-Vi
        guest for amd) instead of staying paused under -S."""
        return self.viommu_model in ("intel", "amd")

    @property
    def amd_remap(self) -> bool:
        """amd-iommu with dma-remap=on: vfio devices follow the guest's translation."""
        v = self.viommu
        return v is not None and v.driver == "amd-iommu" and v.prop("dma-remap") is True

    def amd_passthrough(self, mode: AmdMode | None) -> bool:
        """Every device behind this VM's amd-iommu stays in pass-through on this build:
        the DMA log maps all guest RAM whatever the order (QG003's case)."""
        return self.viommu_model == "amd" and not self.amd_remap and mode is not AmdMode.REFUSES

    @property
    def unplugs(self) -> bool:
        return any(op.action == "del" for op in self.hotplug)

    def realize_order(self) -> list[Device]:
        """key=val and -readconfig devices in command-line order, then JSON ones."""
        return [d for d in self.devices if not d.json_form] + [
            d for d in self.devices if d.json_form
        ]

    def cfg_runs(self) -> list[list[Device]]:
        """-readconfig files: each run of readconfig devices among the key=val ones (JSON
        options do not interrupt a run: they realize after all of them anyway)."""
        runs: list[list[Device]] = []
        previous_rc = False
        for d in self.devices:
            if d.json_form:
                continue
            if d.syntax == "readconfig":
                if not previous_rc:
                    runs.append([])
                runs[-1].append(d)
            previous_rc = d.syntax == "readconfig"
        return runs

    def cfg_file(self, n: int) -> str:
        return self.cfg_name if n == 0 else self.cfg_name.replace(".cfg", f"-{n + 1}.cfg")

    def vfio_groups(self) -> list[int]:
        groups = [d.group for d in self.devices if d.vfio and d.group is not None]
        groups += [op.group for op in self.hotplug if op.action == "add"]
        return sorted(set(groups))

    def placement(self) -> str:
        """Where the vIOMMU is realized relative to the cold-plugged vfio devices."""
        order = self.realize_order()
        v = next((i for i, d in enumerate(order) if d.viommu), None)
        if v is None:
            return "none"
        vf = [i for i, d in enumerate(order) if d.vfio]
        if not vf or all(i > v for i in vf):
            return "before"
        if all(i < v for i in vf):
            return "after"
        return "between"

    def with_viommu_first(self) -> Scenario:
        """The reference scenario: the same VM with the vIOMMU realized before everything."""
        v = self.viommu
        if v is None:
            return self
        syntax: Syntax = v.syntax if v.syntax in ("kvd", "kvl") else "kv"
        first = replace(v, syntax=syntax)
        rest = tuple(d for d in self.devices if d is not v)
        return replace(self, devices=(first, *rest), name=f"{self.name} (reference)".strip())

    def with_dma_remap(self) -> Scenario:
        """The same VM with its amd-iommu translating (dma-remap=on, 10.1+): the twin whose
        DMA log tells the order a pass-through amd-iommu hides."""
        v = self.viommu
        assert v is not None and v.driver == "amd-iommu", "an amd-iommu scenario"
        twin = replace(v, props=(*v.props, ("dma-remap", True)))
        devices = tuple(twin if d is v else d for d in self.devices)
        return replace(self, devices=devices, name=f"{self.name} (dma-remap twin)".strip())

    def classes(self) -> list[str]:
        """Tags for the per-class table: one scenario counts in each of its classes."""
        tags = [
            f"machine={self.machine}",
            f"viommu={self.viommu_model}",
            f"placement={self.placement()}",
            f"shape={self.shape}",
            f"monitor={self.monitor}",
            f"launcher={self.launcher}",
        ]
        syntaxes = sorted({d.syntax for d in self.devices})
        tags += [f"syntax={s}" for s in syntaxes]
        drivers = sorted({d.driver for d in self.devices if d.driver in BRIDGE_DRIVERS})
        tags += [f"bridge={b}" for b in drivers]
        if any(d.prop("bypass_iommu") for d in self.devices) or self.bus_bypass:
            tags.append("bypass")
        if any(d.prop("multifunction") for d in self.devices):
            tags.append("multifunction")
        if any(d.vfio and d.id is None for d in self.devices):
            tags.append("anonymous-vfio")
        if any(d.driver == "vfio-pci-nohotplug" for d in self.devices):
            tags.append("vfio-pci-nohotplug")
        if len(self.cfg_runs()) > 1:
            tags.append("readconfig-x2")
        if any(d.driver == "pxb" and d.id for d in self.devices):
            tags.append("named-pxb")
        if any(d.id is not None and not _kv_safe_id(d.id) for d in self.devices):
            tags.append("unusual-id")
        if any(op.action == "add" for op in self.hotplug):
            tags.append("hotplug")
        if self.unplugs:
            tags.append("unplug")
        if not self.nodefaults:
            tags.append("defaults")
        if self.cfg_style != "plain" and self.cfg_runs():
            tags.append("readconfig-whitespace")
        if "-drive" in self.extra:
            tags.append("implicit-device")
        if self.extra:
            tags.append("extra-options")
        if self.cfg_runs() and self.cfg_relative:
            tags.append("readconfig-relative")
        if self.cfg_runs() and self.cfg_deleted:
            tags.append("readconfig-deleted")
        dels = {op.id for op in self.hotplug if op.action == "del"}
        if any(op.action == "add" and op.id is not None for op in self.hotplug) and dels:
            tags.append("replug")
        return tags

    # ------------------------------------------------------------ serialisation

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Scenario:
        devices = tuple(
            Device(**{**d, "props": tuple((k, v) for k, v in d["props"])}) for d in data["devices"]
        )
        hotplug = tuple(HotOp(**op) for op in data.get("hotplug", ()))
        extra = tuple(data.get("extra", ()))
        return Scenario(**{**data, "devices": devices, "hotplug": hotplug, "extra": extra})


def _kv_safe_id(text: str) -> bool:
    """QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'."""
    return (
        bool(text)
        and text[0].isascii()
        and text[0].isalpha()
        and all(c.isascii() and (c.isalnum() or c in "-._") for c in text)
    )


# ------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class QemuBinary:
    """How to start one QEMU build: its path, and for a packaged-off-tree build the real
    ELF with the arguments and environment its own wrapper script would add."""

    path: str  # as the test matrix names it (a binary or a wrapper script)
    elf: str  # the real executable
    elf_args: tuple[str, ...] = ()
    elf_env: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def resolve(path: str) -> QemuBinary:
        import shutil

        found = shutil.which(path) or path
        p = Path(found).resolve()
        with open(p, "rb") as fh:
            script = fh.read(2) == b"#!"
        if script:  # deploy/fetch-qemu-*.sh layouts: DIR[/root]/usr/{bin,share,lib}
            text = p.read_text(errors="replace")
            for root in (p.parent, p.parent / "root"):
                elf = root / "usr" / "bin" / "qemu-system-x86_64"
                if not elf.exists():
                    continue
                args = ["-L", str(root / "usr" / "share" / "qemu")]
                if "seabios" in text:
                    args += ["-L", str(root / "usr" / "share" / "seabios")]
                modules = root / "usr" / "lib" / "x86_64-linux-gnu" / "qemu"
                return QemuBinary(
                    found, str(elf), tuple(args), (("QEMU_MODULE_DIR", str(modules)),)
                )
        return QemuBinary(found, str(p))


@dataclass
class RenderContext:
    """Where one run lives: its directory, the QEMU build, the guest kernel, a TCP port."""

    workdir: Path
    qemu: QemuBinary
    guest_kernel: Path
    tcp_port: int = 0
    amd_guest_kernel: Path | None = None  # the AMD-Vi guest (amd-iommu scenarios)

    @property
    def sysfs_root(self) -> Path:
        return self.workdir / "sys"

    def sysfs_dir(self, group: int) -> Path:
        return self.sysfs_root / f"0000:{group:02x}:00.0"

    @property
    def console(self) -> Path:
        return self.workdir / "debugcon.txt"

    @property
    def dma_log(self) -> Path:
        return self.workdir / "dma.log"

    @property
    def trace(self) -> Path:
        return self.workdir / "qmp-trace.log"

    @property
    def setup_socket(self) -> Path:
        return self.workdir / "setup.qmp"

    @property
    def qtest_socket(self) -> Path:
        return self.workdir / "qtest.sock"

    @property
    def stderr(self) -> Path:
        return self.workdir / "stderr.txt"


@dataclass
class Rendered:
    """A scenario made concrete: the argv, extra environment, files to write, the target."""

    argv: list[str]
    env: dict[str, str]
    files: dict[Path, str] = field(default_factory=dict)
    links: dict[Path, str] = field(default_factory=dict)
    target: str = ""
    harness_args: list[str] = field(default_factory=list)  # appended: setup monitor, trace
    cwd: Path | None = None  # QEMU's working directory (relative -readconfig paths)


def _kv_value(v: Value) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v).replace(",", ",,")


def _relaxed(v: Value) -> str:
    """QEMU's JSON parser also takes single-quoted strings (with \\' escapes)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    out = []
    for c in v:
        if c in "\\'":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "'" + "".join(out) + "'"


def device_props(dev: Device, ctx: RenderContext) -> list[tuple[str, Value]]:
    """All properties in option order (vfio: sysfsdev and rombar first; then the id)."""
    props: list[tuple[str, Value]] = []
    if dev.vfio:
        assert dev.group is not None
        props += [("sysfsdev", str(ctx.sysfs_dir(dev.group))), ("rombar", 0)]
    if dev.id is not None:
        props.append(("id", dev.id))
    return props + list(dev.props)


def render_device(dev: Device, ctx: RenderContext) -> str:
    """The `-device` argument (not for readconfig devices)."""
    props = device_props(dev, ctx)
    if dev.syntax == "json":
        return json.dumps({"driver": dev.driver, **dict(props)})
    if dev.syntax == "relaxed":
        items = [("driver", dev.driver), *props]
        return "{" + ",".join(f"{_relaxed(k)}:{_relaxed(v)}" for k, v in items) + "}"
    pairs = [f"{k}={_kv_value(v)}" for k, v in props]
    if dev.syntax == "kvl":
        return ",".join([*pairs, f"driver={dev.driver}"])
    head = f"driver={dev.driver}" if dev.syntax == "kvd" else dev.driver
    return ",".join([head, *pairs])


_CFG_LAYOUT: dict[str, tuple[str, str]] = {  # style -> (section gap, entry format)
    "plain": (" ", '  {k} = "{v}"'),
    "tabs": (" ", '\t{k}\t=\t"{v}"'),
    "tight": (" ", '{k} ="{v}"'),
    "wide": ("    ", '    {k}    =    "{v}"'),
}


def render_readconfig(devs: list[Device], ctx: RenderContext, style: str = "plain") -> str:
    """QEMU's config file; QEMU reads it with sscanf, so any whitespace around `=` and in
    the section header is fine (tabs, none before the value, several spaces)."""
    gap, entry = _CFG_LAYOUT[style]
    out = ["# qemu config file (written by tests/generator)", ""]
    for dev in devs:
        out.append(f'[device{gap}"{dev.id}"]' if dev.id is not None else "[device]")
        out.append(entry.format(k="driver", v=dev.driver))
        for k, v in device_props(dev, ctx):
            if k == "id":
                continue
            value = ("on" if v else "off") if isinstance(v, bool) else str(v)
            out.append(entry.format(k=k, v=value))
        out.append("")
    return "\n".join(out)


def machine_option(s: Scenario) -> str:
    name = s.machine_alias or s.machine
    opts = [name if s.implied_type else f"type={name}"]
    if s.viommu_model == "intel":
        opts.append("kernel-irqchip=split")
    if s.bus_bypass:
        opts.append("default-bus-bypass-iommu=on")
    return ",".join(opts)


def _amd_guest_beside(vtd_guest: Path) -> Path:
    """The AMD-Vi guest from the VT-d guest's build cache (built there if missing), for
    contexts made without it (tests/generator/preflight_runs.py)."""
    from qmpguard.demo.fakevfio import build_amd_guest

    return build_amd_guest(vtd_guest.parent)


def render(s: Scenario, ctx: RenderContext) -> Rendered:
    """The complete argv (binary first) for `s` in `ctx`, with the files it needs."""
    env: dict[str, str] = {}
    links: dict[Path, str] = {}
    files: dict[Path, str] = {}
    prefix: list[str] = []
    bindir = ctx.workdir / "bin"
    if s.launcher == "direct":
        argv0 = ctx.qemu.path
    elif s.launcher == "kvm-link":  # Proxmox VE: /usr/bin/kvm -> qemu-system-x86_64
        argv0 = str(bindir / "kvm")
        links[bindir / "kvm"] = ctx.qemu.elf
        prefix = list(ctx.qemu.elf_args)
        env.update(dict(ctx.qemu.elf_env))
    elif s.launcher == "wrapper":
        argv0 = str(bindir / "qemu-wrapper")
        files[bindir / "qemu-wrapper"] = f'#!/bin/sh\nexec "{ctx.qemu.path}" "$@"\n'
    else:  # the shell stays QEMU's parent (and in its process group)
        argv0 = str(bindir / "qemu-wrapper")
        files[bindir / "qemu-wrapper"] = f'#!/bin/sh\n"{ctx.qemu.path}" "$@"\nexit $?\n'
    argv = [argv0, *prefix]

    monitor_path = ctx.workdir / s.monitor_name
    if s.shape == "proxmox":
        argv += ["-name", "vm100,debug-threads=on", "-no-shutdown"]
    if s.monitor in ("qmp-unix", "qmp-pretty"):
        flag = "-qmp" if s.monitor == "qmp-unix" else "-qmp-pretty"
        argv += [flag, f"unix:{monitor_path},server=on,wait=off"]
        target = f"unix:{monitor_path}"
    elif s.monitor == "qmp-tcp":
        argv += ["-qmp", f"tcp:127.0.0.1:{ctx.tcp_port},server=on,wait=off"]
        target = f"tcp:127.0.0.1:{ctx.tcp_port}"
    else:
        chardev = "qmp" if s.shape == "proxmox" else "charmonitor"
        argv += [
            "-chardev",
            f"socket,id={chardev},path={monitor_path},server=on,wait=off",
            "-mon",
            f"chardev={chardev},mode=control",
        ]
        target = f"unix:{monitor_path}"
    argv += ["-nodefaults", "-display", "none"] if s.nodefaults else ["-display", "none"]
    if not s.machine_last:
        argv += [s.machine_flag, machine_option(s)]
    argv += [
        "-m",
        str(RAM_MIB),
        "-object",
        f"memory-backend-memfd,id=mem,size={RAM_MIB}M",
        "-machine",
        "memory-backend=mem",
    ]
    argv += [a.replace("{work}", str(ctx.workdir)) for a in s.extra]
    if s.guest:
        kernel = ctx.guest_kernel
        if s.viommu_model == "amd":
            kernel = ctx.amd_guest_kernel or _amd_guest_beside(ctx.guest_kernel)
        argv += ["-kernel", str(kernel), "-debugcon", f"file:{ctx.console}"]
    else:
        argv += ["-S"]
    if s.unplugs:
        argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    runs = s.cfg_runs()
    firsts = {id(run[0]): n for n, run in enumerate(runs)}
    for dev in s.devices:
        if dev.syntax == "readconfig":
            if id(dev) in firsts:
                n = firsts[id(dev)]
                cfg = ctx.workdir / s.cfg_file(n)
                argv += ["-readconfig", s.cfg_file(n) if s.cfg_relative else str(cfg)]
                files[cfg] = render_readconfig(runs[n], ctx, s.cfg_style)
            continue
        argv += ["--device" if dev.long_option else "-device", render_device(dev, ctx)]
    if s.machine_last:
        argv += [s.machine_flag, machine_option(s)]
    harness = [
        "-chardev",
        f"socket,id=setup-mon,fd={SETUP_FD},server=on,wait=off",
        "-mon",
        "chardev=setup-mon,mode=control",
        "-trace",
        f"handle_qmp_command,file={ctx.trace}",
    ]
    if s.unplugs or s.launcher == "kvm-link":
        # Debian's QEMU invoked as `kvm` defaults to KVM (slow nested here, and -qtest
        # would pick the qtest accelerator): TCG, like every other scenario
        harness += ["-accel", "tcg"]
    if s.unplugs:
        harness += ["-qtest", f"unix:{ctx.qtest_socket},server=on,wait=off"]
    return Rendered(argv + harness, env, files, links, target, harness, ctx.workdir)


SETUP_FD = 4  # the test's own monitor, listening before QEMU runs (as in QemuProcess)
