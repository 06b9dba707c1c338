"""Inspect targets: connect, collect a snapshot, analyse. Many at once, bounded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

import structlog

from qmpguard.analysis.shape import ReplyShapeError
from qmpguard.analysis.vm import analyse
from qmpguard.collect import collect
from qmpguard.defaults import INSPECTIONS_AT_ONCE, TARGET_TIMEOUT_S
from qmpguard.errors import ErrorReason, InspectionError
from qmpguard.qmp.allowlist import ForbiddenCommand
from qmpguard.qmp.guard import Timeouts
from qmpguard.qmp.libvirt import open_libvirt_session
from qmpguard.qmp.transport import Session, open_session
from qmpguard.result import TargetResult
from qmpguard.snapshot import Snapshot, SnapshotError
from qmpguard.targets import Target

log = structlog.get_logger("qmpguard.inspection")


def analyse_snapshot(target: str, snap: Snapshot) -> TargetResult:
    """Analyse a snapshot; a reply of the wrong shape becomes an error result."""
    try:
        return TargetResult(target, snap, analyse(snap), None)
    except (ReplyShapeError, SnapshotError, KeyError, RecursionError) as exc:
        err = InspectionError(ErrorReason.BAD_REPLY, f"unexpected QMP data: {exc}")
        return TargetResult(target, snap, None, err)


@contextlib.asynccontextmanager
async def open_target(target: Target, timeouts: Timeouts | None = None) -> AsyncIterator[Session]:
    """One guarded read-only session to any target kind (unix, tcp, libvirt)."""
    if target.kind == "libvirt":
        async with open_libvirt_session(target, timeouts) as lv_session:
            yield lv_session
        return
    async with open_session(target, timeouts) as session:
        yield session


async def _collect_bounded(session: Session, overall: float) -> Snapshot:
    """Collect within `overall` seconds; every failure as an InspectionError."""
    try:
        async with asyncio.timeout(overall):
            return await collect(session)
    except TimeoutError:
        raise InspectionError(ErrorReason.TIMEOUT, f"inspection exceeded {overall:g}s") from None
    except ForbiddenCommand as exc:  # a bug, never a peer's doing: say so plainly
        raise InspectionError(ErrorReason.INTERNAL, f"refused to send a command: {exc}") from None


async def inspect_session(
    session: Session, name: str, overall: float = TARGET_TIMEOUT_S
) -> TargetResult:
    """Collect and analyse over an open session; never raises for target faults.

    The one inspection step: `check`, the daemon's one-shot and held modes all use it.
    """
    try:
        snap = await _collect_bounded(session, overall)
    except InspectionError as exc:
        log.info("target_failed", target=name, reason=exc.reason, error=exc.message)
        return TargetResult(name, None, None, exc)
    return analyse_snapshot(name, snap)


async def snapshot_target(
    target: Target, timeouts: Timeouts | None = None, overall: float = TARGET_TIMEOUT_S
) -> Snapshot:
    """Connect and collect one snapshot; InspectionError on any failure."""
    try:
        async with asyncio.timeout(overall):
            async with open_target(target, timeouts) as session:
                return await _collect_bounded(session, overall)
    except TimeoutError:
        raise InspectionError(ErrorReason.TIMEOUT, f"inspection exceeded {overall:g}s") from None


async def inspect_target(
    target: Target, timeouts: Timeouts | None = None, overall: float = TARGET_TIMEOUT_S
) -> TargetResult:
    """Connect, snapshot and analyse one target; never raises for target faults."""
    try:
        async with asyncio.timeout(overall), open_target(target, timeouts) as session:
            return await inspect_session(session, target.name, overall)
    except TimeoutError:
        exc = InspectionError(ErrorReason.TIMEOUT, f"inspection exceeded {overall:g}s")
    except InspectionError as failure:
        exc = failure
    log.info("target_failed", target=target.name, reason=exc.reason, error=exc.message)
    return TargetResult(target.name, None, None, exc)


async def inspect_many(
    targets: Iterable[Target],
    concurrency: int = INSPECTIONS_AT_ONCE,
    timeouts: Timeouts | None = None,
    overall: float = TARGET_TIMEOUT_S,
) -> list[TargetResult]:
    """Inspect targets concurrently, at most `concurrency` at a time, results in input order."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(t: Target) -> TargetResult:
        async with gate:
            return await inspect_target(t, timeouts, overall)

    return list(await asyncio.gather(*(one(t) for t in targets)))
