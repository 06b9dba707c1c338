"""Human-readable report: one block per VM, a row per PCI device, then the findings."""

from __future__ import annotations

from qmpguard.analysis.model import BindingKind
from qmpguard.analysis.vm import DeviceAnalysis
from qmpguard.report.document import exit_code, target_findings
from qmpguard.report.text import printable
from qmpguard.report.words import VERDICT_WORD, memory_short
from qmpguard.result import TargetResult


def short_bus(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def expected_text(d: DeviceAnalysis) -> str:
    b = d.binding
    if b.kind is BindingKind.MEMORY:
        return memory_short(b)
    assert b.viommu is not None and b.requester is not None
    return f"{b.viommu.label} rid {b.requester.devfn_text}@{short_bus(b.requester.bus)}"


def _table(rows: list[list[str]]) -> list[str]:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render_target(result: TargetResult) -> str:
    lines: list[str] = []
    a = result.analysis
    target = printable(result.target)
    if a is None:
        lines.append(f"== {target}: NOT INSPECTED")
    else:
        version = a.qemu_version or "?"
        vi = printable(", ".join(f"{v.label} ({v.type})" for v in a.viommus) or "none")
        vm = printable(a.identity.label)
        lines.append(f"== {vm} ({target})  QEMU {version}  vIOMMU: {vi}")
        rows = [["DEVICE", "TYPE", "BUS", "DEVFN", "BDF", "EXPECTED DMA SPACE", "ORDER", "VERDICT"]]
        for d in a.devices:
            rows.append(
                [
                    d.device.label,
                    d.device.type,
                    short_bus(d.device.bus),
                    d.device.devfn_text,
                    d.bdf or "-",
                    expected_text(d),
                    d.order.relative if d.binding.kind is BindingKind.VIOMMU else "-",
                    VERDICT_WORD[d.verdict],
                ]
            )
        lines.extend("  " + r for r in _table(rows))
    findings = target_findings(result)
    if findings:
        lines.append("  findings:")
        for f in findings:
            lines.append(f"  {f.severity.upper():8} {f.code} {printable(f.message)}")
            lines.extend(f"             - {printable(e)}" for e in f.evidence)
    elif a is not None:
        lines.append("  no findings")
    return "\n".join(lines)


def render_report(results: list[TargetResult]) -> str:
    blocks = [render_target(r) for r in results]
    code = exit_code(results)
    status = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}[code]
    return "\n\n".join(blocks) + f"\n\nqmpguard: {status} ({len(results)} target(s))\n"
