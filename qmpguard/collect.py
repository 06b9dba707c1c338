"""Collection: the few targeted QMP queries that produce a Snapshot.

Never a QOM walk, and no rule of its own: the analysis says what it still needs
(analysis/reads.py `missing_reads`), the collector sends exactly that, records the
replies and asks again until nothing is missing. Each round's reads are pipelined by
qemu.qmp.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from qmpguard.analysis.identity import pve_config_path, pve_vmid
from qmpguard.analysis.reads import LIST_GET, missing_reads, record_list_get
from qmpguard.analysis.shape import ReplyShapeError
from qmpguard.errors import CommandFailed, InspectionError
from qmpguard.process import read_command_line_files, read_small_text
from qmpguard.qmp.transport import Session
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
        if command == LIST_GET:
            record_list_get(self.snap, arguments["paths"], value)
        return value


#: Rounds of reads: the base round, one per level of anonymous bridges, the last facts.
MAX_ROUNDS = 16


def _version(reply: Any) -> str | None:
    qv = reply.get("qemu") if isinstance(reply, dict) else None
    if not isinstance(qv, dict):
        return None
    return f"{qv.get('major')}.{qv.get('minor')}.{qv.get('micro')}"


async def collect(session: Session, batch: bool = True) -> Snapshot:
    """Read one VM into a Snapshot: ~15 bulk reads, then only what `info qtree` lacks.

    `batch=False` never sends qom-list-get (the path of QEMU before 10.1, for comparison).
    """
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
    if (vmid := pve_vmid(snap.target)) is not None:  # Proxmox VE: the VM's name
        text = read_small_text(pve_config_path(vmid))
        if text is not None:
            snap.files[pve_config_path(vmid)] = text
    q = _Recorder(session, snap)
    try:
        for _ in range(MAX_ROUNDS):
            reads = missing_reads(snap, batch)
            if not reads:
                break
            await asyncio.gather(*(q(cmd, **args) for cmd, args in reads))
    except ReplyShapeError as exc:
        raise InspectionError("bad-reply", f"unexpected QMP data: {exc}") from None
    snap.qemu_version = _version(snap.get_or(None, "query-version"))
    snap.timings = {
        "collect_s": round(time.perf_counter() - started, 6),
        "commands": session.commands_sent,
    }
    return snap
