"""The per-VM page: the topology tree as server-generated SVG, and the evidence as text.

IOMMU address spaces are coloured groups, plain-memory devices grey with a dashed border,
a misbound vfio device red *and* labelled "MISBOUND (QG001)" (never colour alone). Every
device carries a <title> with its evidence, shown on hover and read by screen readers;
the same evidence is listed below the picture for print.
"""

from __future__ import annotations

import html
from urllib.parse import quote

from qmpguard.analysis.model import Severity, Verdict
from qmpguard.report.document import target_findings
from qmpguard.report.tree import TreeRow, tree_rows
from qmpguard.result import TargetResult

ROW_H, INDENT, WIDTH = 30, 26, 980
SPACE_FILLS = ["#ffd8a8", "#d0bfff", "#b2f2bb", "#ffc9c9", "#a5d8ff", "#fcc2d7"]
TRANSLATED_FILL, MEMORY_FILL, MISBOUND_FILL = "#dbe4ff", "#f1f3f5", "#ff8787"


def _fill(row: TreeRow) -> tuple[str, str]:
    """(fill, dash) for a device row."""
    if row.verdict is Verdict.MISBOUND:
        return MISBOUND_FILL, ""
    if row.memory:
        return MEMORY_FILL, "5,3"
    if row.space:
        return SPACE_FILLS[(ord(row.space) - ord("A")) % len(SPACE_FILLS)], ""
    return TRANSLATED_FILL, ""


def topology_svg(rows: list[TreeRow], title: str) -> str:
    height = ROW_H * len(rows) + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'role="img" aria-labelledby="svg-title" font-family="sans-serif" font-size="13">',
        f'<title id="svg-title">{html.escape(title)}</title>',
    ]
    for i, row in enumerate(rows):
        x, y = 10 + row.depth * INDENT, 10 + i * ROW_H
        if row.kind == "bus":
            out.append(
                f'<g class="bus"><title>bus {html.escape(row.label)}: '
                f"{html.escape(row.detail)}</title>"
                f'<line x1="{x}" y1="{y + 22}" x2="{WIDTH - 10}" y2="{y + 22}" '
                f'stroke="#868e96"/><text x="{x}" y="{y + 17}" font-weight="bold">'
                f'bus {html.escape(row.label)}</text><text x="{x + 120}" y="{y + 17}" '
                f'fill="#495057">{html.escape(row.detail)}</text></g>'
            )
            continue
        fill, dash = _fill(row)
        label = ""
        if row.verdict is Verdict.MISBOUND:
            codes = ",".join(f.code for f in row.findings if f.severity is Severity.CRITICAL)
            label = f"MISBOUND ({codes or 'QG001'})"
        elif row.verdict is Verdict.UNVERIFIED:
            label = "UNVERIFIED (QG002)"
        elif row.findings:
            label = ", ".join(sorted({f.code for f in row.findings}))
        tip = "\n".join(
            [
                f"{row.label}: {row.detail}",
                f"DMA: {row.expected}",
                *(f"{f.code} {f.severity}: {f.message}" for f in row.findings),
                *row.evidence,
            ]
        )
        stroke = ' stroke-dasharray="' + dash + '"' if dash else ""
        tags = (" [VFIO]" if row.vfio else "") + (f" [space {row.space}]" if row.space else "")
        weight = ' font-weight="bold"' if row.vfio else ""
        out.append(
            f'<g class="device{" misbound" if row.verdict is Verdict.MISBOUND else ""}" '
            f'data-path="{html.escape(row.label)}"><title>{html.escape(tip)}</title>'
            f'<rect x="{x}" y="{y}" width="{WIDTH - 20 - row.depth * INDENT}" height="{ROW_H - 4}"'
            f' rx="4" fill="{fill}" stroke="#343a40"{stroke}/>'
            f'<text x="{x + 8}" y="{y + 17}"'
            f"{weight}>{html.escape(row.label + tags)}"
            f'</text><text x="{x + 260}" y="{y + 17}">{html.escape(row.detail)}</text>'
            f'<text x="{x + 470}" y="{y + 17}">{html.escape("-> " + row.expected)}</text>'
            + (
                f'<text x="{WIDTH - 200}" y="{y + 17}" font-weight="bold">'
                f"{html.escape(label)}</text>"
                if label
                else ""
            )
            + "</g>"
        )
    out.append("</svg>")
    return "\n".join(out)


def vm_page(name: str, result: TargetResult | None) -> str:
    """The whole HTML page for one VM."""
    esc = html.escape(name)
    head = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>qmpguard: '
        f"{esc}</title><style>body{{font-family:sans-serif;margin:2em}}"
        f"li{{margin:.3em 0}} .critical{{color:#c92a2a;font-weight:bold}}</style></head>"
        f'<body><p><a href="/">all VMs</a> · <a href="/api/v1/vms/{quote(name, safe="")}">'
        f"JSON</a></p><h1>{esc}</h1>"
    )
    if result is None or result.analysis is None:
        reason = result.error.message if result and result.error else "not inspected yet"
        return head + f"<p>Not inspected: {html.escape(reason)}</p></body></html>"
    findings = target_findings(result)
    rows = tree_rows(result.analysis, findings)
    legend = (
        "<p>Legend: blue = the device's own vIOMMU address space; other colours = "
        "one address space shared by several devices (aliasing, letter in brackets); "
        "grey dashed = plain guest memory (no vIOMMU or bypass bus); red with "
        "<b>MISBOUND</b> = a vfio device whose DMA bypasses the vIOMMU.</p>"
    )
    items = []
    for f in findings:
        ev = "".join(f"<li>{html.escape(e)}</li>" for e in f.evidence)
        items.append(
            f'<li><span class="{f.severity}">{f.code} {f.severity.upper()}</span> '
            f"{html.escape(f.message)}<ul>{ev}</ul></li>"
        )
    evidence = "".join(
        f"<li><b>{html.escape(r.label)}</b> ({html.escape(r.detail)}): "
        f"{html.escape(r.expected)}<ul>{''.join(f'<li>{html.escape(e)}</li>' for e in r.evidence)}"
        f"</ul></li>"
        for r in rows
        if r.kind == "device" and r.vfio
    )
    return (
        head
        + legend
        + topology_svg(rows, f"PCI topology of {name}")
        + f"<h2>Findings</h2><ul>{''.join(items) or '<li>none</li>'}</ul>"
        + f"<h2>Evidence for every vfio device</h2><ul>{evidence or '<li>none</li>'}</ul>"
        + "</body></html>"
    )
