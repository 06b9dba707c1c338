"""Preflight: a QEMU command line alone -> VmFacts, judged by the same rules as a live VM.

No QEMU is asked. The machine type gives the root bus and the devices the board creates;
every device option is then realized in QEMU's order (cmdline.py: key=val and
-readconfig in position, then JSON) the way QEMU places it:

- `bus=NAME` is looked up as `qbus_find_recursive` does: depth first from the system
  bus, newest child first (each bus lists its newest device first), so a name that two
  buses carry resolves to the first one met. A bridge without an id names its bus
  `<lowercase bus type>.<N>` from a per-bus-type counter (`pci.1`, `pcie.0`, ...): the
  root bus of `pc` is itself such an automatic `pci.0`; q35's and virt's `pcie.0` are
  not. Without `bus=`, a PCI device goes to the first PCI bus of that search.
- `addr=` or the lowest free slot from 0 (function 0 free), as `do_pci_register_device`.
- Expanders: `pxb` creates a host whose root bus `pxb-internal` holds a pci-bridge whose
  bus carries the pxb's id; `pxb-pcie` names its root bus after its id. Both copy
  `bypass_iommu` to their host; the machine's `default-bus-bypass-iommu` sets the main
  host's.
- vIOMMUs: intel-iommu and amd-iommu translate the main root bus (amd-iommu also puts an
  AMDVI-PCI function there), virtio-iommu-pci the bus it sits on, a `-device arm-smmuv3`
  its `primary-bus`, `-M virt,iommu=smmuv3` the main root bus from board init.

- `-set device.ID.KEY=VALUE` changes the key=val or -readconfig device defined before it
  (cmdline.py); a JSON `addr` integer is the devfn, a string SLOT[.FN] (option_devfn).
- The model rules check applies to sysbus vIOMMUs (viommu_models: refused order,
  pass-through, intel-iommu's caching-mode) get the option's properties with the
  defaults of the QEMU version that will run it (QemuVersion, found by
  preflight_command); without a version, what only the version decides is unverified.

All of this was checked against `info qtree` of QEMU 7.2, 10.0 and 11.1. What cannot be
known without QEMU is never guessed: a vfio device whose bus depends on something
qmpguard cannot see (an unknown machine, an unreadable -readconfig that may hold a
vIOMMU, an automatic bus name next to a device type that may create buses, a bus no
option creates) is bound to a stand-in vIOMMU whose label says why; no option created
it, so the order evidence says so and the verdict is unverified (QG002), with the reason.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from qmpguard import qemu_names as T
from qmpguard.analysis.binding import ExpectedBinding, Requester, expected_binding
from qmpguard.analysis.cmdline import (
    CliDevice,
    CliFacts,
    DeviceSyntax,
    keyval,
    options,
    parse_cmdline,
)
from qmpguard.analysis.model import BindingKind
from qmpguard.analysis.order import OrderContext
from qmpguard.analysis.qtree import TypeFacts
from qmpguard.analysis.topology import PciBus, PciDevice, Topology
from qmpguard.analysis.viommu import VIommu
from qmpguard.analysis.viommu_models import (
    Version,
    exits_with_vfio,
    parse_version,
    passthrough,
    refuses_vfio_after,
    refuses_vfio_after_on_every_version,
    rule_properties,
    version_matters,
)
from qmpguard.analysis.vm import VmAnalysis, VmFacts, judge
from qmpguard.process import readconfig_paths
from qmpguard.snapshot import Snapshot

#: A -readconfig file larger than this is not a QEMU config a person wrote.
MAX_CONFIG_BYTES = 1 << 20
ORIGIN = "QEMU command line (preflight: QEMU not started)"
TRANSPORT = "preflight"

_IS_VFIO = TypeFacts(frozenset(), frozenset(), frozenset(), frozenset(), frozenset()).is_vfio

# ------------------------------------------------------------------ device types

#: Bridges and the bus type of the bus they create (express: PCIE; conventional: PCI).
BRIDGE_BUS = {
    "pcie-root-port": "PCIE",
    "ioh3420": "PCIE",
    "x3130-upstream": "PCIE",
    "xio3130-downstream": "PCIE",
    "pci-bridge": "PCI",
    "pci-bridge-seat": "PCI",
    "pcie-pci-bridge": "PCI",
    "i82801b11-bridge": "PCI",
}
EXPRESS_BUS_TYPES = frozenset({"PCIE", "pxb-pcie-bus"})
SYSBUS_VIOMMUS = frozenset({"intel-iommu", "amd-iommu", "arm-smmuv3"})
_PCI_EXACT = frozenset(
    {
        *BRIDGE_BUS,
        "pxb",
        "pxb-pcie",
        "vfio-pci-nohotplug",
        "e1000",
        "e1000e",
        "e1000-82544gc",
        "e1000-82545em",
        "igb",
        "rtl8139",
        "ne2k_pci",
        "pcnet",
        "vmxnet3",
        "i82550",
        "i82551",
        "i82557a",
        "i82557b",
        "i82557c",
        "i82558a",
        "i82558b",
        "i82559a",
        "i82559b",
        "i82559c",
        "i82559er",
        "i82562",
        "i82801",
        "VGA",
        "secondary-vga",
        "cirrus-vga",
        "qxl",
        "qxl-vga",
        "vmware-svga",
        "bochs-display",
        "ati-vga",
        "virtio-vga",
        "virtio-vga-gl",
        "vhost-user-vga",
        "ich9-ahci",
        "ich9-usb-ehci1",
        "ich9-usb-ehci2",
        "ich9-usb-uhci1",
        "ich9-usb-uhci2",
        "ich9-usb-uhci3",
        "ich9-usb-uhci4",
        "ich9-usb-uhci5",
        "ich9-usb-uhci6",
        "piix3-usb-uhci",
        "piix4-usb-uhci",
        "usb-ehci",
        "nec-usb-xhci",
        "qemu-xhci",
        "pci-ohci",
        "megasas",
        "megasas-gen2",
        "lsi53c895a",
        "lsi53c810",
        "mptsas1068",
        "am53c974",
        "dc390",
        "pvscsi",
        "nvme",
        "pci-testdev",
        "edu",
        "ivshmem-plain",
        "ivshmem-doorbell",
        "intel-hda",
        "ich9-intel-hda",
        "AC97",
        "ES1370",
        "i6300esb",
        "pci-serial",
        "pci-serial-2x",
        "pci-serial-4x",
        "sdhci-pci",
        "pvpanic-pci",
    }
)
_PCI_SUFFIXES = ("-pci", "-pci-transitional", "-pci-non-transitional")
_NONPCI_PREFIXES = (
    "usb-",
    "scsi-",
    "ide-",
    "isa-",
    "hda-",
    "ccid-card-",
    "nvme-ns",
    "nvme-subsys",
    "virtserialport",
    "virtconsole",
    "pc-dimm",
    "nvdimm",
    "tpm-",
    "ipmi-",
    "i2c-",
)
_NONPCI_EXACT = frozenset(
    {*SYSBUS_VIOMMUS, "pvpanic", "vmcoreinfo", "ramfb", "sga", "vmgenid", "loader", "floppy"}
)
#: Display adapters that replace QEMU's default VGA (vl.c default_list).
_DISPLAY_ADAPTERS = frozenset(
    {
        "VGA",
        "isa-vga",
        "cirrus-vga",
        "isa-cirrus-vga",
        "vmware-svga",
        "qxl-vga",
        "virtio-vga",
        "virtio-vga-gl",
        "ati-vga",
        "vhost-user-vga",
        "vhost-user-vga-gl",
    }
)
_VGA_MODELS = {
    "std": "VGA",
    "cirrus": "cirrus-vga",
    "vmware": "vmware-svga",
    "qxl": "qxl-vga",
    "virtio": "virtio-vga",
}


#: qdev_alias_table (system/qdev-monitor.c): short names QEMU accepts for -device, on
#: machines with virtio PCI (x86, ARM).
ALIASES = {
    "e1000-82540em": "e1000",
    "ahci": "ich9-ahci",
    "lsi": "lsi53c895a",
    "ac97": "AC97",
    "es1370": "ES1370",
    **{
        f"virtio-{n}": f"virtio-{n}-pci"
        for n in (
            "9p",
            "balloon",
            "blk",
            "gpu",
            "input-host",
            "iommu",
            "keyboard",
            "mouse",
            "net",
            "rng",
            "scsi",
            "serial",
            "tablet",
        )
    },
}


def canonical_driver(driver: str) -> str:
    """The QOM type a -device driver name creates (aliases resolved)."""
    return ALIASES.get(driver, driver)


def pci_kind(driver: str) -> bool | None:
    """True for a PCI device type, False for one that is not, None if qmpguard cannot say."""
    if driver in _NONPCI_EXACT or driver.startswith(_NONPCI_PREFIXES):
        return False
    if driver.endswith(("-device", "-cpu")):
        return False
    if driver in _PCI_EXACT or _IS_VFIO(driver) or driver.endswith(_PCI_SUFFIXES):
        return True
    if driver in T.PCI_VIOMMU_TYPES:
        return True
    return None


def is_virtio_pci(driver: str) -> bool:
    """A virtio PCI proxy (it has a virtio backend whose iommu_platform matters)."""
    virtio = driver.startswith(("virtio-", "vhost-"))
    return virtio and (driver.endswith(_PCI_SUFFIXES) or driver.endswith("-vga"))


_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})


def qemu_bool(value: str | None, default: bool = False) -> bool:
    """QEMU's boolean property words (qapi_bool_parse)."""
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    return default


