"""How typed values are shown to people: one table per value, used by every renderer."""

from __future__ import annotations

from qmpguard.analysis.binding import ExpectedBinding
from qmpguard.analysis.model import MemoryReason, Verdict

#: The verdict word in tables, trees and pages; a verdict needing action is in capitals so
#: it reads without colour.
VERDICT_WORD: dict[Verdict, str] = {
    Verdict.OK: "ok",
    Verdict.MISBOUND: "MISBOUND",
    Verdict.UNVERIFIED: "UNVERIFIED",
    Verdict.NOT_APPLICABLE: "-",
}

#: Short forms of why DMA goes to plain memory (table column, tree).
MEMORY_SHORT: dict[MemoryReason, str] = {
    MemoryReason.NO_VIOMMU: "no vIOMMU",
    MemoryReason.NOT_TRANSLATED: "bus not translated",
    MemoryReason.BYPASS: "bypass bus",
}


def memory_short(binding: ExpectedBinding) -> str:
    """'memory (bypass bus)' and the like; '' for a translated device."""
    reason = binding.memory_reason
    return f"memory ({MEMORY_SHORT[reason]})" if reason is not None else ""
