"""Inspect targets: connect, collect a snapshot, analyse. Many at once, bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from qmpguard.analysis.shape import ReplyShapeError
from qmpguard.analysis.vm import VmAnalysis, analyze
from qmpguard.collect import collect
from qmpguard.qmp.allowlist import ForbiddenCommand
from qmpguard.qmp.libvirt import open_libvirt_session
from qmpguard.qmp.transport import InspectionError, Timeouts, open_session
from qmpguard.snapshot import Snapshot, SnapshotError
from qmpguard.targets import Target

log = structlog.get_logger("qmpguard.inspect")

TARGET_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class TargetResult:
    """The outcome for one target: an analysis, or the reason there is none."""

    target: str
    snapshot: Snapshot | None
    analysis: VmAnalysis | None
    error: InspectionError | None

    @property
    def ok(self) -> bool:
        return self.analysis is not None


def analyse_snapshot(target: str, snap: Snapshot) -> TargetResult:
    """Analyse a snapshot; a reply of the wrong shape becomes an error result."""
    try:
        return TargetResult(target, snap, analyze(snap), None)
    except (ReplyShapeError, SnapshotError, KeyError, RecursionError) as exc:
        err = InspectionError("bad-reply", f"unexpected QMP data: {exc}")
        return TargetResult(target, snap, None, err)


async def snapshot_target(
    target: Target, timeouts: Timeouts | None = None, overall: float = TARGET_TIMEOUT_S
) -> Snapshot:
    """Connect and collect one snapshot; InspectionError on any failure."""
    try:
        async with asyncio.timeout(overall):
            if target.kind == "libvirt":
                async with open_libvirt_session(target, timeouts) as lv_session:
                    return await collect(lv_session)
            async with open_session(target, timeouts) as session:
                return await collect(session)
    except TimeoutError:
        raise InspectionError("timeout", f"inspection exceeded {overall:g}s") from None
    except ForbiddenCommand as exc:  # a bug, never a peer's doing: say so plainly
        raise InspectionError("internal", f"refused to send a command: {exc}") from None


async def inspect_target(
    target: Target, timeouts: Timeouts | None = None, overall: float = TARGET_TIMEOUT_S
) -> TargetResult:
    """Snapshot and analyse one target; never raises for target faults."""
    try:
        snap = await snapshot_target(target, timeouts, overall)
    except InspectionError as exc:
        log.info("target_failed", target=target.name, reason=exc.reason, error=exc.message)
        return TargetResult(target.name, None, None, exc)
    return analyse_snapshot(target.name, snap)


async def inspect_many(
    targets: Iterable[Target],
    concurrency: int = 16,
    timeouts: Timeouts | None = None,
    overall: float = TARGET_TIMEOUT_S,
) -> list[TargetResult]:
    """Inspect targets concurrently, at most `concurrency` at a time, results in input order."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(t: Target) -> TargetResult:
        async with gate:
            return await inspect_target(t, timeouts, overall)

    return list(await asyncio.gather(*(one(t) for t in targets)))