def parse_addr(text: str) -> int | None:
    """`addr=` as QEMU's pci-devfn property reads it: SLOT[.FN], hexadecimal."""
    m = re.fullmatch(r"(?:0x)?([0-9a-fA-F]{1,2})(?:\.(?:0x)?([0-7]))?", text.strip())
    if m is None:
        return None
    slot = int(m.group(1), 16)
    if slot > 0x1F:
        return None
    return (slot << 3) | int(m.group(2) or "0")


def option_devfn(cd: CliDevice) -> tuple[str | None, int | None]:
    """(addr as written, the devfn QEMU gives it): pci-devfn takes an integer as the devfn
    itself (-1: pick one) and a string as SLOT[.FN] (hw/core/qdev-properties-system.c)."""
    addr = cd.prop("addr")
    if addr is None:
        return None, None
    if "addr" in cd.numbers:
        try:
            number = int(addr)
        except ValueError:
            return addr, None
        if number == -1:
            return None, None
        return addr, number if 0 <= number <= 0xFF else None
    return addr, parse_addr(addr)


# ------------------------------------------------------------------ machines


@dataclass(frozen=True)
class MachineModel:
    """What one machine type builds before any -device: its PCI host and root bus."""

    family: str  # q35 | i440fx | virt
    host_type: str
    host_path: str  # QOM path of the main host bridge (synthetic where QEMU's is numbered)
    root_name: str
    root_type: str
    root_auto_named: bool  # pc's pci.0 comes from the PCI bus counter
    builtins: tuple[tuple[str, str, int], ...]  # (QOM-ish path, type, devfn)
    default_nic: str | None
    default_vga: bool
    #: The machine copies default-bus-bypass-iommu to its main host (pc_q35_init, virt;
    #: i440fx does not: its host shows bypass-iommu = false whatever the property says).
    default_bypass: bool

    @property
    def root_path(self) -> str:
        return f"{self.host_path}/{self.root_name}"


