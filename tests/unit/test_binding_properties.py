"""Property test: the binding walk vs a straightforward reference of DOMAIN.md §2.

Random topologies: root buses (main host, expander roots with or without bypass),
bridges of each kind (root port, PCIe-to-PCI, pci-bridge), endpoints, vIOMMUs that
translate the main root bus or a root bus of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from qmpguard.analysis.binding import expected_binding
from qmpguard.analysis.topology import PciBus, PciDevice, Topology
from qmpguard.analysis.viommu import VIommu

BRIDGE_KINDS = ("root-port", "pcie-pci-bridge", "pci-bridge")


@dataclass
class Spec:
    """A generated topology: bridges as (kind, parent index) and endpoints as parent indices."""

    bridges: list[tuple[str, int]]
    endpoints: list[int]
    pxb_bypass: bool
    viommu_on_main: bool


specs = st.builds(
    Spec,
    bridges=st.lists(st.tuples(st.sampled_from(BRIDGE_KINDS), st.integers(0, 30)), max_size=8),
    endpoints=st.lists(st.integers(0, 30), min_size=1, max_size=10),
    pxb_bypass=st.booleans(),
    viommu_on_main=st.booleans(),
)


def build(spec: Spec) -> tuple[Topology, list[VIommu]]:
    """Bus 0: main root (express). Bus 1: an expander root behind pxb device on bus 0."""
    buses: dict[str, dict[str, object]] = {
        "main": dict(express=True, root=True, bypass=False, parent=None),
        "pxbroot": dict(express=True, root=True, bypass=spec.pxb_bypass, parent="/pxb"),
    }
    devices: dict[str, PciDevice] = {}
    slots: dict[str, int] = {"main": 1, "pxbroot": 0}

    def add(path: str, dtype: str, bus: str, pcie_to_pci: bool = False) -> None:
        devfn = slots[bus] << 3
        slots[bus] += 1
        devices[path] = PciDevice(
            path=path,
            id=None,
            type=dtype,
            bus=bus,
            devfn=devfn,
            creation_index=slots[bus],
            hotplugged=False,
            vfio=False,
            virtio=False,
            iommu_platform=None,
            pcie_to_pci_bridge=pcie_to_pci,
            viommu_kind=None,
        )

    add("/pxb", "pxb-pcie", "main")
    bus_names = ["main", "pxbroot"]
    for i, (kind, parent_idx) in enumerate(spec.bridges):
        parent_bus = bus_names[parent_idx % len(bus_names)]
        if slots[parent_bus] >= 31:
            continue
        dev = f"/br{i}"
        add(dev, kind, parent_bus, pcie_to_pci=(kind == "pcie-pci-bridge"))
        sec = f"sec{i}"
        buses[sec] = dict(express=(kind == "root-port"), root=False, bypass=False, parent=dev)
        slots[sec] = 0
        bus_names.append(sec)
    for i, parent_idx in enumerate(spec.endpoints):
        bus = bus_names[parent_idx % len(bus_names)]
        if slots[bus] < 31:
            add(f"/ep{i}", "e1000", bus)
    topo = Topology(main_root="main")
    for name, b in buses.items():
        topo.buses[name] = PciBus(
            path=name,
            type="PCIE" if b["express"] else "PCI",
            express=bool(b["express"]),
            root=bool(b["root"]),
            bypass_iommu=bool(b["bypass"]),
            parent_device=b["parent"],  # type: ignore[arg-type]
            devices=tuple(p for p, d in devices.items() if d.bus == name),
        )
    topo.devices.update(devices)
    covers = "main" if spec.viommu_on_main else "pxbroot"
    viommu = VIommu(
        path="/iommu",
        type="intel-iommu",
        kind="intel",
        covers=covers,
        machine_created=False,
    )
    return topo, [viommu]


def reference(topo: Topology, viommu: VIommu, dev: PciDevice) -> tuple[str, str | None, int | None]:
    """DOMAIN.md §2 read literally: list the crossings up to the vIOMMU's bus, last one wins."""
    path_up = []  # (bus, parent device) pairs from the device's bus towards the root
    bus = topo.buses[dev.bus]
    while bus.path != viommu.covers and bus.parent_device is not None:
        parent = topo.devices[bus.parent_device]
        path_up.append((bus, parent))
        bus = topo.buses[parent.bus]
    if bus.path != viommu.covers:
        return ("memory", None, None)
    requester = (dev.bus, dev.devfn)
    for crossed, parent in path_up:  # nearest the root is last: it overwrites the others
        if not crossed.express:
            if parent.type == "pcie-pci-bridge":
                requester = (crossed.path, 0)
            else:
                requester = (parent.bus, parent.devfn)
    root = topo.buses[requester[0]]
    while not root.root:
        root = topo.buses[topo.devices[root.parent_device].bus]  # type: ignore[index]
    if root.bypass_iommu:
        return ("memory", None, None)
    return ("viommu", requester[0], requester[1])


@settings(max_examples=400, deadline=None)
@given(specs)
def test_binding_matches_reference(spec: Spec) -> None:
    topo, viommus = build(spec)
    for dev in topo.devices.values():
        got = expected_binding(topo, viommus, dev)
        ref = reference(topo, viommus[0], dev)
        assert got.kind == ref[0], (dev.path, got.reason)
        if got.requester is not None:
            assert (got.requester.bus, got.requester.devfn) == ref[1:]
