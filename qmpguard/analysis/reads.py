"""What the analysis still needs to read, decided by the analysis alone (sans I/O).

The collector asks `missing_reads(snapshot)`, sends exactly those commands, records the
replies and asks again until nothing is missing (h11's NEED_DATA, for QMP). The same
functions place the topology for the analysis, so collection and analysis can never
disagree about which reads matter: a rule lives here once.
"""

from __future__ import annotations

from typing import Any

from qmpguard import qemu_names as T
from qmpguard.analysis.cmdline import parse_cmdline
from qmpguard.analysis.locate import locate
from qmpguard.analysis.shape import ReplyShapeError, qom_get
from qmpguard.analysis.topology import Topology, needs_hotplugged_read, with_hotplug
from qmpguard.analysis.viommu import viommu_reads
from qmpguard.qemu_names import HMP_MTREE, HMP_QTREE
from qmpguard.snapshot import Snapshot

Read = tuple[str, dict[str, Any]]

#: Read on every inspection, in one pipelined round: the qdev tree (every device and bus),
#: the containers QOM paths are placed in, the address spaces, guest BDFs, the version.
BASE_READS: tuple[Read, ...] = (
    ("query-version", {}),
    ("query-name", {}),
    ("query-uuid", {}),
    ("human-monitor-command", {"command-line": HMP_QTREE}),
    ("qom-list", {"path": "/"}),
    *(("qom-list", {"path": c}) for c in T.OBJECT_CONTAINERS),
    ("query-pci", {}),
    ("human-monitor-command", {"command-line": HMP_MTREE}),
)


def command_line_ids(snap: Snapshot) -> set[str]:
    """Ids of the devices the command line (and its -readconfig files) creates."""
    if not snap.cmdline:
        return set()
    return {d.id for d in parse_cmdline(snap.cmdline, snap.files).devices if d.id}


def _absent(snap: Snapshot, reads: list[Read]) -> list[Read]:
    return [(cmd, args) for cmd, args in reads if not snap.has(cmd, **args)]


def missing_reads(snap: Snapshot) -> list[Read]:
    """The next round of reads, [] when the snapshot holds everything the analysis uses.

    ReplyShapeError if a reply already recorded is not what QEMU sends.
    """
    base = _absent(snap, list(BASE_READS))
    if base:
        return base
    loc = locate(snap)
    if loc.missing:
        return _absent(snap, loc.missing)
    ids = command_line_ids(snap)
    hotplugged = [
        ("qom-get", {"path": dev.path, "property": "hotplugged"})
        for dev in loc.topology.devices.values()
        if needs_hotplugged_read(dev, ids)
    ]
    return _absent(snap, hotplugged + viommu_reads(snap))


def placed_topology(snap: Snapshot) -> Topology:
    """The VM's PCI topology, placed once per analysis (ReplyShapeError if reads lack)."""
    loc = locate(snap)
    if loc.missing:
        cmd, args = loc.missing[0]
        raise ReplyShapeError(f"snapshot lacks {len(loc.missing)} QOM read(s), e.g. {cmd} {args}")
    topo = loc.topology
    values = {p: qom_get(snap, p, "hotplugged", bool) for p in topo.devices}
    with_hotplug(topo, values, command_line_ids(snap))
    return topo