Q35 = MachineModel(
    "q35",
    "q35-pcihost",
    "/machine/q35",
    "pcie.0",
    "PCIE",
    False,
    (
        ("/machine/q35/mch", "mch", 0x00),
        ("builtin:ICH9-LPC", "ICH9-LPC", 0xF8),
        ("builtin:ich9-ahci", "ich9-ahci", 0xFA),
        ("builtin:ICH9-SMB", "ICH9-SMB", 0xFB),
    ),
    "e1000e",
    True,
    True,
)
I440FX = MachineModel(
    "i440fx",
    "i440FX-pcihost",
    "/machine/i440fx",
    "pci.0",
    "PCI",
    True,
    (
        ("builtin:i440FX", "i440FX", 0x00),
        ("builtin:PIIX3", "PIIX3", 0x08),
        ("builtin:piix3-ide", "piix3-ide", 0x09),
        ("builtin:PIIX4_PM", "PIIX4_PM", 0x0B),
    ),
    "e1000",
    True,
    False,
)
ARM_VIRT = MachineModel(
    "virt",
    "gpex-pcihost",
    "builtin:gpex-pcihost",
    "pcie.0",
    "PCIE",
    False,
    (("builtin:gpex-root", "gpex-root", 0x00),),
    "virtio-net-pci",
    False,
    True,
)

_X86_BINARIES = re.compile(r"(qemu-system-(x86_64|i386)|kvm|qemu-kvm)")
_ARM_BINARIES = re.compile(r"qemu-system-(aarch64|arm)")


def machine_binary(argv0: str) -> bool:
    """Whether argv[0] names a QEMU system emulator qmpguard knows (x86 or ARM)."""
    binary = os.path.basename(argv0)
    return bool(_X86_BINARIES.fullmatch(binary) or _ARM_BINARIES.fullmatch(binary))


def machine_model(type_name: str | None, argv0: str) -> tuple[MachineModel | None, str]:
    """The model of a machine type (aliases and versioned names), or None and why not."""
    binary = os.path.basename(argv0)
    name = (type_name or "").split("+", 1)[0]  # Proxmox VE: pc-q35-9.0+pve0
    if not name:
        if _X86_BINARIES.fullmatch(binary):
            name = "pc"  # qemu-system-x86_64's default machine
        else:
            return None, f"no -machine type given and {binary!r} has no known default"
    arm = bool(_ARM_BINARIES.fullmatch(binary))
    if not arm and (name == "q35" or name.startswith("pc-q35-") or name.endswith("-q35")):
        return Q35, ""
    if not arm and (name in ("pc", "ubuntu") or name.startswith(("pc-i440fx-", "pc-1."))):
        return I440FX, ""
    if (name == "virt" or name.startswith("virt-")) and not _X86_BINARIES.fullmatch(binary):
        return ARM_VIRT, ""
    return None, f"machine type {name!r} is unknown to qmpguard"


# ------------------------------------------------------------------ the model being built


@dataclass
class _Bus:
    path: str
    name: str
    type: str
    root: bool
    bypass: bool
    parent_device: str | None
    devices: list[str] = field(default_factory=list)

    @property
    def express(self) -> bool:
        return self.type in EXPRESS_BUS_TYPES


@dataclass
class _Dev:
    path: str
    type: str
    id: str | None
    bus: str
    devfn: int
    cli: CliDevice | None
    child_buses: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Placement:
    """Where one device option went: its bus (None: no bus qmpguard knows), and why that
    is not certain, if it is not."""

    option: CliDevice
    path: str
    bus: str | None
    devfn: int | None
    uncertain: str | None = None
    others: tuple[str, ...] = ()  # other buses carrying the same name (QEMU took `bus`)


@dataclass
class _Build:
    machine: MachineModel
    hidden: list[str]  # why devices may exist that qmpguard cannot see
    version: Version | None = None  # of the QEMU that will run the command line
    hosts: list[list[str]] = field(default_factory=list)  # sysbus PCI hosts: their root buses
    buses: dict[str, _Bus] = field(default_factory=dict)
    devices: dict[str, _Dev] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    anon: int = 0
    #: PCI devices of unknown types: they may create buses with automatic names
    unknown_bus_makers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    viommus: list[VIommu] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)
    option_paths: dict[int, str] = field(default_factory=dict)  # realize rank -> QOM path

    def auto_name(self, bus_type: str) -> str:
        """qbus_init_internal for a bus whose owner has no id: type.N, N per bus type."""
        n = self.counters.get(bus_type, 0)
        self.counters[bus_type] = n + 1
        return f"{bus_type.lower()}.{n}"

    def add_host(self, host_path: str, name: str, bus_type: str, bypass: bool) -> _Bus:
        bus = _Bus(f"{host_path}/{name}", name, bus_type, True, bypass, None)
        self.buses[bus.path] = bus
        self.hosts.append([bus.path])
        return bus

    def add_child_bus(self, owner: _Dev, name: str, bus_type: str) -> _Bus:
        bus = _Bus(f"{owner.path}/{name}", name, bus_type, False, False, owner.path)
        self.buses[bus.path] = bus
        owner.child_buses.append(bus.path)
        return bus

    def search_order(self) -> Iterator[_Bus]:
        """PCI buses in qbus_find_recursive's order: newest host first, then depth first
        with each bus's newest device first."""

        def walk(path: str) -> Iterator[_Bus]:
            bus = self.buses[path]
            yield bus
            for dev_path in reversed(bus.devices):
                for child in reversed(self.devices[dev_path].child_buses):
                    yield from walk(child)

        for host in reversed(self.hosts):
            for path in host:
                yield from walk(path)

    def free_devfn(self, bus: _Bus) -> int | None:
        taken = {self.devices[p].devfn for p in bus.devices}
        return next((d for d in range(0, 256, 8) if d not in taken), None)

    def plug(self, path: str, dtype: str, dev_id: str | None, bus: _Bus, devfn: int | None) -> _Dev:
        if devfn is None:
            devfn = self.free_devfn(bus)
            if devfn is None:
                self.notes.append(f"no free slot on bus {bus.name} for {dtype}")
                devfn = 0
        dev = _Dev(path, dtype, dev_id, bus.path, devfn, None)
        self.devices[path] = dev
        bus.devices.append(path)
        return dev


