"""Fixes for vfio devices realized before their vIOMMU, in the language of whoever wrote
the command line. Pure: argv (and -readconfig texts) in, a corrected command line and
the words for it out.

- plain QEMU command line: move the vIOMMU's option before the first vfio device it
  translates, minding QEMU's two device lists (a JSON vIOMMU after key=val vfio devices
  becomes key=val; a vfio device in a -readconfig file needs the vIOMMU before that
  -readconfig), every other argument untouched;
- libvirt (its argv shape, or a libvirt target): a vIOMMU from `<qemu:commandline>`
  lands after every device libvirt creates, so the fix is `<iommu model=...>` in the
  domain XML;
- Proxmox VE (`/usr/bin/kvm ... -id VMID`): a vIOMMU from the VM's `args:` line lands
  after every hostpci device, so the fix is `machine: ...,viommu=...` in the VM config;
- a model where reordering does not fix it (emulated arm-smmuv3): what works instead.

Every proposed command line is checked by preflight before it is offered: no vfio
device before its vIOMMU, and every device still on the same bus at the same address.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from qmpguard import qemu_names as T
from qmpguard.analysis.cmdline import CliDevice, DeviceSyntax
from qmpguard.analysis.libvirt_xml import LIBVIRT_TAIL
from qmpguard.analysis.model import Verdict
from qmpguard.analysis.viommu_models import (
    model,
    refuses_vfio_after_on_every_version,
    version_matters,
)

if TYPE_CHECKING:
    from qmpguard.analysis.preflight import Preflight
    from qmpguard.analysis.topology import Topology
    from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis

Language = Literal["command-line", "libvirt", "proxmox", "none"]

#: Set while a fix is being worked out: the analyses that check it (their QG001
#: findings included) must not look for fixes in turn.
_FIXING: ContextVar[bool] = ContextVar("qmpguard_fixing", default=False)


@dataclass(frozen=True)
class Fix:
    """One fix for the vfio devices realized before one vIOMMU."""

    language: Language
    text: str  # what to change, in the language of whoever wrote the command line
    how: str  # the same, short (no corrected command line in it)
    #: The command line QEMU gets once the fix is applied (None: no reordering fixes it).
    argv: tuple[str, ...] | None
    viommu: str  # QOM path of the vIOMMU
    devices: tuple[str, ...]  # QOM paths of the vfio devices it fixes

    @property
    def command_line(self) -> str | None:
        return shlex.join(self.argv) if self.argv is not None else None


# ------------------------------------------------------------------ shapes


def libvirt_made(argv: Sequence[str]) -> bool:
    """Whether libvirt wrote this command line (its -name guest=..., its master key secret,
    its closing -msg timestamp=on)."""
    tail = any(argv[i : i + 2] == list(LIBVIRT_TAIL) for i in range(len(argv) - 1))
    name = any(a.startswith("guest=") for a in argv)
    secret = any('"masterKey0"' in a for a in argv)
    return tail and (name or secret)


def from_qemu_commandline(cd: CliDevice, viommu: bool) -> bool:
    """In a libvirt-made command line, whether this option came from <qemu:commandline>:
    libvirt writes every device as JSON (libvirt 7.0+ with QEMU 6.0+), and its <iommu>
    with the id iommu0; a key=val option or another vIOMMU is passed through."""
    if not cd.syntax.json_list:
        return True
    return viommu and cd.id != "iommu0"


_PVE_QMP = re.compile(r"(?:/var)?/run/qemu-server/(\d+)\.qmp")


def proxmox_vmid(argv: Sequence[str]) -> str | None:
    """The VMID of a command line Proxmox VE's qemu-server wrote, None if it is not one."""
    if os.path.basename(argv[0]) != "kvm" if argv else True:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == "-id" and argv[i + 1].isdigit():
            return argv[i + 1]
    for arg in argv:
        if m := _PVE_QMP.search(arg):
            return m.group(1)
    return None


# ------------------------------------------------------------------ option surgery


def _id_wellformed(text: str) -> bool:
    """QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'."""
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", text))


