"""`check --format nagios`: the monitoring-plugins output convention (Nagios, Icinga,
Naemon, Checkmk's classic checks).

The first line is what the monitoring system shows: `QMPGUARD <STATE> - <summary> |
<perfdata>`; the lines after it are the long output, one per finding, uninspected VM
or clean VM. Perfdata are `label=value;warn;crit;min` with thresholds in the plugin
range syntax: `0` alerts above 0, so `misbound=1;;0;0` is critical at one misbound
device. The exit code is the state (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), the same
as for every other format.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from qmpguard.analysis.model import Severity, Verdict
from qmpguard.report.document import exit_code, target_findings
from qmpguard.report.text import printable
from qmpguard.result import TargetResult

STATE = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
#: VM names listed in the status line; the rest are counted.
MAX_NAMED = 3


def vm_label(result: TargetResult) -> str:
    """The VM's name or stable label, else the target as given."""
    if result.analysis is not None:
        return result.analysis.identity.label
    return result.target


def _clean(text: str) -> str:
    """One line without the perfdata separator."""
    return printable(text).replace("|", "/")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _names(labels: Iterable[str]) -> str:
    unique = list(dict.fromkeys(labels))
    shown = ", ".join(_clean(label) for label in unique[:MAX_NAMED])
    more = len(unique) - MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Counts:
    """What the status line and the perfdata count."""

    vms: int
    uninspected: int
    verdicts: Counter[Verdict]
    severities: Counter[Severity]

    @classmethod
    def of(cls, results: list[TargetResult]) -> Counts:
        verdicts: Counter[Verdict] = Counter()
        severities: Counter[Severity] = Counter()
        for r in results:
            if r.analysis is None:
                continue
            verdicts.update(d.verdict for d in r.analysis.devices if d.device.vfio)
            severities.update(f.severity for f in r.analysis.findings)
        uninspected = sum(1 for r in results if r.analysis is None)
        return cls(len(results), uninspected, verdicts, severities)

    def perfdata(self) -> str:
        """label=value;warn;crit;min (ranges: `0` alerts above 0)."""
        fields = [
            ("vms", self.vms, "", "", "0"),
            ("uninspected", self.uninspected, "", "", "0"),
            ("misbound", self.verdicts[Verdict.MISBOUND], "", "0", "0"),
            ("unverified", self.verdicts[Verdict.UNVERIFIED], "0", "", "0"),
            ("vfio_ok", self.verdicts[Verdict.OK], "", "", "0"),
            ("critical", self.severities[Severity.CRITICAL], "", "0", "0"),
            ("warnings", self.severities[Severity.WARNING], "0", "", "0"),
        ]
        return " ".join(f"{k}={v};{warn};{crit};{low}" for k, v, warn, crit, low in fields)


def _critical_parts(results: list[TargetResult]) -> list[str]:
    parts = []
    misbound = [
        vm_label(r)
        for r in results
        if r.analysis is not None
        for d in r.analysis.devices
        if d.device.vfio and d.verdict is Verdict.MISBOUND
    ]
    if misbound:
        parts.append(f"{_plural(len(misbound), 'misbound vfio device')} on {_names(misbound)}")
    other = [
        (vm_label(r), f.code)
        for r in results
        if r.analysis is not None
        for f in r.analysis.findings
        if f.severity is Severity.CRITICAL and f.code != "QG001"
    ]
    if other:
        codes = ", ".join(sorted({code for _, code in other}))
        parts.append(
            f"{_plural(len(other), 'critical finding')} ({codes}) on {_names(v for v, _ in other)}"
        )
    return parts


def _warning_part(results: list[TargetResult]) -> str | None:
    found = [
        (vm_label(r), f.code)
        for r in results
        if r.analysis is not None
        for f in r.analysis.findings
        if f.severity is Severity.WARNING
    ]
    if not found:
        return None
    codes = ", ".join(f"{code} x{n}" for code, n in sorted(Counter(c for _, c in found).items()))
    return f"{_plural(len(found), 'warning')} ({codes}) on {_names(v for v, _ in found)}"


def _uninspected_part(results: list[TargetResult]) -> str | None:
    failed = [r for r in results if r.analysis is None]
    if not failed:
        return None
    first = failed[0]
    reason = first.error.reason if first.error is not None else "unknown"
    return (
        f"{len(failed)} of {_plural(len(results), 'VM')} not inspected "
        f"({_names(vm_label(r) for r in failed)}: {reason}"
        + (", ..." if len(failed) > 1 else "")
        + ")"
    )


def status_line(results: list[TargetResult]) -> str:
    """`QMPGUARD STATE - summary | perfdata`: the worst first, the rest after `;`."""
    code = exit_code(results)
    counts = Counts.of(results)
    parts = _critical_parts(results)
    uninspected = _uninspected_part(results)
    warnings = _warning_part(results)
    if code == 3 and uninspected:  # nothing critical: say what could not be checked first
        parts = [uninspected, *([warnings] if warnings else [])]
    else:
        parts += [p for p in (warnings, uninspected) if p]
    if not parts:
        vfio = sum(counts.verdicts.values())
        parts = [
            f"{_plural(counts.vms, 'VM')}, {_plural(vfio, 'vfio device')}, no findings"
            if results
            else "no VM checked"
        ]
    return f"QMPGUARD {STATE[code]} - {'; '.join(parts)} | {counts.perfdata()}"


def detail_lines(results: list[TargetResult]) -> list[str]:
    """The long output: one line per finding and per uninspected or clean VM."""
    lines = []
    for r in results:
        who = f"{_clean(vm_label(r))} ({_clean(r.target)})"
        if r.analysis is None:
            message = r.error.message if r.error is not None else "not inspected"
            lines.append(f"[UNKNOWN] {who}: not inspected: {_clean(message)}")
            continue
        findings = target_findings(r)
        for f in findings:
            device = f" {_clean(f.device)}" if f.device else ""
            lines.append(f"[{f.severity.upper()}] {who}: {f.code}{device}: {_clean(f.message)}")
        if not findings:
            vfio = sum(1 for d in r.analysis.devices if d.device.vfio)
            lines.append(f"[OK] {who}: no findings ({_plural(vfio, 'vfio device')} checked)")
    return lines


def render_nagios(results: list[TargetResult]) -> str:
    return "\n".join([status_line(results), *detail_lines(results)]) + "\n"
