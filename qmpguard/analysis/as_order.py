"""Order evidence from the creation order of a vIOMMU's address spaces (`info mtree -f`).

vfio-pci asks for its DMA address space in realize; every other device gets its space in
one batch at machine-done (buses newest first, devfn ascending). So if the vIOMMU existed
when the vfio device was realized, the device's space is created early, ahead of the
batch; if not, QEMU creates it inside the batch like everyone else's. qmpguard predicts
where the device's space would sit under each hypothesis and concludes only when the
observed sequence refutes one (docs/design.md, "Address-space order"). Each deduction is
a small function below; the per-model space naming is the table in viommu_models.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpguard.analysis.binding import ExpectedBinding, Requester
from qmpguard.analysis.model import Evidence, EvidenceSource, Relative
from qmpguard.analysis.mtree import AddressSpaceEntry
from qmpguard.analysis.topology import PciDevice, Topology
from qmpguard.analysis.viommu import VIommu
from qmpguard.analysis.viommu_models import SpaceNaming, model

SOURCE = EvidenceSource.IOMMU_AS_ORDER


@dataclass(frozen=True)
class IommuSpace:
    """A vIOMMU per-requester address space: its flat view, creation rank and devfn."""

    flatview: int
    rank: int  # creation order, comparable within `flatview` (everywhere if ranks are global)
    devfn: int


@dataclass(frozen=True)
class Sequence:
    """The observed spaces of one vIOMMU and whether their ranks are a global order."""

    spaces: tuple[IommuSpace, ...]
    global_rank: bool

    def comparable(self, a: IommuSpace, b: IommuSpace) -> bool:
        """Two ranks compare only in one flat view, unless the names carry a counter."""
        return self.global_rank or a.flatview == b.flatview

    def named(self, devfn: int) -> list[IommuSpace]:
        return [s for s in self.spaces if s.devfn == devfn]


def observed_sequence(entries: list[AddressSpaceEntry], naming: SpaceNaming) -> Sequence:
    """The model's spaces in creation order: by name counter if any, else printed order.

    A space is listed once per flat view it belongs to; with a counter, once is enough.
    """
    spaces, seen = [], set()
    for e in entries:
        parsed = naming.parse(naming.subject(e.name, e.root))
        if parsed is None:
            continue
        devfn, counter = parsed
        if counter is None:
            spaces.append(IommuSpace(e.flatview, e.position, devfn))
        elif (key := naming.subject(e.name, e.root)) not in seen:
            seen.add(key)
            spaces.append(IommuSpace(0, counter, devfn))
    counter_ranked = naming.counter_group is not None
    if counter_ranked:
        spaces.sort(key=lambda s: s.rank)
    return Sequence(tuple(spaces), counter_ranked)


def requester_groups(
    bindings: dict[str, ExpectedBinding], topo: Topology, viommu: VIommu
) -> dict[Requester, list[PciDevice]]:
    """The devices behind each requester ID this vIOMMU translates."""
    groups: dict[Requester, list[PciDevice]] = {}
    for path, b in bindings.items():
        if b.viommu == viommu and b.requester is not None:
            groups.setdefault(b.requester, []).append(topo.devices[path])
    return groups


def early_devfns(
    groups: dict[Requester, list[PciDevice]], mine: Requester, naming: SpaceNaming
) -> set[int]:
    """devfns whose spaces may have been created before the batch: other vfio devices'
    (they look theirs up in realize too) and the vIOMMU's own (created in its realize)."""
    early = {k.devfn for k, devs in groups.items() if k != mine and any(d.vfio for d in devs)}
    if naming.own_space_devfn is not None:
        early.add(naming.own_space_devfn)
    return early


def unexplained_devfns(
    seq: Sequence, groups: dict[Requester, list[PciDevice]], naming: SpaceNaming
) -> set[int]:
    """devfns with more spaces than present requesters (and the vIOMMU's own) explain.

    QEMU keeps a vIOMMU's address spaces after a device is unplugged, and names carry no
    bus: such a space could be anyone's, early or late, so it proves nothing.
    """
    wanted: dict[int, int] = {}
    for key in groups:
        wanted[key.devfn] = wanted.get(key.devfn, 0) + 1
    if naming.own_space_devfn is not None:
        wanted[naming.own_space_devfn] = wanted.get(naming.own_space_devfn, 0) + 1
    return {s.devfn for s in seq.spaces if len(seq.named(s.devfn)) > wanted.get(s.devfn, 0)}