def keyval_text(cd: CliDevice, extra: Mapping[str, str] | None = None) -> str | None:
    """The option as `driver,key=val,...`; None if key=val cannot say it (an id QEMU
    refuses in key=val form, a nested JSON value)."""
    if cd.id is not None and not _id_wellformed(cd.id):
        return None
    parts = [cd.driver.replace(",", ",,")]
    if cd.id is not None:
        parts.append(f"id={cd.id}")
    for key, value in (*cd.props, *(extra or {}).items()):
        if value.startswith(("{", "[")) or "=" in key or "," in key:
            return None
        if key == "addr" and key in cd.numbers and key not in (extra or {}):
            if not value.isdigit():
                return None  # -1 (QEMU picks) has no key=val spelling but leaving it out
            value = f"0x{int(value) >> 3:x}.0x{int(value) & 7:x}"  # JSON 24 is 03.0
        parts.append(f"{key}={value.replace(',', ',,')}")
    return ",".join(parts)


def _with_addr(argv: list[str], cd: CliDevice, devfn: int) -> str:
    """The option's text with addr= pinned (keeps a moved PCI vIOMMU's guest address)."""
    addr = f"0x{devfn >> 3:x}.0x{devfn & 7:x}"
    value = argv[cd.argument]
    if cd.syntax is DeviceSyntax.JSON:
        from qmpguard.analysis.cmdline import qemu_json_loads

        obj = qemu_json_loads(value)
        assert isinstance(obj, dict)
        obj["addr"] = addr
        return json.dumps(obj, separators=(",", ":"))
    return f"{value},addr={addr}"


def _device_option(argv: Sequence[str], cd: CliDevice) -> str:
    """How the option was spelled (-device or --device)."""
    return argv[cd.argument - 1]


def _short(argv: Sequence[str], cd: CliDevice) -> str:
    if cd.syntax is DeviceSyntax.READCONFIG:
        return f"{cd.source} (-readconfig {argv[cd.argument]})"
    return f"{shlex.join([_device_option(argv, cd), argv[cd.argument]])} ({cd.source})"


def _move(argv: Sequence[str], src: int, count: int, dst: int, new: Sequence[str]) -> list[str]:
    """argv with argv[src:src+count] removed and `new` inserted where argv[dst] was."""
    out = list(argv)
    del out[src : src + count]
    if dst > src:
        dst -= count
    out[dst:dst] = list(new)
    return out


# ------------------------------------------------------------------ verification


def _verify(original: Preflight, argv: list[str]) -> str | None:
    """Why `argv` is no fix (None if it is): any vfio device still realized before its
    vIOMMU, or any device now on another bus or address than in the original."""
    from qmpguard.analysis.preflight import preflight

    after = preflight(argv, original.files, target=original.target, version=original.version)
    verdicts = after.analysis().devices
    still = [d.device.label for d in verdicts if d.verdict is Verdict.MISBOUND]
    if still:
        return f"{', '.join(still)} would still be realized before its vIOMMU"
    if _layout(original) != _layout(after):
        return "a device would land on another bus or address"
    return None


def _layout(pf: Preflight) -> Counter[tuple[object, ...]]:
    """Every device option's bus and address (vIOMMUs left out: the fix moves them). A bus
    is named by its place (bus names and bridge slots from the root), not its QOM path:
    moving an anonymous vIOMMU renumbers anonymous bridges, not where anything sits."""
    from qmpguard.analysis.preflight import canonical_driver

    topo = pf.facts.topology
    return Counter(
        (p.option.driver, p.option.id, _place(topo, p.bus), p.devfn)
        for p in pf.placements
        if canonical_driver(p.option.driver) not in T.VIOMMU_TYPES
    )


def _place(topo: Topology, bus_path: str | None) -> tuple[object, ...]:
    out: list[object] = []
    while bus_path is not None and bus_path in topo.buses and len(out) < 128:
        bus = topo.buses[bus_path]
        out.append(bus.path.rsplit("/", 1)[-1])
        if bus.parent_device is None:
            break
        owner = topo.devices[bus.parent_device]
        out.append(owner.devfn)
        bus_path = owner.bus
    return tuple(reversed(out)) if out else (bus_path,)


# ------------------------------------------------------------------ the fix


def fixes(vm: VmAnalysis) -> list[Fix]:
    """One fix per vIOMMU with vfio devices realized before it (needs the VM's argv)."""
    snap = vm.snapshot
    if snap is None or not snap.cmdline or _FIXING.get():
        return []
    token = _FIXING.set(True)
    try:
        return _fixes(vm, snap.cmdline, snap.files, snap.transport)
    finally:
        _FIXING.reset(token)


def _fixes(vm: VmAnalysis, argv: list[str], files: Mapping[str, str], transport: str) -> list[Fix]:
    groups: dict[str, list[DeviceAnalysis]] = {}
    for dev in vm.devices:
        if dev.verdict is Verdict.MISBOUND and dev.binding.viommu is not None:
            groups.setdefault(dev.binding.viommu.path, []).append(dev)
    out = []
    for devs in groups.values():
        fix = _fix_one(vm, argv, files, transport, devs)
        if fix is not None:
            out.append(fix)
    return out