_AUTO_NAME = re.compile(r"(pci|pcie|pxb-pcie-bus)\.\d+")


def _resolve_bus(b: _Build, cd: CliDevice) -> tuple[_Bus | None, str | None, tuple[str, ...]]:
    """The bus QEMU puts this PCI device option on, why that is not certain (if it is
    not), and the other buses carrying the same name."""
    name = cd.prop("bus")
    order = list(b.search_order())
    if name is None:
        return (order[0] if order else None), None, ()
    if "/" in name:
        return None, f"bus={name} is a qdev path, which qmpguard does not follow", ()
    found = [bus for bus in order if bus.name == name]
    doubt: list[str] = []
    if _AUTO_NAME.fullmatch(name):
        if b.unknown_bus_makers:
            doubt.append(
                f"{', '.join(b.unknown_bus_makers)} may create buses, and a bus of a device "
                f"without id gets a name like {name}"
            )
        if b.hidden:
            doubt.append(f"devices qmpguard cannot see may carry the bus name {name}")
    if not found:
        doubt.insert(0, f"no option qmpguard understands creates a bus named {name}")
        return None, "; ".join(doubt), ()
    return found[0], "; ".join(doubt) or None, tuple(bus.path for bus in found[1:])


def _options(argv: list[str]) -> Iterator[tuple[str, str | None]]:
    """(option, value) pairs: cmdline.options, the one walk over a command line."""
    for o in options(argv):
        yield o.name, o.value


def default_devices(m: MachineModel, cli: CliFacts, argv: list[str]) -> list[str]:
    """PCI devices the board creates from other options or defaults (vl.c), in creation
    order: the display adapter, then the NICs (pc_vga_init before pc_nic_init)."""
    opts = list(_options(argv))
    defaults = not any(o == "-nodefaults" for o, _ in opts)
    vga = "VGA" if defaults and m.default_vga else None
    if any(d.driver in _DISPLAY_ADAPTERS for d in cli.devices):
        vga = None
    nics: list[str] = []
    net_given = False
    for opt, value in opts:
        if opt == "-vga" and value is not None:
            model = value.split(",")[0]
            vga = None if model == "none" else _VGA_MODELS.get(model, model)
        elif opt in ("-nic", "-net") and value is not None:
            net_given = True
            kv = keyval(value, "type")
            if (opt == "-nic" and kv.get("type") != "none") or kv.get("type") == "nic":
                nics.append(kv.get("model", m.default_nic or "e1000"))
    if not net_given and defaults and m.default_nic:
        nics = [m.default_nic]
    nics = ["virtio-net-pci" if n == "virtio" else n for n in nics]
    return ([vga] if vga else []) + nics


def _board(b: _Build, cli: CliFacts, argv: list[str]) -> None:
    """What the machine creates before any -device: host, root bus, builtins, defaults."""
    m = b.machine
    opts = cli.machine_opts
    if m.root_auto_named:
        b.auto_name(m.root_type)
    bypass = m.default_bypass and qemu_bool(opts.get("default-bus-bypass-iommu"))
    root = b.add_host(m.host_path, m.root_name, m.root_type, bypass)
    for path, dtype, devfn in m.builtins:
        if m is Q35 and dtype == "ICH9-SMB" and not qemu_bool(opts.get("smbus"), True):
            continue
        if m is Q35 and dtype == "ich9-ahci" and not qemu_bool(opts.get("sata"), True):
            continue
        b.plug(path, dtype, None, root, devfn)
    for n, dtype in enumerate(default_devices(m, cli, argv)):
        b.plug(f"builtin:{dtype}#{n}", dtype, None, root, None)
    if m is ARM_VIRT and opts.get("iommu") == "smmuv3":
        b.viommus.append(_sysbus_viommu(b, "builtin:arm-smmuv3", "arm-smmuv3", root.path, None))


def implicit_devices(argv: list[str]) -> list[CliDevice]:
    """Devices other options create: `-drive if=virtio` adds an anonymous virtio-blk to
    QEMU's key=val device list in configure_blockdev, after the whole command line was
    parsed (so after every key=val and -readconfig device, before the JSON ones)."""
    out: list[CliDevice] = []
    i = 1
    for opt, value in _options(argv):
        if opt == "-drive" and value is not None:
            kv = keyval(value, "file")
            if kv.get("if") == "virtio":
                n = -len(out) - 1  # ranks of implicit devices: negative, never an option's
                source = f"-drive if=virtio (option {i})"
                out.append(CliDevice(n, n, "virtio-blk-pci", None, DeviceSyntax.IMPLICIT, source))
        i += 1
    return out


def realize_order(cli: CliFacts, argv: list[str]) -> list[CliDevice]:
    """Every device QEMU realizes from the command line, in its order (qemu_create_cli_devices:
    the key=val list, implicit devices at its end, then the JSON list)."""
    ranked = sorted(cli.devices, key=lambda d: d.realize_rank)
    keyval_list = [d for d in ranked if not d.syntax.json_list]
    json_list = [d for d in ranked if d.syntax.json_list]
    return keyval_list + implicit_devices(argv) + json_list


def _option_path(b: _Build, cd: CliDevice) -> str:
    """/machine/peripheral/ID, or device[N] for the N-th anonymous option (qdev_set_id)."""
    if cd.id is not None:
        path = f"/machine/peripheral/{cd.id}"
    else:
        path = f"/machine/peripheral-anon/device[{b.anon}]"
        b.anon += 1
    b.option_paths[cd.realize_rank] = path
    return path


