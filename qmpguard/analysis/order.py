"""Was a device realized before or after the vIOMMU that translates its bus? With evidence.

Sources (DOMAIN.md §4): hotplugged, the machine creating the vIOMMU, the QEMU command
line, per-bus creation order, and vIOMMU address-space creation order in `info mtree -f`.
A source either concludes (`before`/`after`) or says why it cannot; conflicting
conclusions give `unknown`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from qmpguard.analysis.binding import ExpectedBinding, Requester
from qmpguard.analysis.cmdline import CliDevice, CliFacts, parse_cmdline
from qmpguard.analysis.mtree import AddressSpaceEntry, IommuSpace, viommu_spaces
from qmpguard.analysis.shape import qom_list
from qmpguard.analysis.topology import PciDevice, Topology, format_devfn
from qmpguard.analysis.viommu import VIommu
from qmpguard.qemu_types import child_type
from qmpguard.snapshot import Snapshot

Relative = Literal["before", "after", "unknown"]


@dataclass(frozen=True)
class Evidence:
    """One source's statement. `conclusion` None means the source could not decide."""

    source: str  # hotplugged | machine-viommu | cmdline | bus-order | iommu-as-order
    conclusion: Literal["before", "after"] | None
    detail: str


@dataclass(frozen=True)
class OrderEvidence:
    """Realize order of a device relative to its vIOMMU, with every source's statement."""

    relative: Relative
    evidence: tuple[Evidence, ...]

    @property
    def conflicting(self) -> bool:
        return len({e.conclusion for e in self.evidence if e.conclusion}) > 1


def combine(evidence: list[Evidence]) -> OrderEvidence:
    """`before`/`after` when every conclusive source agrees; `unknown` otherwise."""
    conclusions = {e.conclusion for e in evidence if e.conclusion}
    relative: Relative = conclusions.pop() if len(conclusions) == 1 else "unknown"
    return OrderEvidence(relative, tuple(evidence))


@dataclass
class OrderContext:
    """Everything order analysis needs, derived once per snapshot."""

    topo: Topology
    bindings: dict[str, ExpectedBinding]
    cli: CliFacts | None
    cli_missing: str
    cli_by_path: dict[str, CliDevice]
    mtree: list[AddressSpaceEntry] | None


def _anonymous_devices(snap: Snapshot) -> dict[int, tuple[str, str | None]]:
    """/machine/peripheral-anon/device[N] by N: (QOM path, type)."""
    out = {}
    for name, etype in qom_list(snap, "/machine/peripheral-anon"):
        if m := re.fullmatch(r"device\[(\d+)\]", name):
            out[int(m.group(1))] = (f"/machine/peripheral-anon/{name}", child_type(etype))
    return out


def match_cli_devices(snap: Snapshot, cli: CliFacts) -> dict[str, CliDevice]:
    """QOM path -> the device option that created it, only where that is certain.

    Named devices by id (ids are unique). Anonymous ones: QEMU names the k-th anonymous
    device it creates device[k] (a counter that is never reused, qdev_set_id), so the
    k-th anonymous option in realize order is device[k] -- if the command line shows every
    device (no gaps) and QOM confirms every type. Unplugged devices leave holes; hot-plugged
    ones take later numbers. Any disagreement: no anonymous match at all.
    """
    out = {f"/machine/peripheral/{d.id}": d for d in cli.devices if d.id}
    if not cli.complete:
        return out
    anon_cli = sorted((d for d in cli.devices if not d.id), key=lambda d: d.realize_rank)
    qom = _anonymous_devices(snap)
    matched = {}
    for k, dev in enumerate(anon_cli):
        if k not in qom:
            continue  # unplugged since
        path, qtype = qom[k]
        if qtype != dev.driver:
            return out
        matched[path] = dev
    return out | matched


def _describe(d: CliDevice) -> str:
    return f"{d.driver} ({d.source})"


def _cmdline_evidence(ctx: OrderContext, dev: PciDevice, viommu: VIommu) -> Evidence:
    src = "cmdline"
    if ctx.cli is None:
        return Evidence(src, None, f"QEMU command line not available ({ctx.cli_missing})")
    if dev.hotplugged:
        return Evidence(src, None, f"{dev.label} was hot-plugged: no option created it")
    cd, cv = ctx.cli_by_path.get(dev.path), ctx.cli_by_path.get(viommu.path)
    if cd is None or cv is None:
        missing = dev.label if cd is None else viommu.label
        gaps = f" ({'; '.join(ctx.cli.gaps)})" if ctx.cli.gaps else ""
        return Evidence(src, None, f"{missing} cannot be matched to a device option{gaps}")
    mixed = (
        " (QEMU realizes every key=val and -readconfig device before the JSON ones)"
        if cd.syntax.json_list != cv.syntax.json_list
        else ""
    )
    relation: Literal["before", "after"] = (
        "before" if cd.realize_rank < cv.realize_rank else "after"
    )
    return Evidence(
        src,
        relation,
        f"{_describe(cd)} is realized {relation} {_describe(cv)}{mixed}",
    )


def _bus_order_evidence(ctx: OrderContext, dev: PciDevice, viommu: VIommu) -> Evidence | None:
    vdev = ctx.topo.devices.get(viommu.path)
    if vdev is None or vdev.bus != dev.bus:
        return None
    before = dev.creation_index < vdev.creation_index
    return Evidence(
        "bus-order",
        "before" if before else "after",
        f"on bus {dev.bus}: {dev.label} is child[{dev.creation_index}], "
        f"{viommu.label} is child[{vdev.creation_index}]",
    )