def fix_for(vm: VmAnalysis, dev: DeviceAnalysis) -> Fix | None:
    """The fix that covers one misbound vfio device, if the VM's argv is known."""
    return next((f for f in fixes(vm) if dev.device.path in f.devices), None)


def _fix_one(
    vm: VmAnalysis,
    argv: list[str],
    files: Mapping[str, str],
    transport: str,
    devs: list[DeviceAnalysis],
) -> Fix | None:
    from qmpguard.analysis.preflight import QemuVersion, preflight

    viommu = devs[0].binding.viommu
    assert viommu is not None
    paths = tuple(d.device.path for d in devs)
    m = model(viommu.kind)
    if not m.reorder_fixes:
        text = m.alternative + "."
        return Fix("none", text, text, None, viommu.path, paths)
    cli_by_path = vm.facts.order.cli_by_path
    v_cd = cli_by_path.get(viommu.path)
    refused = viommu.refuses_vfio_after  # this QEMU refuses the right order
    if refused is None and v_cd is not None and vm.facts.qemu_version is None:
        refused = refuses_vfio_after_on_every_version(viommu.type, dict(v_cd.props))
    if refused is not None:
        text = (m.when_refused or m.alternative or refused) + "."
        return Fix("none", text, text, None, viommu.path, paths)
    f_cds = [cli_by_path.get(p) for p in paths]
    if v_cd is None or any(c is None for c in f_cds):
        return None
    version = QemuVersion(vm.facts.qemu_version, "")
    firsts = sorted((c for c in f_cds if c is not None), key=lambda c: c.realize_rank)
    original = preflight(argv, files, version=version)
    vmid = proxmox_vmid(argv)
    if vmid is not None:
        fix = _proxmox(original, argv, v_cd, firsts, vmid, viommu.type, viommu.path, paths)
    elif transport == "libvirt" or libvirt_made(argv):
        fix = _libvirt(original, argv, v_cd, firsts, viommu.type, viommu.path, paths)
    else:
        fix = _reordered(original, argv, v_cd, firsts, viommu.path, paths, vm)
    if version.text is None and (why := version_matters(viommu.type, dict(v_cd.props))):
        # Reordering never binds it wrongly: it either fixes the binding or makes QEMU
        # refuse loudly. Which one is the version's to say, so the fix says that.
        caveat = (
            f" Whether QEMU accepts the corrected order depends on its version, which "
            f"qmpguard does not know ({why}): give --qemu-version to know."
        )
        fix = replace(fix, text=fix.text + caveat, how=fix.how + caveat)
    return fix


def _reordered(
    original: Preflight,
    argv: list[str],
    v: CliDevice,
    vfio: list[CliDevice],
    viommu_path: str,
    paths: tuple[str, ...],
    vm: VmAnalysis,
) -> Fix:
    first = vfio[0]
    why_not: list[str] = []
    for candidate in _candidates(argv, v, first, vm):
        new_argv, how = candidate
        problem = _verify(original, new_argv)
        if problem is None:
            text = f"{how}, then restart the VM. Corrected command line: {shlex.join(new_argv)}"
            return Fix("command-line", text, how, tuple(new_argv), viommu_path, paths)
        why_not.append(f"{how}: {problem}")
    manual = (
        f"create {v.driver} ({v.source}) before {first.driver} ({first.source}) on the "
        "command line, then restart the VM"
    )
    if why_not:
        manual += f" (no automatic rewrite: {'; '.join(why_not)})"
    return Fix("command-line", manual, manual, None, viommu_path, paths)