def _realize(b: _Build, cd: CliDevice) -> None:
    """One device option, as qdev_device_add realizes it: a sysbus vIOMMU, or a PCI
    device on the bus QEMU picks (types qmpguard does not know: see _unknown_type)."""
    path = _option_path(b, cd)
    driver = canonical_driver(cd.driver)
    if driver in SYSBUS_VIOMMUS:
        _realize_sysbus_viommu(b, cd, path, driver)
        return
    kind = pci_kind(driver)
    if kind is False:
        return
    bus, uncertain, others = _resolve_bus(b, cd)
    if kind is None and not _unknown_type(b, cd, driver, bus):
        return
    devfn = _option_devfn_noted(b, cd, driver)
    if bus is None:
        b.placements.append(Placement(cd, path, None, devfn, uncertain))
        if not _IS_VFIO(driver):
            b.notes.append(f"{driver} ({cd.source}): {uncertain}")
        return
    dev = b.plug(path, driver, cd.id, bus, devfn)
    dev.cli = cd
    b.placements.append(Placement(cd, path, bus.path, dev.devfn, uncertain, others))
    if others:
        b.notes.append(
            f"{driver} ({cd.source}): bus={cd.prop('bus')} names {1 + len(others)} buses; "
            f"QEMU takes the first its search meets (newest first): {bus.path}"
        )
    _realize_below(b, dev, cd, driver, bus)


def _realize_sysbus_viommu(b: _Build, cd: CliDevice, path: str, driver: str) -> None:
    """intel-iommu and amd-iommu translate the main root bus (amdvi_realize also plugs
    its PCI function there); arm-smmuv3 the bus its primary-bus names, which must be
    exactly one bus qmpguard knows, or what it covers is unknown (None)."""
    if driver != "arm-smmuv3":
        main_root = b.machine.root_path
        b.viommus.append(_sysbus_viommu(b, path, driver, main_root, cd))
        if driver == "amd-iommu":
            b.plug(f"builtin:AMDVI-PCI({path})", "AMDVI-PCI", None, b.buses[main_root], None)
        return
    target = (cd.prop("primary-bus") or "").rsplit("/", 1)[-1]
    found = [bus.path for bus in b.buses.values() if bus.name == target]
    if len(found) != 1:
        b.notes.append(f"{driver} ({cd.source}): primary-bus is not one bus qmpguard knows")
    b.viommus.append(_sysbus_viommu(b, path, driver, found[0] if len(found) == 1 else None, cd))


def _unknown_type(b: _Build, cd: CliDevice, driver: str, bus: _Bus | None) -> bool:
    """Whether an option of a type qmpguard does not know is taken for a PCI device: only
    with a bus= that names a PCI bus (then it may create buses with automatic names).
    Without bus= it is most likely no PCI device at all, but if it is one, the slots of
    the devices after it are not certain: a note says so."""
    if bus is not None and cd.prop("bus") is not None:
        b.unknown_bus_makers.append(f"{driver} ({cd.source})")
        return True
    if cd.prop("bus") is None:
        b.notes.append(
            f"{driver} ({cd.source}) is a device type qmpguard does not know: if it is "
            "a PCI device, the slots QEMU picks for devices after it are not certain"
        )
    return False


def _option_devfn_noted(b: _Build, cd: CliDevice, driver: str) -> int | None:
    """The option's devfn (None: QEMU picks a free slot); an addr= qmpguard cannot read
    is noted, since QEMU may put the device somewhere else."""
    addr, devfn = option_devfn(cd)
    if addr is not None and devfn is None:
        b.notes.append(f"{driver} ({cd.source}): addr={addr} is not a PCI address qmpguard reads")
    return devfn


def _realize_below(b: _Build, dev: _Dev, cd: CliDevice, driver: str, bus: _Bus) -> None:
    """What a plugged PCI device creates itself: a bridge its bus, an expander its host
    bridge, virtio-iommu-pci a vIOMMU translating the bus it sits on."""
    if driver in BRIDGE_BUS:
        bus_type = BRIDGE_BUS[driver]
        b.add_child_bus(dev, cd.id or b.auto_name(bus_type), bus_type)
    elif driver in ("pxb", "pxb-pcie"):
        _expander(b, dev, cd)
    elif driver in T.PCI_VIOMMU_TYPES:
        b.viommus.append(VIommu(dev.path, driver, T.VIOMMU_TYPES[driver], bus.path, False))


def _sysbus_viommu(
    b: _Build, path: str, driver: str, covers: str | None, cd: CliDevice | None
) -> VIommu:
    """A sysbus vIOMMU with the model rules check applies (viommu_models), fed from the
    command line's properties and this QEMU's defaults instead of QOM reads; `cd` None:
    the machine created it (virt,iommu=smmuv3)."""
    props = rule_properties(driver, dict(cd.props) if cd else {}, b.version)
    machine_created = cd is None
    return VIommu(
        path,
        driver,
        T.VIOMMU_TYPES[driver],
        covers,
        machine_created,
        refuses_vfio_after(driver, props, machine_created, b.version),
        passthrough(driver, props, b.version),
    )


def _expander(b: _Build, dev: _Dev, cd: CliDevice) -> None:
    """pxb_dev_realize_common: a host bridge with its own root bus, paired with the pxb."""
    bypass = qemu_bool(cd.prop("bypass_iommu"))
    host = f"builtin:pxb-host({dev.id or dev.path})"
    if cd.driver == "pxb-pcie":
        root = b.add_host(host, cd.id or b.auto_name("pxb-pcie-bus"), "pxb-pcie-bus", bypass)
        root.parent_device = dev.path
        return
    root = b.add_host(host, "pxb-internal", "pxb-bus", bypass)
    root.parent_device = dev.path
    bridge = b.plug(f"{host}/pci-bridge", "pci-bridge", None, root, 0)
    b.add_child_bus(bridge, cd.id or b.auto_name("PCI"), "PCI")


# ------------------------------------------------------------------ facts


@dataclass(frozen=True)
class QemuVersion:
    """The version of the QEMU that will run a command line ("11.1.3"), or why it is
    not known: the rules that depend on it then conclude nothing (never a guess)."""

    text: str | None
    missing: str = "no QEMU version given"

    @property
    def parsed(self) -> Version | None:
        return parse_version(self.text)