def intruder_rule(
    seq: Sequence, me: IommuSpace, early: set[int], naming: SpaceNaming, label: str
) -> Evidence | None:
    """BEFORE if a space only the machine-done batch creates precedes the device's own:
    the device's space was created in the batch, so the vIOMMU did not exist at realize."""
    intruders = [
        s for s in seq.spaces if seq.comparable(s, me) and s.rank < me.rank and s.devfn not in early
    ]
    if not intruders:
        return None
    return Evidence(
        SOURCE,
        Relative.BEFORE,
        f"{naming.display(me.devfn)} was created after {naming.display(intruders[0].devfn)}, "
        f"which only QEMU's machine-done pass creates: {label} did not look up its address "
        "space in realize, so the vIOMMU did not exist yet",
    )


def processed_before(topo: Topology, a: PciDevice, b: PciDevice) -> bool:
    """At machine-done QEMU inits bus mastering bus by bus (newest bus first), devfn up."""
    if a.bus == b.bus:
        return a.devfn < b.devfn
    return topo.is_descendant(a.bus, b.bus)


def latecomer_rule(
    ctx: AsOrderInput, me: IommuSpace, mine: Requester, early: set[int]
) -> Evidence | None:
    """AFTER if a space the batch would have created before the device's own comes after
    it: the device's space was created earlier, in realize, with the vIOMMU in place."""
    holders = ctx.groups[mine]
    for key, devs in ctx.groups.items():
        if key == mine or key.devfn in early or any(d.hotplugged is not False for d in devs):
            continue
        if not any(all(processed_before(ctx.topo, d, h) for h in holders) for d in devs):
            continue
        seen = ctx.seq.named(key.devfn)
        if seen and all(ctx.seq.comparable(s, me) and s.rank > me.rank for s in seen):
            return Evidence(
                SOURCE,
                Relative.AFTER,
                f"{ctx.naming.display(me.devfn)} was created before "
                f"{ctx.naming.display(key.devfn)}, which the machine-done pass would have "
                f"created first: {ctx.label} looked up its address space in realize, after "
                "the vIOMMU existed",
            )
    return None


@dataclass(frozen=True)
class AsOrderInput:
    """What the rules read for one device: its vIOMMU's sequence and requester groups."""

    topo: Topology
    groups: dict[Requester, list[PciDevice]]
    seq: Sequence
    naming: SpaceNaming
    label: str
    viommu_label: str


def _undecided(why: str) -> Evidence:
    return Evidence(SOURCE, None, why)


def _preconditions(
    dev: PciDevice, viommu: VIommu, mtree: list[AddressSpaceEntry] | None
) -> Evidence | None:
    """Why this source cannot speak at all, if it cannot."""
    naming = model(viommu.kind).naming
    if naming is None or not naming.order_checked:
        return _undecided(f"address-space order not established for {viommu.type}")
    if mtree is None:
        return _undecided("info mtree -f not available or in an unknown format")
    if dev.hotplugged is not False:
        return _undecided("only cold-plugged devices can be placed in the sequence")
    return None


def as_order_evidence(
    topo: Topology,
    bindings: dict[str, ExpectedBinding],
    mtree: list[AddressSpaceEntry] | None,
    dev: PciDevice,
    viommu: VIommu,
) -> Evidence:
    """The address-space-order statement for one vfio device behind `viommu`."""
    if (cannot := _preconditions(dev, viommu, mtree)) is not None:
        return cannot
    naming = model(viommu.kind).naming
    assert naming is not None and mtree is not None
    groups = requester_groups(bindings, topo, viommu)
    mine = bindings[dev.path].requester
    assert mine is not None
    seq = observed_sequence(mtree, naming)
    name = naming.display(mine.devfn)
    if mine.devfn == naming.own_space_devfn:
        return _undecided(f"{name} is also the vIOMMU's own space")
    found = seq.named(mine.devfn)
    if len(found) != 1 or sum(k.devfn == mine.devfn for k in groups) != 1:
        return _undecided(f"{len(found)} address spaces are named {name}: ambiguous")
    me = found[0]
    early = early_devfns(groups, mine, naming) | unexplained_devfns(seq, groups, naming)
    ctx = AsOrderInput(topo, groups, seq, naming, dev.label, viommu.label)
    decided = intruder_rule(seq, me, early, naming, dev.label) or latecomer_rule(
        ctx, me, mine, early
    )
    if decided is not None:
        return decided
    views = {s.flatview for s in seq.spaces}
    if not seq.global_rank and len(views) > 1:
        return _undecided(
            f"{viommu.label}'s address spaces are spread over {len(views)} flat views "
            "(guest enabled translation): creation order lost"
        )
    return _undecided("both orders predict the same address-space sequence here")
