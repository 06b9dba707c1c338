"""The daemon's current knowledge: per VM, the latest attempt and the last known truth.

A failed inspection (a busy monitor, a timeout) says nothing new about the VM's devices:
the findings and verdicts of the last successful inspection stay published, with their
age, until a successful inspection changes them or the VM goes away. So an alert on
QG001 keeps firing while another client holds the VM's monitor, and `finding_appeared`
/ `finding_cleared` are logged only when a successful inspection really changes them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from qmpguard.analysis.findings import Finding
from qmpguard.analysis.identity import VmIdentity
from qmpguard.analysis.model import Severity
from qmpguard.report.document import identity_json, target_findings, target_json
from qmpguard.result import TargetResult

log = structlog.get_logger("qmpguard.daemon")


@dataclass
class VmRecord:
    """What is known about one VM."""

    name: str
    source: str  # watch | config | libvirt | proc
    result: TargetResult | None = None  # the latest attempt, successful or not
    last_good: TargetResult | None = None  # the last successful one: the last known truth
    last_inspection: float | None = None  # unix time of the latest attempt
    last_success: float | None = None  # unix time of last_good
    last_duration: float | None = None
    consecutive_failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # reason -> count

    @property
    def up(self) -> bool:
        """The latest attempt worked."""
        return self.result is not None and self.result.ok

    @property
    def stale(self) -> bool:
        """The published findings are older than the latest attempt (which failed)."""
        return self.last_good is not None and not self.up

    @property
    def identity(self) -> VmIdentity | None:
        """Name, UUID, VMID and label, from the last successful inspection."""
        if self.last_good is None or self.last_good.analysis is None:
            return None
        return self.last_good.analysis.identity

    @property
    def label(self) -> str:
        """What people call the VM: its name or stable label, else the target name."""
        identity = self.identity
        return identity.label if identity is not None else self.name

    def findings(self) -> list[Finding]:
        """The last known findings (none before the first successful inspection)."""
        return target_findings(self.last_good) if self.last_good is not None else []

    def shown(self) -> TargetResult | None:
        """What a page shows: the last known truth, else the latest (failed) attempt."""
        return self.last_good or self.result

    def worst(self) -> str | None:
        """The worst severity known: the last findings', and `unknown` while the VM
        cannot be inspected (critical still outranks it)."""
        if self.result is None:
            return None
        severities = [f.severity for f in self.findings()]
        if not self.up:
            severities.append(Severity.UNKNOWN)
        return max(severities, key=lambda s: s.rank) if severities else "ok"

    def summary(self) -> dict[str, Any]:
        error = self.result.error if self.result is not None and not self.up else None
        identity = self.identity
        return {
            "name": self.name,  # the target name: the key of /api/v1/vms/{name}
            "vm": identity_json(identity) if identity is not None else None,
            "label": self.label,
            "source": self.source,
            "up": self.up,
            "status": "pending" if self.result is None else ("ok" if self.up else "error"),
            "stale": self.stale,
            "error": error.message if error is not None else None,
            "error_reason": error.reason if error is not None else None,
            "worst": self.worst(),
            "findings": sorted({f.code for f in self.findings()}),
            "last_inspection": self.last_inspection,
            "last_success": self.last_success,
            "last_duration_seconds": self.last_duration,
            "consecutive_failures": self.consecutive_failures,
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
        before_up = record.up
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
                log.info("vm_up", vm=name, label=record.label if record.identity else None)
            else:
                log.warning(
                    "vm_down",
                    vm=name,
                    reason=result.error.reason if result.error else None,
                    error=result.error.message if result.error else None,
                    # What stays published meanwhile: the last known findings, and since when.
                    keeping=sorted({f.code for f in record.findings()}) or None,
                    last_success=record.last_success,
                )
        if result.ok:
            self._changes(name, record.last_good, result)
            record.last_good, record.last_success = result, record.last_inspection

    def _changes(self, name: str, before: TargetResult | None, now: TargetResult) -> None:
        """Log the findings a successful inspection added or removed, compared with the
        previous successful one (a failed attempt in between changes nothing)."""
        old, new = _finding_keys(before), _finding_keys(now)
        by_key = {(f.code, f.device): f for f in target_findings(now)}
        for code, device in sorted(new - old, key=str):
            f = by_key[(code, device)]
            log.warning(
                "finding_appeared",
                vm=name,
                code=code,
                severity=f.severity,
                device=device,
                message=f.message,
            )
        for code, device in sorted(old - new, key=str):
            log.info("finding_cleared", vm=name, code=code, device=device)

    def document(self, name: str) -> dict[str, Any] | None:
        """The VM's `qmpguard.report/1` target document (its last known truth), with
        `inspection`: whether the latest attempt worked, its error, and both times."""
        record = self.vms.get(name)
        if record is None:
            return None
        shown = record.shown()
        doc: dict[str, Any] = (
            {"target": name, "status": "pending"} if shown is None else target_json(shown)
        )
        summary = record.summary()
        doc["inspection"] = {
            key: summary[key]
            for key in (
                "up",
                "stale",
                "error",
                "error_reason",
                "last_inspection",
                "last_success",
                "consecutive_failures",
            )
        }
        return doc
