"""The outcome of inspecting one target: pure values the renderers and the daemon share.

Kept apart from the inspection code (which does I/O) so that reports, pages and metrics
depend on values only.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmpguard.analysis.vm import VmAnalysis
from qmpguard.errors import InspectionError
from qmpguard.snapshot import Snapshot


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
