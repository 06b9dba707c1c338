"""The `qmpguard.report/1` JSON document and the exit code (monitoring-plugin convention)."""

from __future__ import annotations

from typing import Any

from qmpguard.analysis.findings import Finding
from qmpguard.analysis.identity import VmIdentity
from qmpguard.analysis.model import Severity
from qmpguard.analysis.vm import DeviceAnalysis
from qmpguard.result import TargetResult

SCHEMA = "qmpguard.report/1"

EXIT_OK, EXIT_WARNING, EXIT_CRITICAL, EXIT_UNKNOWN = 0, 1, 2, 3


def target_findings(result: TargetResult) -> list[Finding]:
    """The target's findings; QG100 when it could not be inspected."""
    if result.analysis is not None:
        return result.analysis.findings
    assert result.error is not None
    return [
        Finding(
            "QG100",
            Severity.UNKNOWN,
            None,
            f"target not inspected: {result.error.message}",
            (f"reason: {result.error.reason}",),
        )
    ]


def finding_json(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code,
        "severity": f.severity,
        "device": f.device,
        "message": f.message,
        "evidence": list(f.evidence),
    }


def device_json(d: DeviceAnalysis) -> dict[str, Any]:
    b = d.binding
    return {
        "path": d.device.path,
        "id": d.device.id,
        "type": d.device.type,
        "vfio": d.device.vfio,
        "bus": d.device.bus,
        "devfn": d.device.devfn_text,
        "bdf": d.bdf,
        "expected": {
            "kind": b.kind,
            "viommu": b.viommu.path if b.viommu else None,
            "requester": (
                {"bus": b.requester.bus, "devfn": b.requester.devfn_text} if b.requester else None
            ),
            "reason": b.reason,
        },
        "order": {
            "relative_to_viommu": d.order.relative,
            "evidence": [
                {"source": e.source, "conclusion": e.conclusion, "detail": e.detail}
                for e in d.order.evidence
            ],
        },
        "verdict": d.verdict,
    }


def identity_json(i: VmIdentity) -> dict[str, Any]:
    return {"label": i.label, "name": i.name, "uuid": i.uuid, "vmid": i.vmid}


def target_json(result: TargetResult) -> dict[str, Any]:
    """One entry of `targets`."""
    a = result.analysis
    snap = result.snapshot
    return {
        "target": result.target,
        "status": "ok" if a else "error",
        "error": None if a else (result.error.message if result.error else "unknown"),
        "error_reason": None if a else (result.error.reason if result.error else None),
        "vm": identity_json(a.identity) if a else None,
        "qemu": {"version": snap.qemu_version if snap else None},
        "viommus": [{"path": v.path, "type": v.type} for v in a.viommus] if a else [],
        "devices": [device_json(d) for d in a.devices] if a else [],
        "findings": [finding_json(f) for f in target_findings(result)],
    }


def worst_severity(results: list[TargetResult]) -> str:
    sev = [f.severity for r in results for f in target_findings(r)]
    return max(sev, key=lambda s: s.rank) if sev else "ok"


def exit_code(results: list[TargetResult]) -> int:
    """2 critical; else 3 if a target was not inspected; else 1 warning; else 0."""
    sev = {f.severity for r in results for f in target_findings(r)}
    for severity, code in _EXIT_BY_SEVERITY:
        if severity in sev:
            return code
    return EXIT_OK


#: Checked in this order: a critical finding outranks an uninspected target.
_EXIT_BY_SEVERITY = (
    (Severity.CRITICAL, EXIT_CRITICAL),
    (Severity.UNKNOWN, EXIT_UNKNOWN),
    (Severity.WARNING, EXIT_WARNING),
)


def report_json(results: list[TargetResult]) -> dict[str, Any]:
    """The whole `qmpguard.report/1` document."""
    return {
        "schema": SCHEMA,
        "targets": [target_json(r) for r in results],
        "summary": {"worst": worst_severity(results), "exit_code": exit_code(results)},
    }