UNKNOWN_VERSION = QemuVersion(None)


@dataclass(frozen=True)
class Preflight:
    """One command line, understood: its facts for judge(), and what was uncertain."""

    target: str
    argv: tuple[str, ...]
    files: dict[str, str]
    cli: CliFacts
    facts: VmFacts
    placements: tuple[Placement, ...]
    option_paths: dict[int, str]  # realize rank of each device option -> its QOM path
    notes: tuple[str, ...]  # what could not be known (the evidence says it where it matters)
    machine: MachineModel | None
    #: Why devices may exist that qmpguard cannot see (an unreadable -readconfig, an
    #: option it cannot parse): vfio devices among them cannot be judged at all.
    hidden: tuple[str, ...] = ()
    #: Why the QEMU that runs it will refuse to start with this command line.
    refusals: tuple[str, ...] = ()

    version: QemuVersion = UNKNOWN_VERSION

    @property
    def qemu_version(self) -> str | None:
        """The version of the QEMU that will run it ("11.1.3"), None if unknown."""
        return self.version.text

    def analysis(self) -> VmAnalysis:
        """Verdicts and findings, by the same rules as `check`."""
        snap = Snapshot(
            target=self.target,
            transport=TRANSPORT,
            collected_at="",
            qemu_version=self.qemu_version,
            cmdline=list(self.argv),
            files=dict(self.files),
        )
        return judge(self.facts, snap)

    def option_of(self, path: str) -> CliDevice | None:
        """The device option that created the device at QOM path `path`."""
        rank = next((r for r, p in self.option_paths.items() if p == path), None)
        return next((d for d in self.cli.devices if d.realize_rank == rank), None)


def _stand_in(why: str, covers: str | None) -> VIommu:
    """A vIOMMU that may translate a device, created by no option qmpguard sees: order
    evidence about it is inconclusive, so the verdict is unverified, and its label says why."""
    return VIommu(f"? ({why})", "unknown", "unknown", covers, False)


_UNREADABLE = re.compile(r"-readconfig (.*) could not be read")


def _hidden_device_gaps(cli: CliFacts, unreadable: Mapping[str, str]) -> list[str]:
    """Gaps that may hide any device, a vIOMMU included (an option that creates an
    implicit device, -drive if=virtio or -virtfs, cannot)."""
    out = []
    for gap in cli.gaps:
        if "creates an anonymous device implicitly" in gap:
            continue
        m = _UNREADABLE.fullmatch(gap)
        out.append(unreadable.get(m.group(1), gap) if m else gap)
    return out


def target_name(argv: list[str], cli: CliFacts) -> str:
    return f"preflight:{cli.name or os.path.basename(argv[0] if argv else 'qemu')}"


def preflight(
    argv: list[str],
    files: Mapping[str, str] | None = None,
    unreadable: Mapping[str, str] | None = None,
    target: str | None = None,
    version: QemuVersion = UNKNOWN_VERSION,
) -> Preflight:
    """Pure: a QEMU argv (and the text of its -readconfig files) in, facts out.

    `unreadable` maps a -readconfig path to why it could not be read (for the evidence);
    `version`: of the QEMU that will run it (preflight_command finds it).
    """
    files = dict(files or {})
    cli = parse_cmdline(argv, files)
    hidden = _hidden_device_gaps(cli, unreadable or {})
    machine, why_unknown = machine_model(cli.machine_opts.get("type"), argv[0] if argv else "")
    name = target or target_name(argv, cli)
    if machine is None:
        return _unknown_machine(name, argv, files, cli, why_unknown, hidden)
    b = _Build(machine, hidden, version.parsed)
    _board(b, cli, argv)
    for cd in realize_order(cli, argv):
        _realize(b, cd)
    topo = _topology(b)
    bindings = {p: expected_binding(topo, b.viommus, d) for p, d in topo.devices.items()}
    bindings.update(_doubtful_bindings(topo, b, bindings))
    cli_by_path = {b.option_paths[cd.realize_rank]: cd for cd in cli.devices}
    refusals = [*cli.refusals, *_refusals(topo, bindings, cli_by_path, b, version)]
    bindings.update(_version_doubts(topo, bindings, cli_by_path, version))
    notes = [*refusals, *hidden, *b.notes, *_place_unplaced(topo, bindings, b)]
    _hidden_vfio(topo, bindings, hidden)
    facts = VmFacts(
        origin=ORIGIN if version.text is None else f"QEMU {version.text} {ORIGIN[5:]}",
        qemu_version=version.text,
        topology=topo,
        viommus=sorted(b.viommus, key=lambda v: v.path),
        bindings=bindings,
        order=OrderContext(topo, bindings, cli, "", cli_by_path, None),
        bdfs={},
    )
    return Preflight(
        name,
        tuple(argv),
        files,
        cli,
        facts,
        tuple(b.placements),
        dict(b.option_paths),
        tuple(notes),
        machine,
        tuple(hidden),
        tuple(refusals),
        version,
    )


def _doubtful_bindings(
    topo: Topology, b: _Build, bindings: Mapping[str, ExpectedBinding]
) -> dict[str, ExpectedBinding]:
    """Stand-in bindings for the vfio devices whose binding qmpguard cannot be sure of:
    one whose bus is in doubt (_placement_doubt), and, when devices qmpguard cannot see
    may hold a vIOMMU of the main root bus, every one that would otherwise go to memory
    without a bypass (that hidden vIOMMU would translate it)."""
    doubtful: dict[str, ExpectedBinding] = {}
    for placement in b.placements:
        dev = topo.devices.get(placement.path)
        if dev is not None and dev.vfio:
            why = _placement_doubt(topo, b, bindings[dev.path], placement, dev)
            if why is not None:
                doubtful[dev.path] = _doubtful_binding(bindings[dev.path], why, dev)
    if b.hidden and not any(v.covers == topo.main_root for v in b.viommus):
        why = f"a vIOMMU may be among the devices qmpguard cannot see ({b.hidden[0]})"
        for path, dev in topo.devices.items():
            binding = bindings[path]
            if dev.vfio and binding.kind is BindingKind.MEMORY and binding.bypass_root is None:
                doubtful.setdefault(path, _doubtful_binding(binding, why, dev))
    return doubtful


