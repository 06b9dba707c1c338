"""What the analysis still needs to read, decided by the analysis alone (sans I/O).

The collector asks `missing_reads(snapshot)`, sends exactly those commands, records the
replies and asks again until nothing is missing (h11's NEED_DATA, for QMP). The same
functions place the topology for the analysis, so collection and analysis can never
disagree about which reads matter: a rule lives here once.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qmpguard import qemu_names as T
from qmpguard.analysis.cmdline import parse_cmdline
from qmpguard.analysis.locate import locate
from qmpguard.analysis.shape import ReplyShapeError, qom_get
from qmpguard.analysis.topology import Topology, needs_hotplugged_read, with_hotplug
from qmpguard.analysis.viommu import viommu_reads
from qmpguard.qemu_names import HMP_MTREE, HMP_QTREE
from qmpguard.qmp.allowlist import FORBIDDEN_LIST_GET_PATHS
from qmpguard.snapshot import Snapshot

Read = tuple[str, dict[str, Any]]

#: QEMU 10.1+: qom-list and a qom-get of every property, for many paths in one command.
LIST_GET = "qom-list-get"
#: Read in the base round when batching: whether this QEMU has qom-list-get.
CAPABILITY_READ: Read = ("query-commands", {})

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
    """The reads not yet recorded, each once: the placement asks for an unread bus listing
    once per device it cannot place yet, and a round must not send it that many times."""
    seen: set[str] = set()
    absent = []
    for cmd, args in reads:
        key = json.dumps([cmd, args], sort_keys=True)
        if key not in seen and not snap.has(cmd, **args):
            seen.add(key)
            absent.append((cmd, args))
    return absent


def missing_reads(snap: Snapshot, batch: bool = True) -> list[Read]:
    """The next round of reads, [] when the snapshot holds everything the analysis uses.

    With `batch`, the bus listings of a round go out as one qom-list-get where QEMU has it
    (see `batched`). ReplyShapeError if a reply already recorded is not what QEMU sends.
    """
    base = _absent(snap, [*BASE_READS, *([CAPABILITY_READ] if batch else [])])
    if base:
        return base
    loc = locate(snap)
    if loc.missing:
        reads = _absent(snap, loc.missing)
        return batched(snap, reads) if batch else reads
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


def has_list_get(snap: Snapshot) -> bool:
    """Whether this QEMU lists qom-list-get and no batch of this collection has failed."""
    commands = snap.get_or(None, "query-commands")
    if not isinstance(commands, list):
        return False
    failed = any(
        key.startswith(LIST_GET + " ") and "error" in reply for key, reply in snap.replies.items()
    )
    return not failed and any(isinstance(c, dict) and c.get("name") == LIST_GET for c in commands)


def batched(snap: Snapshot, reads: list[Read]) -> list[Read]:
    """`reads` with their PCI bus listings folded into one qom-list-get, where QEMU has it.

    Only buses are batched: qom-list-get calls the getter of every property of each path,
    and a bus has only QOM core's and qdev's (type, realized, hotplug-handler, its child[N]
    links, ACPI's acpi-pcihp-bsel), none with an effect. A device's or the machine's getters
    are the device model's own and are never called wholesale (/machine's `iommu` aborts
    ARM virt with a virtio-iommu-pci). The qom-list reads of a round after the base one
    are all bus listings (locate's `_links`); the links' targets come in the same reply,
    which saves the qom-get round that follows a listing.
    """
    listings = [
        (c, a) for c, a in reads if c == "qom-list" and a["path"] not in FORBIDDEN_LIST_GET_PATHS
    ]
    if not listings or not has_list_get(snap):
        return reads
    paths = [a["path"] for _, a in listings]
    return [(LIST_GET, {"paths": paths}), *(r for r in reads if r not in listings)]


_CHILD_LINK = re.compile(r"child\[\d+\]")


def record_list_get(snap: Snapshot, paths: list[str], reply: Any) -> None:
    """Record a bus batch as the qom-list and child[N] qom-get replies locate reads.

    A property whose getter failed has no value and is left for a qom-get of its own.
    ReplyShapeError if the reply is not one property list per path, in path order.
    """
    if not isinstance(reply, list) or len(reply) != len(paths):
        raise ReplyShapeError(f"{LIST_GET}: {len(paths)} paths but reply is {reply!r:.80}")
    for path, item in zip(paths, reply, strict=True):
        props = item.get("properties") if isinstance(item, dict) else None
        if not isinstance(props, list) or not all(
            isinstance(p, dict)
            and isinstance(p.get("name"), str)
            and isinstance(p.get("type"), str)
            for p in props
        ):
            raise ReplyShapeError(f"{LIST_GET} {path}: entry without name/type: {item!r:.80}")
        snap.record(
            "qom-list",
            {"path": path},
            {"return": [{"name": p["name"], "type": p["type"]} for p in props]},
        )
        for p in props:
            if _CHILD_LINK.fullmatch(p["name"]) and "value" in p:
                snap.record(
                    "qom-get", {"path": path, "property": p["name"]}, {"return": p["value"]}
                )