def _candidates(
    argv: list[str], v: CliDevice, first: CliDevice, vm: VmAnalysis
) -> list[tuple[list[str], str]]:
    """Rewrites that realize `v` before `first`, the least intrusive first."""
    out: list[tuple[list[str], str]] = []
    target = first.argument - 1  # the option of the vfio device (or of its -readconfig)
    if v.syntax is DeviceSyntax.READCONFIG:
        if first.syntax is not DeviceSyntax.READCONFIG or first.argument != v.argument:
            new = _move(argv, v.argument - 1, 2, target, argv[v.argument - 1 : v.argument + 1])
            out.append((new, f"move -readconfig {argv[v.argument]} before {_short(argv, first)}"))
        return out
    opt = _device_option(argv, v)
    value = argv[v.argument]
    devfn = _pinned_devfn(vm, v)
    if devfn is not None:
        value = _with_addr(argv, v, devfn)
    if v.syntax.json_list and not first.syntax.json_list:
        kv = keyval_text(
            v, {"addr": f"0x{devfn >> 3:x}.0x{devfn & 7:x}"} if devfn is not None else None
        )
        if kv is None:
            return out
        how = (
            f"move {_short(argv, v)} before {_short(argv, first)}, in key=val form ("
            "QEMU realizes every key=val and -readconfig device before the JSON ones): "
            f"{opt} {kv}"
        )
        out.append((_move(argv, v.argument - 1, 2, target, [opt, kv]), how))
        return out
    how = f"move {_short(argv, v)} before {_short(argv, first)}"
    out.append((_move(argv, v.argument - 1, 2, target, [opt, value]), how))
    return out


def _pinned_devfn(vm: VmAnalysis, v: CliDevice) -> int | None:
    """A PCI vIOMMU placed by QEMU (no addr=) keeps its slot when moved: addr= pinned."""
    if v.prop("addr") is not None:
        return None
    for dev in vm.devices:
        if (
            dev.device.viommu_kind is not None
            and vm.facts.order.cli_by_path.get(dev.device.path) == v
        ):
            return dev.device.devfn
    return None


# ------------------------------------------------------------------ libvirt

_LIBVIRT_ATTRS = {
    "caching-mode": "caching_mode",
    "intremap": "intremap",
    "device-iotlb": "iotlb",
    "eim": "eim",
    "aw-bits": "aw_bits",
}
_LIBVIRT_MODELS = {"intel-iommu": "intel", "virtio-iommu-pci": "virtio", "virtio-iommu": "virtio"}


def _libvirt_iommu_xml(v: CliDevice) -> str | None:
    model_name = _LIBVIRT_MODELS.get(v.driver)
    if model_name is None:
        return None
    attrs = []
    for key, value in v.props:
        attr = _LIBVIRT_ATTRS.get(key)
        if attr is None:
            continue
        if attr == "aw_bits":
            attrs.append(f"{attr}='{value}'")
        else:
            on = value.lower() in ("on", "yes", "true", "y")
            attrs.append(f"{attr}='{'on' if on else 'off'}'")
    driver = f"<driver {' '.join(attrs)}/>" if attrs else ""
    return f"<iommu model='{model_name}'>{driver}</iommu>"


def _typed(key: str, value: str, numbers: frozenset[str] = frozenset()) -> object:
    """A key=val property value as libvirt's JSON writes it (booleans and numbers typed;
    intel-iommu's intremap is on/off/auto, a string; addr stays a string: as a JSON
    number QEMU would read it as the devfn, not the slot)."""
    if key in numbers and re.fullmatch(r"-?\d+", value):
        return int(value)  # written as a JSON number: stays one
    if key != "intremap" and value.lower() in ("on", "yes", "true", "off", "no", "false"):
        return value.lower() in ("on", "yes", "true")
    return int(value) if value.isdigit() and key != "addr" else value


def _libvirt_json(v: CliDevice) -> str:
    """The vIOMMU as libvirt writes it for <iommu>: JSON, id iommu0."""
    dev: dict[str, object] = {"driver": v.driver, "id": "iommu0"}
    dev |= {key: _typed(key, value, v.numbers) for key, value in v.props}
    return json.dumps(dev, separators=(",", ":"))


def _json_text(cd: CliDevice) -> str:
    """A key=val device option in JSON form (values typed as libvirt would)."""
    obj: dict[str, object] = {"driver": cd.driver}
    if cd.id is not None:
        obj["id"] = cd.id
    obj |= {key: _typed(key, value, cd.numbers) for key, value in cd.props}
    return json.dumps(obj, separators=(",", ":"))


