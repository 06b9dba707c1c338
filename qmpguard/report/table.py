"""Human-readable report: one block per VM, its problems first, a row per PCI device, then
the findings.

The same rules as the tree and the daemon's pages: the verdict is the first column, so a
narrow terminal never pushes it off; names longer than NAME_MAX are shortened in the
middle (the JSON report keeps them whole).
"""

from __future__ import annotations

from qmpguard.analysis.model import BindingKind
from qmpguard.report.document import exit_code, target_findings
from qmpguard.report.text import printable
from qmpguard.report.tree import (
    expected_text,
    problem_lines,
    short_bus,
    shorten_middle,
    shorten_names,
)
from qmpguard.report.words import VERDICT_WORD
from qmpguard.result import TargetResult

__all__ = ["expected_text", "render_report", "render_target", "short_bus"]


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
        vi = ", ".join(f"{shorten_middle(v.label)} ({v.type})" for v in a.viommus) or "none"
        vm = printable(a.identity.label)
        lines.append(f"== {vm} ({target})  QEMU {version}  vIOMMU: {printable(vi)}")
        lines.extend(problem_lines(result))
        rows = [["VERDICT", "DEVICE", "TYPE", "BUS", "DEVFN", "BDF", "EXPECTED DMA SPACE", "ORDER"]]
        for d in a.devices:
            rows.append(
                [
                    VERDICT_WORD[d.verdict],
                    shorten_middle(d.device.label),
                    d.device.type,
                    shorten_middle(short_bus(d.device.bus)),
                    d.device.devfn_text,
                    d.bdf or "-",
                    shorten_names(expected_text(d)),
                    d.order.relative if d.binding.kind is BindingKind.VIOMMU else "-",
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