def _place_unplaced(topo: Topology, bindings: dict[str, ExpectedBinding], b: _Build) -> list[str]:
    """Each vfio option on no bus qmpguard knows goes into the report on a bus of its own
    (_place_unknown), since it must not vanish from it; returns the note for each."""
    notes = []
    for placement in b.placements:
        if placement.bus is None and _IS_VFIO(placement.option.driver):
            why = placement.uncertain or "its bus is unknown"
            notes.append(f"{placement.option.driver} ({placement.option.source}): {why}")
            _place_unknown(topo, bindings, placement, why, bool(b.viommus or b.hidden))
    return notes


def _realized_after(
    cli_by_path: Mapping[str, CliDevice], dev: PciDevice, viommu: VIommu
) -> bool | None:
    """Whether the command line realizes `dev` after `viommu` (None: not both options)."""
    if viommu.machine_created:
        return True
    cd, cv = cli_by_path.get(dev.path), cli_by_path.get(viommu.path)
    if cd is None or cv is None:
        return None
    return cd.realize_rank > cv.realize_rank


#: TYPE_VFIO_PCI and its subtype: what intel-iommu's machine-done check looks for (not
#: vfio-user-pci, a sibling).
_VFIO_PCI = frozenset({"vfio-pci", "vfio-pci-nohotplug"})


def _refusals(
    topo: Topology,
    bindings: Mapping[str, ExpectedBinding],
    cli_by_path: Mapping[str, CliDevice],
    b: _Build,
    version: QemuVersion,
) -> list[str]:
    """Why this QEMU will refuse to start, by the model rules check uses (viommu_models):
    a vfio device realized after a vIOMMU that refuses it, or a vIOMMU that makes QEMU
    exit whenever vfio-pci exists. A running VM never shows these; a command line can."""
    out = []
    qemu = f"QEMU {version.text}"
    for path, dev in topo.devices.items():
        v = bindings[path].viommu
        if not dev.vfio or v is None or not _realized_after(cli_by_path, dev, v):
            continue
        cd = cli_by_path.get(v.path)
        why = v.refuses_vfio_after or (
            refuses_vfio_after_on_every_version(v.type, dict(cd.props) if cd else {})
            if b.version is None
            else None
        )
        if why is not None:
            who = qemu if b.version is not None else "QEMU"
            out.append(
                f"{who} will refuse to start: {dev.label} is realized after {v.label} "
                f"({why.split(', so ')[0]})"
            )
    vfio_pci = [d.label for d in topo.devices.values() if d.type in _VFIO_PCI]
    for v in b.viommus:
        cd = cli_by_path.get(v.path)
        props = rule_properties(v.type, dict(cd.props) if cd else {}, b.version)
        why = exits_with_vfio(v.type, props, b.version)
        if why is not None and vfio_pci:
            out.append(f"{qemu} will refuse to start ({', '.join(vfio_pci)}): {why}")
    return out


def _version_doubts(
    topo: Topology,
    bindings: Mapping[str, ExpectedBinding],
    cli_by_path: Mapping[str, CliDevice],
    version: QemuVersion,
) -> dict[str, ExpectedBinding]:
    """Without the QEMU version, a vfio device realized after a vIOMMU whose rules depend
    on it is unverified, with both reasons: whether QEMU starts, and whether the guest's
    IOMMU translates the device, differ between versions. One realized before it is
    misbound on every version that starts it, so that verdict stands."""
    if version.text is not None:
        return {}
    out = {}
    for path, dev in topo.devices.items():
        binding = bindings[path]
        v = binding.viommu
        if not dev.vfio or v is None or binding.kind is not BindingKind.VIOMMU:
            continue
        cd = cli_by_path.get(v.path)
        why = version_matters(v.type, dict(cd.props) if cd else {})
        if why is not None and _realized_after(cli_by_path, dev, v):
            label = f"the QEMU version is unknown ({version.missing}), and {why}"
            out[path] = _doubtful_binding(binding, label, dev)
    return out


HIDDEN_VFIO = "(any vfio device among those qmpguard cannot see)"


def _hidden_vfio(topo: Topology, bindings: dict[str, ExpectedBinding], hidden: list[str]) -> None:
    """Devices qmpguard cannot see may be vfio devices realized before a vIOMMU: one
    stand-in device says so in the report (QG002, with the reason), never an ok."""
    if not hidden:
        return
    bus = "?:hidden"
    topo.buses[bus] = PciBus(bus, "?", True, True, False, None, (HIDDEN_VFIO,))
    dev = replace(_pci_device(HIDDEN_VFIO, "vfio-pci", None, bus, 0, 0, None), type="unknown")
    topo.devices[HIDDEN_VFIO] = replace(dev, vfio=True)
    why = "; ".join(hidden)
    bindings[HIDDEN_VFIO] = ExpectedBinding(
        BindingKind.VIOMMU, _stand_in(why, None), Requester(bus, 0)
    )


def _placement_doubt(
    topo: Topology,
    b: _Build,
    binding: ExpectedBinding,
    placement: Placement,
    dev: PciDevice,
) -> str | None:
    """Why this vfio device's binding is not certain; None if it is (also when its bus is
    in doubt but every bus it could be on gives it the same binding)."""
    if placement.uncertain is None:
        return None
    outcomes = {(binding.kind, binding.viommu.path if binding.viommu else None)}
    for bus in topo.buses:
        moved = expected_binding(topo, b.viommus, replace(dev, bus=bus))
        outcomes.add((moved.kind, moved.viommu.path if moved.viommu else None))
    if b.hidden:  # a hidden expander may bypass the vIOMMU
        outcomes.add((BindingKind.MEMORY, None))
    if len(outcomes) == 1:
        return None
    return f"the bus of {dev.label} cannot be known without QEMU: {placement.uncertain}"


