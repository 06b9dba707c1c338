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


def guest_bdfs(snap: Snapshot, topo: Topology) -> dict[str, str]:
    """Guest-visible BDFs from query-pci, for devices the firmware has numbered.

    query-pci has no QOM paths; devices are matched by qdev id, which only named
    devices have. Anonymous devices on the main root bus are matched by devfn.
    """
    reply = snap.get_or([], "query-pci")
    out: dict[str, str] = {}
    if not isinstance(reply, list):
        return out
    by_id = {d.id: d for d in topo.devices.values() if d.id}
    root_by_devfn = {d.devfn: d for d in topo.devices.values() if d.bus == topo.main_root}

    def walk(bus_no: int, devices: object) -> None:
        if not isinstance(devices, list):
            return
        for entry in devices:
            if not isinstance(entry, dict):
                continue
            slot, fn, qid = entry.get("slot"), entry.get("function"), entry.get("qdev_id")
            if not isinstance(slot, int) or not isinstance(fn, int):
                continue
            dev = by_id.get(qid) if isinstance(qid, str) and qid else None
            if dev is None and bus_no == 0:
                dev = root_by_devfn.get((slot << 3) | fn)
            if dev is not None:
                out[dev.path] = f"{bus_no:02x}:{slot:02x}.{fn}"
            bridge = entry.get("pci_bridge")
            if isinstance(bridge, dict):
                sec = (
                    bridge.get("bus", {}).get("secondary")
                    if isinstance(bridge.get("bus"), dict)
                    else None
                )
                if isinstance(sec, int) and sec > 0:
                    walk(sec, bridge.get("devices"))

    for bus in reply:
        if isinstance(bus, dict) and isinstance(bus.get("bus"), int):
            walk(bus["bus"], bus.get("devices"))
    return out


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
