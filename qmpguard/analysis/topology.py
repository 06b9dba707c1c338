"""PCI topology from QOM: buses, bridges, devices (parent bus, type, devfn)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


def format_devfn(devfn: int) -> str:
    """devfn 0x48 -> '09.0'."""
    return f"{devfn >> 3:02x}.{devfn & 7}"


@dataclass(frozen=True)
class PciBus:
    """One PCI bus, by QOM path."""

    path: str
    type: str
    express: bool
    root: bool
    bypass_iommu: bool  # root buses: the host bridge's bypass-iommu; others: False
    parent_device: str | None  # bridge device, or the pxb device for an expander root bus
    devices: tuple[str, ...] = ()  # in creation order (child[N] order)


@dataclass(frozen=True)
class PciDevice:
    """One PCI device, by QOM path."""

    path: str
    id: str | None
    type: str
    bus: str
    devfn: int
    creation_index: int  # N of child[N] on its bus: creation order per bus
    hotplugged: bool | None
    vfio: bool
    virtio: bool
    iommu_platform: bool | None
    pcie_to_pci_bridge: bool
    viommu_kind: str | None
    bridge: bool = False  # a PCI bridge or expander: forwards DMA, never initiates it

    @property
    def devfn_text(self) -> str:
        return format_devfn(self.devfn)

    @property
    def label(self) -> str:
        return self.id or self.path


@dataclass
class Topology:
    """Buses and devices of one VM."""

    buses: dict[str, PciBus] = field(default_factory=dict)
    devices: dict[str, PciDevice] = field(default_factory=dict)
    main_root: str | None = None

    def root_of(self, bus_path: str) -> PciBus:
        """The root bus above `bus_path` (the bus itself if it is a root)."""
        bus = self.buses[bus_path]
        seen = set()
        while not bus.root and bus.parent_device and bus.path not in seen:
            seen.add(bus.path)
            bus = self.buses[self.devices[bus.parent_device].bus]
        return bus

    def is_descendant(self, bus_path: str, ancestor: str) -> bool:
        """True if `bus_path` sits (transitively) behind `ancestor`."""
        bus = self.buses[bus_path]
        seen = set()
        while bus.parent_device and bus.path not in seen:
            seen.add(bus.path)
            bus = self.buses[self.devices[bus.parent_device].bus]
            if bus.path == ancestor:
                return True
        return False


def is_builtin(path: str) -> bool:
    """Created by the machine itself (not by -device or device_add): never hot-plugged."""
    return not path.startswith("/machine/peripheral")


def vouched_cold_plugged(dev: PciDevice, cli_ids: set[str]) -> bool:
    """Created by the machine or by a -device option with this id: cold-plugged, unless
    QOM says otherwise (a device re-plugged under the same id)."""
    return is_builtin(dev.path) or (dev.id is not None and dev.id in cli_ids)


def needs_hotplugged_read(dev: PciDevice, cli_ids: set[str]) -> bool:
    """Whether `hotplugged` must be read from QOM: for every device whose order is judged
    (vfio devices, PCI vIOMMUs) and for devices the command line cannot vouch for."""
    if is_builtin(dev.path):
        return False
    return dev.vfio or dev.viommu_kind is not None or not vouched_cold_plugged(dev, cli_ids)


def with_hotplug(topo: Topology, hotplugged: dict[str, bool | None], cli_ids: set[str]) -> None:
    """Fill each device's `hotplugged`: QOM's value where read, else what the command line
    vouches for, else None (unknown)."""
    for path, dev in topo.devices.items():
        value = hotplugged.get(path)
        if value is None and vouched_cold_plugged(dev, cli_ids):
            value = False
        topo.devices[path] = replace(dev, hotplugged=value)