def _processed_before(topo: Topology, a: PciDevice, b: PciDevice) -> bool:
    """At machine-done QEMU inits bus mastering bus by bus (newest bus first), devfn up."""
    if a.bus == b.bus:
        return a.devfn < b.devfn
    return topo.is_descendant(a.bus, b.bus)


def _space_name(kind: str, devfn: int) -> str:
    return f"vtd-{format_devfn(devfn)}" if kind == "intel" else f"virtio-iommu …-{devfn}"


def _as_order_evidence(ctx: OrderContext, dev: PciDevice, viommu: VIommu) -> Evidence:
    src = "iommu-as-order"
    if viommu.kind not in ("intel", "virtio"):
        return Evidence(src, None, f"no address-space naming known for {viommu.type}")
    if ctx.mtree is None:
        return Evidence(src, None, "info mtree -f not available or in an unknown format")
    if dev.hotplugged is not False:
        return Evidence(src, None, "only cold-plugged devices can be placed in the sequence")
    spaces, global_rank = viommu_spaces(ctx.mtree, viommu.kind)
    keys: dict[Requester, list[PciDevice]] = {}
    for path, b in ctx.bindings.items():
        if b.viommu == viommu and b.requester is not None:
            keys.setdefault(b.requester, []).append(ctx.topo.devices[path])
    mine_key = ctx.bindings[dev.path].requester
    assert mine_key is not None
    marker = viommu.kind == "intel"  # intel-iommu creates the IOAPIC's space (devfn 0) itself
    name = _space_name(viommu.kind, mine_key.devfn)
    same_name = [k for k in keys if k.devfn == mine_key.devfn]
    mine = [s for s in spaces if s.devfn == mine_key.devfn]
    if marker and mine_key.devfn == 0:
        return Evidence(src, None, f"{name} is also the vIOMMU's own IOAPIC space")
    if len(mine) != 1 or len(same_name) != 1:
        return Evidence(src, None, f"{len(mine)} address spaces are named {name}: ambiguous")
    me = mine[0]

    def comparable(s: IommuSpace) -> bool:
        return global_rank or s.flatview == me.flatview

    early = {k.devfn for k, devs in keys.items() if k != mine_key and any(d.vfio for d in devs)}
    if marker:
        early.add(0)
    intruders = [s for s in spaces if comparable(s) and s.rank < me.rank and s.devfn not in early]
    if intruders:
        first = _space_name(viommu.kind, intruders[0].devfn)
        return Evidence(
            src,
            "before",
            f"{name} was created after {first}, which only QEMU's machine-done "
            f"pass creates: {dev.label} did not look up its address space in "
            f"realize, so the vIOMMU did not exist yet",
        )
    holders = keys[mine_key]
    for key, devs in keys.items():
        if key == mine_key or key.devfn in early or any(d.hotplugged is not False for d in devs):
            continue
        if not any(all(_processed_before(ctx.topo, d, h) for h in holders) for d in devs):
            continue
        occurrences = [s for s in spaces if s.devfn == key.devfn]
        if occurrences and all(comparable(s) and s.rank > me.rank for s in occurrences):
            other = _space_name(viommu.kind, key.devfn)
            return Evidence(
                src,
                "after",
                f"{name} was created before {other}, which the machine-done pass "
                f"would have created first: {dev.label} looked up its address "
                f"space in realize, after the vIOMMU existed",
            )
    if not global_rank and len({s.flatview for s in spaces}) > 1:
        return Evidence(
            src,
            None,
            f"{viommu.label}'s address spaces are spread over "
            f"{len({s.flatview for s in spaces})} flat views (guest enabled "
            "translation): creation order lost",
        )
    return Evidence(src, None, "both orders predict the same address-space sequence here")


def order_context(
    snap: Snapshot,
    topo: Topology,
    bindings: dict[str, ExpectedBinding],
    mtree: list[AddressSpaceEntry] | None,
) -> OrderContext:
    cli = parse_cmdline(snap.cmdline, snap.files) if snap.cmdline else None
    missing = snap.cmdline_error or ("not a local socket" if snap.pid is None else "unreadable")
    return OrderContext(
        topo=topo,
        bindings=bindings,
        cli=cli,
        cli_missing=missing,
        cli_by_path=match_cli_devices(snap, cli) if cli else {},
        mtree=mtree,
    )


def order_of(ctx: OrderContext, dev: PciDevice) -> OrderEvidence:
    """Order evidence for one device translated by a vIOMMU."""
    binding = ctx.bindings[dev.path]
    viommu = binding.viommu
    if viommu is None or viommu.path == dev.path:
        return OrderEvidence("unknown", ())
    evidence: list[Evidence] = []
    if dev.hotplugged:
        evidence.append(
            Evidence("hotplugged", "after", "hot-plugged after machine init; a vIOMMU cannot be")
        )
    if viommu.machine_created:
        evidence.append(
            Evidence(
                "machine-viommu",
                "after",
                f"{viommu.type} is created with the machine, before any device",
            )
        )
    evidence.append(_cmdline_evidence(ctx, dev, viommu))
    bus_order = _bus_order_evidence(ctx, dev, viommu)
    if bus_order:
        evidence.append(bus_order)
    if dev.vfio:
        evidence.append(_as_order_evidence(ctx, dev, viommu))
    return combine(evidence)