def _libvirt(
    original: Preflight,
    argv: list[str],
    v: CliDevice,
    vfio: list[CliDevice],
    viommu_type: str,
    viommu_path: str,
    paths: tuple[str, ...],
) -> Fix:
    from_commandline = from_qemu_commandline(v, viommu=True)
    xml = _libvirt_iommu_xml(v)
    steps: list[str] = []
    new = list(argv)
    if from_commandline and xml is not None:
        arg = f"<qemu:arg value={json.dumps(argv[v.argument])}/>"
        steps.append(
            f"{viommu_type} comes from <qemu:commandline>, whose arguments libvirt appends "
            f"after every device it creates: remove <qemu:arg value='{argv[v.argument - 1]}'/>"
            f"{arg} from <qemu:commandline> and add {xml} to <devices> (libvirt creates it "
            "before all of its devices"
            + (
                "; intremap='on' also needs <ioapic driver='qemu'/> in <features>)"
                if "intremap='on'" in xml
                else ")"
            )
        )
        first_device = next(
            (i for i, a in enumerate(new) if a in ("-device", "--device")), len(new)
        )
        new = _move(new, v.argument - 1, 2, first_device, ["-device", _libvirt_json(v)])
    elif from_commandline:
        steps.append(
            f"libvirt has no <iommu> model for {viommu_type}: move its <qemu:arg> pair in "
            "<qemu:commandline> before the vfio device's"
        )
    keyval_vfio = [f for f in vfio if from_qemu_commandline(f, viommu=False)]
    for f in keyval_vfio:
        steps.append(
            f"{argv[f.argument - 1]} {argv[f.argument]} in <qemu:commandline> is key=val, "
            "which QEMU realizes before every JSON device libvirt writes (the vIOMMU "
            f"included): give it as <hostdev>, or in JSON form: -device {_json_text(f)}"
        )
    if keyval_vfio:
        # the check below reads the same command line with those devices in JSON form
        for f in sorted(keyval_vfio, key=lambda d: -d.argument):
            index = _index_after(new, argv, f)
            if index is not None:
                new[index] = _json_text(f)
    if not steps:
        return _reordered(original, argv, v, vfio, viommu_path, paths, original.analysis())
    problem = _verify(original, new)
    text = "; ".join(steps) + "; then `virsh destroy` and `virsh start` the domain."
    if problem is not None:
        text += f" (qmpguard could not confirm this fix on the command line: {problem})"
    argv_ok = tuple(new) if problem is None else None
    return Fix("libvirt", text, text, argv_ok, viommu_path, paths)


def _index_after(new: list[str], old: list[str], cd: CliDevice) -> int | None:
    """Where option value old[cd.argument] sits in `new` (values are unique enough)."""
    value = old[cd.argument]
    hits = [
        i
        for i, a in enumerate(new)
        if a == value and i > 0 and new[i - 1] in ("-device", "--device")
    ]
    return hits[0] if len(hits) == 1 else None


# ------------------------------------------------------------------ Proxmox VE

_PVE_VIOMMU = {"intel-iommu": "intel", "virtio-iommu-pci": "virtio", "virtio-iommu": "virtio"}
#: What qemu-server writes for `machine: ...,viommu=...`, at the start of its devices.
_PVE_DEVICE = {
    "intel": "intel-iommu,intremap=on,caching-mode=on",
    "virtio": "virtio-iommu-pci",
}


def _proxmox(
    original: Preflight,
    argv: list[str],
    v: CliDevice,
    vfio: list[CliDevice],
    vmid: str,
    viommu_type: str,
    viommu_path: str,
    paths: tuple[str, ...],
) -> Fix:
    pve = _PVE_VIOMMU.get(v.driver)
    machine = (original.cli.machine_opts.get("type") or "q35").split("+", 1)[0]
    if pve is None:
        text = (
            f"Proxmox VE cannot create {viommu_type} itself, and the VM's args: line is "
            "appended after every hostpci device: use machine: "
            f"{machine},viommu=intel (or viommu=virtio) in /etc/pve/qemu-server/{vmid}.conf "
            f"instead of {viommu_type} in args:, then stop and start the VM."
        )
        return Fix("proxmox", text, text, None, viommu_path, paths)
    first_device = next(
        (i for i, a in enumerate(argv) if a in ("-device", "--device", "-readconfig")), len(argv)
    )
    new = _move(argv, v.argument - 1, 2, first_device, ["-device", _PVE_DEVICE[pve]])
    problem = _verify(original, new)
    text = (
        f"{viommu_type} comes from the VM's args: line, which Proxmox VE appends after every "
        f"device it creates, hostpci included: in /etc/pve/qemu-server/{vmid}.conf remove "
        f"{shlex.join([_device_option(argv, v), argv[v.argument]])} from args: and set "
        f"machine: {machine},viommu={pve} (Proxmox VE 8.2 or later): Proxmox VE then creates "
        f"the vIOMMU before its -readconfig and every hostpci device. Then stop and start "
        f"VM {vmid}."
    )
    if problem is not None:
        text += f" (qmpguard could not confirm this fix on the command line: {problem})"
    argv_ok = tuple(new) if problem is None else None
    return Fix("proxmox", text, text, argv_ok, viommu_path, paths)
