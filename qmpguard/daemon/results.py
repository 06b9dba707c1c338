"""The daemon's current knowledge: the latest result per VM, and what changed."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from qmpguard.report.document import target_findings, target_json, worst_severity
from qmpguard.result import TargetResult

log = structlog.get_logger("qmpguard.daemon")


@dataclass
class VmRecord:
    """What is known about one VM."""

    name: str
    source: str  # watch | config | libvirt
    result: TargetResult | None = None
    last_inspection: float | None = None  # unix time
    last_duration: float | None = None
    consecutive_failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # reason -> count

    @property
    def up(self) -> bool:
        return self.result is not None and self.result.ok

    def summary(self) -> dict[str, Any]:
        findings = target_findings(self.result) if self.result else []
        return {
            "name": self.name,
            "source": self.source,
            "up": self.up,
            "status": "pending" if self.result is None else ("ok" if self.up else "error"),
            "error": self.result.error.message if self.result and self.result.error else None,
            "worst": worst_severity([self.result]) if self.result else None,
            "findings": sorted({f.code for f in findings}),
            "last_inspection": self.last_inspection,
            "last_duration_seconds": self.last_duration,
        }


def _finding_keys(result: TargetResult | None) -> set[tuple[str, str | None]]:
    if result is None or not result.ok:
        return set()
    return {(f.code, f.device) for f in target_findings(result)}


class ResultStore:
    """Latest results per VM; logs one event per state change, not per poll."""

    def __init__(self) -> None:
        self.vms: dict[str, VmRecord] = {}

    def add(self, name: str, source: str) -> None:
        if name not in self.vms:
            self.vms[name] = VmRecord(name, source)
            log.info("vm_discovered", vm=name, source=source)

    def remove(self, name: str) -> None:
        if self.vms.pop(name, None) is not None:
            log.info("vm_vanished", vm=name)

    def forget_result(self, name: str) -> None:
        """The VM behind this name was replaced (socket re-created): no stale verdicts."""
        if name in self.vms:
            record = self.vms[name]
            self.vms[name] = VmRecord(name, record.source)
            log.info("vm_replaced", vm=name)

    def update(self, name: str, result: TargetResult, duration: float) -> None:
        record = self.vms.get(name)
        if record is None:
            return  # vanished while it was being inspected
        before_up, before_findings = record.up, _finding_keys(record.result)
        first = record.result is None
        record.result, record.last_duration = result, duration
        record.last_inspection = time.time()
        if result.ok:
            record.consecutive_failures = 0
        else:
            assert result.error is not None
            record.consecutive_failures += 1
            record.errors[result.error.reason] += 1
        if record.up != before_up or first:
            if record.up:
                log.info("vm_up", vm=name)
            else:
                log.warning(
                    "vm_down",
                    vm=name,
                    reason=result.error.reason if result.error else None,
                    error=result.error.message if result.error else None,
                )
        if result.ok:
            now = _finding_keys(result)
            by_key = {(f.code, f.device): f for f in target_findings(result)}
            for code, device in sorted(now - before_findings, key=str):
                f = by_key[(code, device)]
                log.warning(
                    "finding_appeared",
                    vm=name,
                    code=code,
                    severity=f.severity,
                    device=device,
                    message=f.message,
                )
            for code, device in sorted(before_findings - now, key=str):
                log.info("finding_cleared", vm=name, code=code, device=device)

    def document(self, name: str) -> dict[str, Any] | None:
        record = self.vms.get(name)
        if record is None:
            return None
        if record.result is None:
            return {"target": name, "status": "pending"}
        return target_json(record.result)
