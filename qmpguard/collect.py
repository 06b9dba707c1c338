"""Collection: the few targeted QMP queries that produce a Snapshot.

Never a QOM walk: `info qtree` gives every device with its type, id, addr and buses in
one read; QOM paths follow from ids (see analysis/locate.py). Per-device reads are only
the `child[N]` links of anonymous devices and `hotplugged` where the command line cannot
vouch for a device. Concurrent reads are pipelined by qemu.qmp.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from qmpguard import qemu_types as T
from qmpguard.analysis.cmdline import parse_cmdline
from qmpguard.analysis.locate import locate
from qmpguard.analysis.shape import ReplyShapeError
from qmpguard.process import read_command_line_files
from qmpguard.qemu_types import HMP_MTREE, HMP_QTREE, child_type
from qmpguard.qmp.transport import CommandFailed, InspectionError, Session
from qmpguard.snapshot import Snapshot


class _Recorder:
    """Sends commands through the session and records every reply in the snapshot."""

    def __init__(self, session: Session, snap: Snapshot) -> None:
        self.session = session
        self.snap = snap

    async def __call__(self, command: str, **arguments: Any) -> Any:
        try:
            value = await self.session.execute(command, arguments or None)
        except CommandFailed as exc:
            self.snap.record(
                command, arguments, {"error": {"class": exc.error_class, "desc": exc.desc}}
            )
            return None
        self.snap.record(command, arguments, {"return": value})
        return value


def _names(reply: Any) -> list[tuple[str, str]]:
    """(name, type) pairs from a qom-list reply; tolerate junk by skipping it."""
    if not isinstance(reply, list):
        return []
    return [
        (e["name"], e["type"])
        for e in reply
        if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("type"), str)
    ]


#: Rounds of link reads for anonymous devices: one per level of anonymous bridges.
MAX_LINK_ROUNDS = 16


async def collect(session: Session) -> Snapshot:
    """Read one VM into a Snapshot: ~15 bulk reads, then only what `info qtree` lacks."""
    started = time.perf_counter()
    snap = Snapshot(
        target=session.target.name,
        transport="libvirt" if session.target.kind == "libvirt" else f"qmp-{session.target.kind}",
        collected_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if session.peer is not None:
        snap.pid, snap.cmdline, snap.cmdline_error = (
            session.peer.pid,
            session.peer.cmdline,
            session.peer.error,
        )
        if snap.pid is not None and snap.cmdline:
            snap.files = read_command_line_files(snap.pid, snap.cmdline)
    q = _Recorder(session, snap)

    version, *_ = await asyncio.gather(
        q("query-version"),
        q("query-commands"),
        q("human-monitor-command", **{"command-line": HMP_QTREE}),
        q("qom-list", path="/"),
        *(q("qom-list", path=c) for c in T.OBJECT_CONTAINERS),
        q("qom-get", path="/machine", property="default-bus-bypass-iommu"),
        q("qom-get", path="/machine", property="iommu"),
        q("query-pci"),
        q("human-monitor-command", **{"command-line": HMP_MTREE}),
    )
    if isinstance(version, dict):
        qv = version.get("qemu", {})
        if isinstance(qv, dict):
            snap.qemu_version = f"{qv.get('major')}.{qv.get('minor')}.{qv.get('micro')}"
    try:
        for _ in range(MAX_LINK_ROUNDS):  # anonymous devices: resolve their child[N] links
            loc = locate(snap)
            if not loc.missing:
                break
            await asyncio.gather(*(q(cmd, **args) for cmd, args in loc.missing))
    except ReplyShapeError as exc:
        raise InspectionError("bad-reply", f"unexpected QMP data: {exc}") from None
    cli_ids = (
        {d.id for d in parse_cmdline(snap.cmdline, snap.files).devices if d.id}
        if snap.cmdline
        else set()
    )
    reads = []
    for path, dev in loc.devices.items():
        on_cmdline = dev.qdev.id and dev.qdev.id in cli_ids and path.endswith(f"/{dev.qdev.id}")
        order_matters = loc.facts.is_vfio(dev.qdev.type) or dev.qdev.type in T.VIOMMU_TYPES
        if path.startswith("/machine/peripheral") and (order_matters or not on_cmdline):
            reads.append(q("qom-get", path=path, property="hotplugged"))
    for container in T.OBJECT_CONTAINERS:  # sysbus vIOMMUs: their properties
        for name, etype in _names(snap.get_or([], "qom-list", path=container)):
            vtype = child_type(etype)
            if vtype in T.VIOMMU_TYPES and vtype not in T.PCI_VIOMMU_TYPES:
                reads += [
                    q("qom-get", path=f"{container}/{name}", property=p)
                    for p in ("hotplugged", "caching-mode", "primary-bus")
                ]
    await asyncio.gather(*reads)
    snap.timings = {
        "collect_s": round(time.perf_counter() - started, 6),
        "commands": session.commands_sent,
    }
    return snap
