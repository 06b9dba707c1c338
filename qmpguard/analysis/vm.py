"""Analyse one snapshot: topology, vIOMMUs, bindings, order, verdicts and findings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qmpguard.analysis.binding import ExpectedBinding, expected_binding
from qmpguard.analysis.findings import RULES, Finding
from qmpguard.analysis.identity import VmIdentity, vm_identity
from qmpguard.analysis.model import NO_ORDER, BindingKind, OrderEvidence, Relative, Verdict
from qmpguard.analysis.mtree import parse_mtree_f
from qmpguard.analysis.order import OrderContext, order_context, order_of
from qmpguard.analysis.reads import placed_topology
from qmpguard.analysis.topology import PciDevice, Topology
from qmpguard.analysis.viommu import VIommu, find_viommus
from qmpguard.qemu_names import HMP_MTREE
from qmpguard.snapshot import Snapshot


@dataclass(frozen=True)
class DeviceAnalysis:
    """One PCI device with its expected binding, order evidence and verdict."""

    device: PciDevice
    binding: ExpectedBinding
    order: OrderEvidence
    verdict: Verdict
    bdf: str | None


UNNAMED = VmIdentity("unnamed VM")


@dataclass(frozen=True)
class VmFacts:
    """What is known about one VM before any verdict, from a live snapshot or from a
    command line (preflight): the same rules judge both."""

    origin: str  # for evidence: "QEMU 10.0.2 (qmp-unix)", "command line (no QEMU)"
    qemu_version: str | None
    topology: Topology
    viommus: list[VIommu]
    bindings: dict[str, ExpectedBinding]
    order: OrderContext
    bdfs: dict[str, str]
    identity: VmIdentity = UNNAMED


@dataclass(frozen=True)
class VmAnalysis:
    """Everything qmpguard concludes about one VM."""

    facts: VmFacts
    snapshot: Snapshot | None
    devices: list[DeviceAnalysis]
    findings: list[Finding]

    @property
    def topology(self) -> Topology:
        return self.facts.topology

    @property
    def viommus(self) -> list[VIommu]:
        return self.facts.viommus

    @property
    def qemu_version(self) -> str | None:
        return self.facts.qemu_version

    @property
    def identity(self) -> VmIdentity:
        return self.facts.identity


_BY_ORDER = {
    Relative.BEFORE: Verdict.MISBOUND,
    Relative.AFTER: Verdict.OK,
    Relative.UNKNOWN: Verdict.UNVERIFIED,
}


def _verdict(dev: PciDevice, binding: ExpectedBinding, order: OrderEvidence) -> Verdict:
    if not dev.vfio:
        return Verdict.NOT_APPLICABLE
    if binding.kind is BindingKind.MEMORY:
        return Verdict.OK
    return _BY_ORDER[order.relative]


@dataclass(frozen=True)
class PciFunction:
    """One function query-pci lists: where the guest's firmware numbered it."""

    bus: int
    slot: int
    function: int
    qdev_id: str | None  # set for named devices only

    @property
    def devfn(self) -> int:
        return (self.slot << 3) | self.function

    @property
    def bdf(self) -> str:
        """Guest-visible bus:slot.function, e.g. '01:00.0'."""
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"


def guest_bdfs(snap: Snapshot, topo: Topology) -> dict[str, str]:
    """Guest-visible BDFs from query-pci, for devices the firmware has numbered.

    query-pci has no QOM paths; devices are matched by qdev id, which only named
    devices have. Anonymous devices on the main root bus are matched by devfn.
    """
    by_id = {d.id: d for d in topo.devices.values() if d.id}
    root_by_devfn = {d.devfn: d for d in topo.devices.values() if d.bus == topo.main_root}
    out: dict[str, str] = {}
    for fn in query_pci_functions(snap.get_or([], "query-pci")):
        dev = by_id.get(fn.qdev_id) if fn.qdev_id else None
        if dev is None and fn.bus == 0:
            dev = root_by_devfn.get(fn.devfn)
        if dev is not None:
            out[dev.path] = fn.bdf
    return out


def query_pci_functions(reply: object) -> list[PciFunction]:
    """Every well-formed function of a query-pci reply, each bridge's functions right
    after the bridge; a bridge whose secondary bus is not numbered yet (0) hides its own.
    Malformed entries are skipped: BDFs are shown, never reasoned about."""
    out: list[PciFunction] = []
    for bus in reply if isinstance(reply, list) else []:
        if isinstance(bus, dict) and isinstance(bus.get("bus"), int):
            out += _bus_functions(bus["bus"], bus.get("devices"))
    return out


def _bus_functions(bus_no: int, devices: object) -> list[PciFunction]:
    """The functions on bus `bus_no` and, depth first, behind its numbered bridges."""
    out: list[PciFunction] = []
    for entry in devices if isinstance(devices, list) else []:
        if not isinstance(entry, dict):
            continue
        slot, fn, qid = entry.get("slot"), entry.get("function"), entry.get("qdev_id")
        if not isinstance(slot, int) or not isinstance(fn, int):
            continue
        out.append(PciFunction(bus_no, slot, fn, qid if isinstance(qid, str) else None))
        bridge = entry.get("pci_bridge")
        secondary = _secondary_bus(bridge)
        if secondary is not None and isinstance(bridge, dict):
            out += _bus_functions(secondary, bridge.get("devices"))
    return out


def _secondary_bus(bridge: object) -> int | None:
    """A query-pci bridge's secondary bus number once the firmware has set it (> 0)."""
    bus = bridge.get("bus") if isinstance(bridge, dict) else None
    secondary = bus.get("secondary") if isinstance(bus, dict) else None
    return secondary if isinstance(secondary, int) and secondary > 0 else None


def snapshot_facts(snap: Snapshot) -> VmFacts:
    """The facts of a live VM's snapshot (ReplyShapeError if a reply has the wrong shape)."""
    topo = placed_topology(snap)
    viommus = find_viommus(snap, topo)
    bindings = {p: expected_binding(topo, viommus, d) for p, d in topo.devices.items()}
    mtree = parse_mtree_f(snap.get_or("", "human-monitor-command", **{"command-line": HMP_MTREE}))
    return VmFacts(
        origin=f"QEMU {snap.qemu_version or 'version unknown'} ({snap.transport})",
        qemu_version=snap.qemu_version,
        identity=vm_identity(snap),
        topology=topo,
        viommus=viommus,
        bindings=bindings,
        order=order_context(snap, topo, bindings, mtree),
        bdfs=guest_bdfs(snap, topo),
    )


def judge(facts: VmFacts, snap: Snapshot | None = None) -> VmAnalysis:
    """Pure: every verdict and finding from the facts, wherever they came from."""
    devices = []
    for path, dev in facts.topology.devices.items():
        binding = facts.bindings[path]
        order = order_of(facts.order, dev) if binding.kind is BindingKind.VIOMMU else NO_ORDER
        verdict = _verdict(dev, binding, order)
        devices.append(DeviceAnalysis(dev, binding, order, verdict, facts.bdfs.get(path)))
    devices.sort(key=lambda d: (d.device.bus, d.device.devfn))
    vm = VmAnalysis(facts, snap, devices, [])
    findings = [
        replace(f, evidence=(*f.evidence, facts.origin)) for rule in RULES for f in rule(vm)
    ]
    return replace(vm, findings=findings)


def analyse(snap: Snapshot) -> VmAnalysis:
    """Pure: a Snapshot in, every verdict and finding out."""
    return judge(snapshot_facts(snap), snap)