def _doubtful_binding(real: ExpectedBinding, why: str, dev: PciDevice) -> ExpectedBinding:
    requester = real.requester or Requester(dev.bus, dev.devfn)
    covers = real.viommu.covers if real.viommu else None
    return ExpectedBinding(BindingKind.VIOMMU, _stand_in(why, covers), requester)


def _place_unknown(
    topo: Topology,
    bindings: dict[str, ExpectedBinding],
    placement: Placement,
    why: str,
    viommu_possible: bool,
) -> None:
    """A vfio device whose bus qmpguard cannot find: in the report on a bus of its own,
    unverified with the reason if a vIOMMU may translate it (ok if no vIOMMU exists)."""
    cd = placement.option
    bus_path = f"?:{cd.prop('bus') or 'unknown bus'}"
    devfn = placement.devfn or 0
    dev = _pci_device(placement.path, cd.driver, cd.id, bus_path, devfn, 0, cd)
    topo.buses[bus_path] = PciBus(bus_path, "?", True, True, False, None, (dev.path,))
    topo.devices[dev.path] = dev
    if viommu_possible:
        label = f"{dev.label} is on a bus qmpguard cannot place: {why}"
        bindings[dev.path] = ExpectedBinding(
            BindingKind.VIOMMU, _stand_in(label, None), Requester(bus_path, devfn)
        )
    else:
        bindings[dev.path] = expected_binding(topo, [], dev)


def _pci_device(
    path: str,
    dtype: str,
    dev_id: str | None,
    bus: str,
    devfn: int,
    index: int,
    cd: CliDevice | None,
    bridge: bool = False,
) -> PciDevice:
    virtio = is_virtio_pci(dtype)
    platform = cd.prop("iommu_platform") if cd is not None else None
    return PciDevice(
        path=path,
        id=dev_id if path.startswith("/machine/peripheral/") else None,
        type=dtype,
        bus=bus,
        devfn=devfn,
        creation_index=index,
        hotplugged=False,
        vfio=_IS_VFIO(dtype),
        virtio=virtio,
        iommu_platform=qemu_bool(platform) if virtio else None,
        pcie_to_pci_bridge=dtype in T.PCIE_TO_PCI_BRIDGE_TYPES,
        viommu_kind=T.VIOMMU_TYPES.get(dtype),
        bridge=bridge,
    )


def _topology(b: _Build) -> Topology:
    topo = Topology(main_root=b.machine.root_path)
    for bus in b.buses.values():
        topo.buses[bus.path] = PciBus(
            bus.path,
            bus.type,
            bus.express,
            bus.root,
            bus.bypass,
            bus.parent_device,
            tuple(bus.devices),
        )
        for index, path in enumerate(bus.devices):
            dev = b.devices[path]
            bridge = bool(dev.child_buses) or dev.type in T.PXB_TYPES
            topo.devices[path] = _pci_device(
                path, dev.type, dev.id, bus.path, dev.devfn, index, dev.cli, bridge
            )
    return topo


def _unknown_machine(
    name: str,
    argv: list[str],
    files: dict[str, str],
    cli: CliFacts,
    why: str,
    hidden: list[str],
) -> Preflight:
    """No model of the machine: every vfio device is reported, unverified, with why."""
    root = "?:unknown machine"
    topo = Topology(main_root=root)
    bindings: dict[str, ExpectedBinding] = {}
    option_paths: dict[int, str] = {}
    members: list[str] = []
    anon = 0
    label = f"{why}: its buses and vIOMMUs cannot be told without QEMU"
    for cd in realize_order(cli, argv):
        if cd.id is None:
            path, anon = f"/machine/peripheral-anon/device[{anon}]", anon + 1
        else:
            path = f"/machine/peripheral/{cd.id}"
        option_paths[cd.realize_rank] = path
        if not _IS_VFIO(cd.driver):
            continue
        devfn = option_devfn(cd)[1] or 0
        topo.devices[path] = _pci_device(path, cd.driver, cd.id, root, devfn, len(members), cd)
        members.append(path)
        bindings[path] = ExpectedBinding(
            BindingKind.VIOMMU, _stand_in(label, root), Requester(root, devfn)
        )
    topo.buses[root] = PciBus(root, "?", True, True, False, None, tuple(members))
    _hidden_vfio(topo, bindings, hidden)
    cli_by_path = {option_paths[cd.realize_rank]: cd for cd in cli.devices}
    order = OrderContext(topo, bindings, cli, "", cli_by_path, None)
    facts = VmFacts(ORIGIN, None, topo, [], bindings, order, {})
    notes = (*cli.refusals, why, *hidden)
    return Preflight(
        name, tuple(argv), files, cli, facts, (), option_paths, notes, None, tuple(hidden)
    )


# ------------------------------------------------------------------ reading -readconfig files


def read_config_file(path: str, cwd: str | None = None) -> str:
    """A -readconfig file's text: a regular UTF-8 file of at most 1 MiB (OSError/ValueError
    with the reason otherwise). Opened non-blocking, checked on the open descriptor."""
    full = path if os.path.isabs(path) or cwd is None else os.path.join(cwd, path)
    fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def read_config_files(
    argv: list[str], cwd: str | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """Every -readconfig file of `argv` that can be read, and why the others cannot."""
    files: dict[str, str] = {}
    problems: dict[str, str] = {}
    for path in readconfig_paths(argv):
        try:
            files[path] = read_config_file(path, cwd)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems[path] = f"-readconfig {path} could not be read ({reason})"
    return files, problems
