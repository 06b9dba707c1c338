"""The typed values every verdict is made of, each defined once.

They are StrEnums: their values are the words of the JSON report and the Prometheus
labels (a contract), and logic compares members, never message wording. How a value is
shown to a person lives in qmpguard/report/words.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    """What qmpguard concludes about one device's DMA binding."""

    OK = "ok"  # bound where QEMU's walk says it should be (or to memory on purpose)
    MISBOUND = "misbound"  # a vfio device realized before its vIOMMU: DMA to all RAM
    UNVERIFIED = "unverified"  # behind a vIOMMU, realize order not established
    NOT_APPLICABLE = "n/a"  # not a vfio device: binds at machine-done, order cannot matter


class Severity(StrEnum):
    """Finding severity, ordered for the exit code (monitoring-plugin convention)."""

    INFO = "info"
    WARNING = "warning"
    UNKNOWN = "unknown"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)


class Relative(StrEnum):
    """A device's realize order relative to the vIOMMU that translates its bus."""

    BEFORE = "before"
    AFTER = "after"
    UNKNOWN = "unknown"


class EvidenceSource(StrEnum):
    """Where an order statement comes from (docs/design.md, "Order evidence")."""

    HOTPLUGGED = "hotplugged"
    MACHINE_VIOMMU = "machine-viommu"
    CMDLINE = "cmdline"
    BUS_ORDER = "bus-order"
    IOMMU_AS_ORDER = "iommu-as-order"
    REFUSED_ORDER = "refused-order"  # QEMU refuses the correct order: a running one is not


class BindingKind(StrEnum):
    """Where a device's DMA goes: a vIOMMU address space or plain guest memory."""

    VIOMMU = "viommu"
    MEMORY = "memory"


class MemoryReason(StrEnum):
    """Why a device's DMA goes to plain guest memory."""

    NO_VIOMMU = "no vIOMMU in this VM"
    NOT_TRANSLATED = "no vIOMMU translates this bus"
    BYPASS = "its root bus bypasses the vIOMMU (bypass_iommu on its host bridge)"


@dataclass(frozen=True)
class Evidence:
    """One source's statement. `conclusion` None means the source could not decide."""

    source: EvidenceSource
    conclusion: Relative | None  # BEFORE or AFTER when it decides
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
    """BEFORE/AFTER when every conclusive source agrees; UNKNOWN otherwise."""
    conclusions = {e.conclusion for e in evidence if e.conclusion}
    relative = conclusions.pop() if len(conclusions) == 1 else Relative.UNKNOWN
    return OrderEvidence(relative, tuple(evidence))


NO_ORDER = OrderEvidence(Relative.UNKNOWN, ())
