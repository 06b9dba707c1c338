"""Was a device realized before or after the vIOMMU that translates its bus? With evidence.

Sources (docs/design.md, "Order evidence"): hotplugged, the machine creating the vIOMMU,
the QEMU command line, per-bus creation order, and vIOMMU address-space creation order in
`info mtree -f` (as_order.py).
A source either concludes (`before`/`after`) or says why it cannot; conflicting
conclusions give `unknown`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qmpguard.analysis.as_order import as_order_evidence
from qmpguard.analysis.binding import ExpectedBinding
from qmpguard.analysis.cmdline import CliDevice, CliFacts, parse_cmdline
from qmpguard.analysis.model import Evidence, EvidenceSource, OrderEvidence, Relative, combine
from qmpguard.analysis.mtree import AddressSpaceEntry
from qmpguard.analysis.shape import qom_list
from qmpguard.analysis.topology import PciDevice, Topology
from qmpguard.analysis.viommu import VIommu
from qmpguard.qemu_names import child_type
from qmpguard.snapshot import Snapshot


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
    src = EvidenceSource.CMDLINE
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
    relation = Relative.BEFORE if cd.realize_rank < cv.realize_rank else Relative.AFTER
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
        EvidenceSource.BUS_ORDER,
        Relative.BEFORE if before else Relative.AFTER,
        f"on bus {dev.bus}: {dev.label} is child[{dev.creation_index}], "
        f"{viommu.label} is child[{vdev.creation_index}]",
    )


def order_context(
    snap: Snapshot,
    topo: Topology,
    bindings: dict[str, ExpectedBinding],
    mtree: list[AddressSpaceEntry] | None,
) -> OrderContext:
    """The order inputs a live snapshot gives: its QEMU's command line, matched to QOM."""
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
    """Order evidence for one device translated by a vIOMMU: what QEMU's rules fix, then
    the command line, the bus order and (for vfio devices) the address-space order."""
    binding = ctx.bindings[dev.path]
    viommu = binding.viommu
    if viommu is None or viommu.path == dev.path:
        return OrderEvidence(Relative.UNKNOWN, ())
    evidence = [*fixed_order(dev, viommu), _cmdline_evidence(ctx, dev, viommu)]
    bus_order = _bus_order_evidence(ctx, dev, viommu)
    if bus_order:
        evidence.append(bus_order)
    if dev.vfio:
        evidence.append(as_order_evidence(ctx.topo, ctx.bindings, ctx.mtree, dev, viommu))
    return combine(evidence)


def fixed_order(dev: PciDevice, viommu: VIommu) -> list[Evidence]:
    """The order QEMU's own rules fix, whatever the command line says: a hot-plugged device
    comes after every vIOMMU, a vIOMMU the machine creates comes before every device, and
    a vfio device that runs behind a vIOMMU refusing later ones came before it."""
    found = (_hotplugged(dev), _created_with_machine(viommu), _refused_after(dev, viommu))
    return [e for e in found if e is not None]


def _hotplugged(dev: PciDevice) -> Evidence | None:
    if not dev.hotplugged:
        return None
    detail = "hot-plugged after machine init; a vIOMMU cannot be"
    return Evidence(EvidenceSource.HOTPLUGGED, Relative.AFTER, detail)


def _created_with_machine(viommu: VIommu) -> Evidence | None:
    if not viommu.machine_created:
        return None
    detail = f"{viommu.type} is created with the machine, before any device"
    return Evidence(EvidenceSource.MACHINE_VIOMMU, Relative.AFTER, detail)


def _refused_after(dev: PciDevice, viommu: VIommu) -> Evidence | None:
    if not dev.vfio or viommu.refuses_vfio_after is None:
        return None
    return Evidence(EvidenceSource.REFUSED_ORDER, Relative.BEFORE, viommu.refuses_vfio_after)
