"""The daemon's pages, as pure functions of what it knows: HTML and CSS, no JavaScript.

`status_page` (`/`): a summary line of VM counts per state first, then one row per VM,
worst first, named as people name it (its socket as detail), with the reason and the age
of the last inspection; `?problems=1` keeps only the VMs that need a look.

`vm_page` (`/vms/{name}`): a banner with the VM's worst state and a link to each problem
device's place in the picture and to its evidence, then the topology as nested lists
(text wraps, nothing is drawn at a fixed position, so nothing overlaps or is cut whatever
the names, the depth or the device count; the verdict word opens each row, so a narrow
window never hides it), then the evidence. In a large VM, subtrees and runs of devices
without a vfio device or a problem are folded (<details>). Colour is never alone: every
state and verdict is also a word.
"""

from __future__ import annotations

import hashlib
import html
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

from qmpguard.analysis.findings import Finding
from qmpguard.analysis.identity import _fallback_label, pve_vmid
from qmpguard.analysis.model import Severity, Verdict
from qmpguard.daemon.results import VmRecord
from qmpguard.report.document import target_findings
from qmpguard.report.tree import (
    STATE_COUNTED,
    STATE_WORD,
    TreeRow,
    VmState,
    first_sentence,
    problem_rows,
    row_severity,
    state_sentence,
    tree_rows,
    vm_state,
    worst_finding,
)
from qmpguard.report.words import VERDICT_WORD
from qmpguard.result import TargetResult

#: From this many device rows on, a VM's page folds what holds no vfio device.
FOLD_FROM_DEVICES = 24
#: Folding a run of uninteresting siblings needs at least this many of them.
FOLD_RUN = 3
#: Problems listed in a banner before the rest are folded.
BANNER_MAX = 8
#: Findings quoted per VM on the status page before "and N more".
STATUS_WHY_MAX = 2
SPACE_COLOURS = ["#e8590c", "#7048e8", "#2f9e44", "#d6336c", "#1c7ed6", "#f08c00"]

esc = html.escape

CSS = """
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, sans-serif; color: #212529; margin: 0 auto;
  padding: .8em 1.2em 3em; max-width: 1400px; }
body, p, li, td, h1, h2, h3, span, a, summary { overflow-wrap: anywhere; }
h1 { font-size: 1.5em; margin: .2em 0; } h2 { font-size: 1.2em; margin: 1.2em 0 .4em; }
h3 { font-size: 1em; margin: 0 0 .3em; }
a { color: #1c5bb8; }
.muted { color: #495057; font-size: .9em; }
.nav { margin: 0 0 .3em; }
.badge { display: inline-block; padding: 0 .45em; border-radius: 3px; font-weight: bold;
  border: 1px solid #868e96; white-space: nowrap; }
.s-critical, .v-misbound { background: #c92a2a; border-color: #c92a2a; color: #fff; }
.s-warning, .v-unverified, .v-finding { background: #ffe066; border-color: #e67700; }
.s-unknown { background: #dee2e6; border-color: #495057; }
.s-vfio-ok, .v-ok { background: #d3f9d8; border-color: #2b8a3e; color: #1b5e20; }
.s-no-vfio { background: #fff; border-style: dashed; color: #495057; }
.summary { display: flex; flex-wrap: wrap; gap: .4em .6em; align-items: baseline;
  margin: .4em 0; font-size: 1.05em; }
.summary .zero { opacity: .55; }
table.vms { border-collapse: collapse; width: 100%; }
table.vms th, table.vms td { border-bottom: 1px solid #ced4da; padding: .3em .5em;
  text-align: left; vertical-align: top; }
table.vms th { background: #f1f3f5; white-space: nowrap; }
table.vms td.vfio, table.vms td.age { white-space: nowrap; }
table.vms col.vm { width: 30%; }
.socket { font-size: .85em; color: #495057; }
tr.critical { background: #fff0f0; } tr.warning { background: #fffbe6; }
tr.unknown { background: #f8f9fa; }
.vm-name { font-weight: bold; }
.banner { border: 2px solid #868e96; border-radius: 6px; padding: .5em .8em;
  margin: .6em 0 1em; }
.banner.critical { border-color: #c92a2a; background: #fff5f5; }
.banner.warning, .banner.unknown { border-color: #e67700; background: #fff9db; }
.banner.vfio-ok { border-color: #2b8a3e; background: #ebfbee; }
.banner .headline { margin: 0 0 .3em; font-size: 1.1em; }
.banner ol { margin: .2em 0; padding-left: 1.6em; }
.banner li { margin: .25em 0; }
ul.tree, ul.tree ul { list-style: none; margin: 0; padding: 0; }
ul.tree ul { margin-left: .55em; padding-left: .8em; border-left: 1px solid #adb5bd; }
.row { display: flex; flex-wrap: wrap; align-items: baseline; gap: .1em .7em;
  margin: 2px 0; padding: .15em .5em; border: 1px solid #ced4da;
  border-left: 6px solid #4c6ef5; border-radius: 4px; background: #f8f9ff; }
.row.memory { border: 1px dashed #495057; border-left: 6px solid #adb5bd; background: #f1f3f5; }
.row.misbound { border: 2px solid #c92a2a; border-left-width: 6px; background: #ffe3e3; }
.row.problem { border-color: #e67700; }
.row.bus { border: 0; background: none; padding: .1em .2em; font-size: .92em; }
.row .name { font-weight: 600; }
.row.vfio .name { font-weight: 800; }
.tag { font-size: .85em; border: 1px solid #868e96; border-radius: 3px; padding: 0 .3em; }
.detail, .dma { color: #343a40; }
summary { cursor: pointer; }
summary.row { list-style: none; }
summary.row::-webkit-details-marker { display: none; }
summary.row::before { content: "\\25B8"; margin-right: -.3em; }
details[open] > summary.row::before { content: "\\25BE"; }
summary.fold { color: #495057; padding: .15em .5em; font-size: .92em; }
.ev { border-top: 1px solid #dee2e6; padding: .4em 0; }
.ev ul { margin: .2em 0; }
:target > .row, section:target { outline: 3px solid #1c7ed6; outline-offset: 1px; }
"""


def _head(title: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
    )


def _badge(word: str, cls: str) -> str:
    return f'<span class="badge {cls}">{esc(word)}</span>'


def state_badge(state: VmState) -> str:
    return _badge(STATE_WORD[state], f"s-{state}")


def age_text(seconds: float) -> str:
    """`4 s ago`, `3 min ago`, `2 h ago`, `5 d ago`."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit} ago"
    return f"{s} s ago"


def _when(t: float | None, now: float, never: str) -> str:
    if t is None:
        return esc(never)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return f'<time datetime="{iso}" title="{stamp}">{age_text(now - t)}</time>'


def reason(f: Finding) -> str:
    """A finding in one clause, for a line: a device finding's message up to its first
    colon (`hostdev0 (vfio-pci) was realized before vIOMMU viommu (intel-iommu)`; what
    follows is the consequence and the fix), else its first sentence."""
    text = first_sentence(f.message)
    return text.split(": ", 1)[0] if f.device is not None else text


def vm_href(name: str) -> str:
    return f"/vms/{quote(name, safe='')}"


# -- the status page -----------------------------------------------------------------------


@dataclass(frozen=True)
class StatusRow:
    """One VM on the status page: what it shows is the last known truth (the last
    inspection that worked) while the latest attempt may have failed."""

    record: VmRecord
    shown: TargetResult | None
    state: VmState
    label: str

    @property
    def stale(self) -> bool:
        """The devices shown are older than the latest attempt, which failed."""
        return self.shown is not None and self.shown is not self.record.result


def record_state(record: VmRecord, shown: TargetResult | None) -> VmState:
    """The state of what is shown; a VM that cannot be inspected now is UNKNOWN unless its
    last known state is worse (critical)."""
    state = vm_state(shown)
    if record.result is not None and not record.up and state.rank > VmState.UNKNOWN.rank:
        return VmState.UNKNOWN
    return state


def vm_label(name: str, result: TargetResult | None) -> str:
    """The VM's name or stable label; before any inspection worked, the label its
    socket gives (`vm1`, `vmid 101`), as the identity would."""
    if result is not None and result.analysis is not None:
        return result.analysis.identity.label
    vmid = pve_vmid(name)
    return f"vmid {vmid}" if vmid else _fallback_label(name)


def status_row(record: VmRecord) -> StatusRow:
    shown = record.shown()
    return StatusRow(record, shown, record_state(record, shown), vm_label(record.name, shown))


def status_rows(records: Iterable[VmRecord]) -> list[StatusRow]:
    """Every VM, worst first, then by name (then by target, for equal names)."""
    rows = [status_row(r) for r in records]
    return sorted(rows, key=lambda s: (s.state.rank, s.label.casefold(), s.record.name))


def _vfio_cell(result: TargetResult | None) -> str:
    if result is None or result.analysis is None:
        return '<span class="muted">not known</span>'
    verdicts = Counter(d.verdict for d in result.analysis.devices if d.device.vfio)
    if not verdicts:
        return "no vfio device"
    parts = [
        f"{verdicts[v]} {_badge(VERDICT_WORD[v], f'v-{v}')}"
        for v in (Verdict.MISBOUND, Verdict.UNVERIFIED, Verdict.OK)
        if verdicts[v]
    ]
    return ", ".join(parts)


def _why_cell(row: StatusRow, now: float) -> str:
    record, parts = row.record, []
    latest = record.result
    if latest is None:
        parts.append("not inspected yet")
    elif latest.error is not None:
        parts.append(f"not inspected now: {esc(latest.error.message)}")
    a = row.shown.analysis if row.shown is not None else None
    if a is not None and row.stale:
        parts.append("as last seen:")
    problems = sorted(
        (f for f in (a.findings if a else []) if f.severity.rank >= Severity.WARNING.rank),
        key=lambda f: -f.severity.rank,
    )
    for f in problems[:STATUS_WHY_MAX]:
        parts.append(f"<b>{esc(f.code)}</b> {esc(reason(f))}")
    if len(problems) > STATUS_WHY_MAX:
        parts.append(f"and {len(problems) - STATUS_WHY_MAX} more")
    if not parts:
        parts.append(
            "every vfio device bound to its vIOMMU"
            if row.state is VmState.VFIO_OK
            else "no vfio device: nothing to misbind"
        )
    return "<br>".join(parts)


def status_page(records: Iterable[VmRecord], now: float, problems_only: bool = False) -> str:
    """`/`: counts per state, then the VMs worst first; `problems_only` keeps the VMs
    that are critical, warning or unknown."""
    rows = status_rows(records)
    counts = Counter(r.state for r in rows)
    problems = sum(n for s, n in counts.items() if s.problem)
    chips = "".join(
        f'<span class="{"zero" if not counts[s] else ""}">'
        f"{_badge(f'{counts[s]} {STATE_COUNTED[s]}', f's-{s}')}</span>"
        for s in VmState
    )
    shown = [r for r in rows if r.state.problem] if problems_only else rows
    if problems_only:
        scope = (
            f"Showing the {len(shown)} VM{'s' if len(shown) != 1 else ''} with problems "
            f'(critical, unknown, warning) · <a href="/">show all {len(rows)}</a>'
        )
    else:
        scope = f"Showing all {len(rows)} VM{'s' if len(rows) != 1 else ''}, worst first" + (
            f' · <a href="/?problems=1">only the {problems} with problems</a>' if problems else ""
        )
    body = []
    for r in shown:
        rec = r.record
        identity = r.shown.analysis.identity if r.shown and r.shown.analysis else None
        extra = []
        if identity is not None and identity.vmid:
            extra.append(f"VMID {esc(identity.vmid)}")
        if identity is not None and identity.uuid:
            extra.append(f"UUID {esc(identity.uuid)}")
        body.append(
            f'<tr class="{r.state}" data-state="{r.state}" data-name="{esc(rec.name)}">'
            f"<td>{state_badge(r.state)}</td>"
            f'<td><a class="vm-name" href="{vm_href(rec.name)}">{esc(r.label)}</a><br>'
            f'<span class="socket">{" · ".join([esc(rec.name), *extra])}</span></td>'
            f'<td class="vfio">{_vfio_cell(r.shown)}</td><td>{_why_cell(r, now)}</td>'
            f'<td class="age">{_when(rec.last_inspection, now, "not yet")}</td></tr>'
        )
    if not rows:
        body.append('<tr><td colspan="5">no VMs found yet</td></tr>')
    elif not shown:
        body.append('<tr><td colspan="5">no VM has a problem</td></tr>')
    worst = rows[0].state if rows else None
    title = "qmpguard" + (
        f": {counts[worst]} {STATE_COUNTED[worst]}" if worst is not None and worst.problem else ""
    )
    return (
        _head(title)
        + f"<h1>qmpguard: {len(rows)} VM{'s' if len(rows) != 1 else ''}</h1>"
        + f'<p class="summary" id="summary">{chips}</p>'
        + f'<p class="filter">{scope}</p>'
        + '<table class="vms"><colgroup><col><col class="vm"><col><col><col></colgroup>'
        + "<thead><tr><th>state</th><th>VM (socket)</th>"
        + "<th>vfio devices</th><th>why</th><th>inspected</th></tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
        + '<p class="muted">vfio devices whose DMA bypasses the guest\'s vIOMMU. Every '
        'state is a word as well as a colour. Metrics: <a href="/metrics">/metrics</a>, '
        'JSON: <a href="/api/v1/vms">/api/v1/vms</a>.</p></body></html>'
    )


# -- the VM page ---------------------------------------------------------------------------


@dataclass
class Node:
    """A row of the tree with the rows under it (a bus's devices, a device's buses)."""

    row: TreeRow
    children: list[Node] = field(default_factory=list)
    index: int = 0

    @property
    def interesting(self) -> bool:
        """Holds a vfio device or a problem somewhere (never folded away)."""
        if self.row.kind == "device" and (self.row.vfio or row_severity(self.row)):
            return True
        return any(c.interesting for c in self.children)

    def devices(self) -> int:
        own = 1 if self.row.kind == "device" else 0
        return own + sum(c.devices() for c in self.children)


def nest(rows: list[TreeRow]) -> list[Node]:
    """The flat, depth-tagged rows as a tree."""
    roots: list[Node] = []
    stack: list[Node] = []
    for i, row in enumerate(rows):
        node = Node(row, index=i)
        while stack and stack[-1].row.depth >= row.depth:
            stack.pop()
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)
    return roots


def anchor(prefix: str, label: str) -> str:
    """A stable, URL-safe element id for a device (its id or QOM path)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")[:40]
    return f"{prefix}-{slug}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"


def verdict_label(row: TreeRow) -> tuple[str, str] | None:
    """(word, class) for a device's verdict badge: `MISBOUND (QG001)`; the codes of its
    findings for a device that is not vfio; None for nothing to say."""
    codes = sorted({f.code for f in row.findings})
    if row.verdict is Verdict.MISBOUND:
        crit = [f.code for f in row.findings if f.severity is Severity.CRITICAL]
        return f"{VERDICT_WORD[row.verdict]} ({','.join(crit) or 'QG001'})", "v-misbound"
    if row.verdict is not Verdict.NOT_APPLICABLE:
        word = VERDICT_WORD[row.verdict]
        cls = "v-finding" if row_severity(row) else f"v-{row.verdict}"  # ok, yet a warning
        return (f"{word} ({','.join(codes)})" if codes else word), cls
    if codes:
        return ", ".join(codes), "v-finding"
    return None


def dma_text(row: TreeRow) -> str:
    """Where the device's DMA goes; for a MISBOUND one, where it goes instead."""
    if row.verdict is Verdict.MISBOUND:
        return f"DMA &#8594; <b>all guest RAM</b>, not {esc(row.expected)}"
    return f"DMA &#8594; {esc(row.expected)}"


def _device_row(row: TreeRow, tag: str = "div", extra: str = "") -> str:
    classes = ["row", "device"]
    if row.memory:
        classes.append("memory")
    if row.vfio:
        classes.append("vfio")
    if row.verdict is Verdict.MISBOUND:
        classes.append("misbound")
    elif row_severity(row):
        classes.append("problem")
    style = ""
    if row.space and not row.memory and row.verdict is not Verdict.MISBOUND:
        colour = SPACE_COLOURS[(ord(row.space) - ord("A")) % len(SPACE_COLOURS)]
        style = f' style="border-left-color:{colour}"'
    label = verdict_label(row)
    parts = [f'<span class="verdict badge {label[1]}">{esc(label[0])}</span>'] if label else []
    parts.append(f'<span class="name">{esc(row.label)}</span>')
    if row.vfio:
        parts.append('<span class="tag">VFIO</span>')
    if row.space:
        parts.append(f'<span class="tag">shared space {esc(row.space)}</span>')
    parts.append(f'<span class="detail">{esc(row.detail)}</span>')
    parts.append(f'<span class="dma">{dma_text(row)}</span>')
    if row.vfio or row.findings:
        parts.append(f'<a class="evlink" href="#{anchor("ev", row.label)}">evidence</a>')
    parts.append(extra)
    return f'<{tag} class="{" ".join(classes)}"{style}>{"".join(parts)}</{tag}>'


def _bus_row(row: TreeRow, tag: str = "div", extra: str = "") -> str:
    return (
        f'<{tag} class="row bus"><span class="name">bus {esc(row.label)}</span>'
        f'<span class="detail">{esc(row.detail)}</span>{extra}</{tag}>'
    )


def _fold_note(node: Node) -> str:
    below = node.devices() - (1 if node.row.kind == "device" else 0)
    return (
        f'<span class="muted">{below} device{"s" if below != 1 else ""} below, '
        "no vfio device</span>"
    )


def _render(node: Node, fold: bool) -> str:
    """One <li>: the row, then what hangs under it (folded when `fold` and dull)."""
    row = node.row
    is_dev = row.kind == "device"
    ident = f' id="{anchor("d", row.label)}"' if is_dev else ""
    if not node.children:
        return f"<li{ident}>{_device_row(row) if is_dev else _bus_row(row)}</li>"
    if fold and not node.interesting:  # one fold; all of it shows once opened
        head = (_device_row if is_dev else _bus_row)(row, "summary", _fold_note(node))
        return f"<li{ident}><details>{head}{_children(node.children, False)}</details></li>"
    inner = _children(node.children, fold)
    return f"<li{ident}>{_device_row(row) if is_dev else _bus_row(row)}{inner}</li>"


def _children(nodes: list[Node], fold: bool) -> str:
    """A <ul> of `nodes`; with `fold`, runs of FOLD_RUN or more dull siblings go into one
    <details>."""
    out: list[str] = []
    run: list[Node] = []

    def flush() -> None:
        if len(run) >= FOLD_RUN:
            first, last = run[0].row, run[-1].row
            span = f"{first.detail.split()[0]} to {last.detail.split()[0]}"
            n = sum(x.devices() for x in run)
            out.append(
                f'<li class="folded"><details><summary class="fold">{len(run)} more '
                f"on this bus ({span}), {n} device{'s' if n != 1 else ''} in all, "
                f"no vfio device</summary><ul>{''.join(_render(x, False) for x in run)}"
                "</ul></details></li>"
            )
        else:
            out.extend(_render(x, fold) for x in run)
        run.clear()

    for node in nodes:
        if fold and node.row.kind == "device" and not node.interesting:
            run.append(node)
            continue
        flush()
        out.append(_render(node, fold))
    flush()
    return f"<ul>{''.join(out)}</ul>"


def topology_html(rows: list[TreeRow]) -> str:
    """The tree as nested lists; folded when it has FOLD_FROM_DEVICES device rows or more."""
    fold = sum(r.kind == "device" for r in rows) >= FOLD_FROM_DEVICES
    roots = nest(rows)
    return (
        '<ul class="tree" aria-label="PCI topology">'
        + "".join(_render(n, fold) for n in roots)
        + "</ul>"
    )


def _problem_item(row: TreeRow) -> str:
    f = worst_finding(row)
    label = verdict_label(row)
    why = f" <b>{esc(f.code)} {esc(f.severity)}</b>: {esc(first_sentence(f.message))}." if f else ""
    return (
        f"<li>{_badge(*label) if label else ''} <b>{esc(row.label)}</b>{why} "
        f'<a href="#{anchor("d", row.label)}">in the picture</a> · '
        f'<a href="#{anchor("ev", row.label)}">evidence and fix</a></li>'
    )


def banner(result: TargetResult | None, rows: list[TreeRow]) -> str:
    """The VM's worst state, and a link to each problem, worst first."""
    state = vm_state(result)
    items = [_problem_item(r) for r in problem_rows(rows)]
    if result is not None:
        items += [
            f"<li>{_badge(f.severity.upper(), f's-{f.severity}')} <b>{esc(f.code)}</b> "
            f'{esc(first_sentence(f.message))} <a href="#vm-findings">details</a></li>'
            for f in target_findings(result)
            if f.device is None and f.severity.rank >= Severity.WARNING.rank
        ]
    listed = "".join(items[:BANNER_MAX])
    if len(items) > BANNER_MAX:
        listed += (
            f"<li><details><summary>{len(items) - BANNER_MAX} more problems</summary>"
            f"<ol>{''.join(items[BANNER_MAX:])}</ol></details></li>"
        )
    return (
        f'<section class="banner {state}" id="state" aria-label="state of this VM">'
        f'<p class="headline">{state_badge(state)} {esc(state_sentence(result))}</p>'
        + (f"<ol>{listed}</ol>" if listed else "")
        + "</section>"
    )


def _finding_li(f: Finding) -> str:
    ev = "".join(f"<li>{esc(e)}</li>" for e in f.evidence)
    return (
        f"<li>{_badge(f'{f.code} {f.severity.upper()}', f's-{f.severity}')} "
        f"{esc(f.message)}{f'<ul>{ev}</ul>' if ev else ''}</li>"
    )


def evidence_html(rows: list[TreeRow]) -> str:
    """Per vfio device or device with findings: its verdict, findings (with the fix) and
    order evidence; problems first."""
    problems = problem_rows(rows)
    rest = [r for r in rows if r.kind == "device" and (r.vfio or r.findings) and r not in problems]
    out = []
    for row in [*problems, *rest]:
        label = verdict_label(row)
        findings = "".join(_finding_li(f) for f in row.findings)
        order = "".join(f"<li>{esc(e)}</li>" for e in row.evidence)
        out.append(
            f'<section class="ev" id="{anchor("ev", row.label)}"><h3>'
            f"{_badge(*label) if label else ''} {esc(row.label)} "
            f'<a href="#{anchor("d", row.label)}">in the picture</a></h3>'
            f'<p class="muted">{esc(row.detail)} · {dma_text(row)}</p>'
            + (f"<ul>{findings}</ul>" if findings else "")
            + (f"<p>Realize order evidence:</p><ul>{order}</ul>" if order else "")
            + "</section>"
        )
    return "".join(out) or "<p>no vfio device and no finding on any device</p>"


LEGEND = (
    '<p class="muted">Each row: verdict, device, devfn BDF type, where its DMA goes. '
    "Left edge: solid blue = the device's own vIOMMU address space; another colour = one "
    "space shared by several devices (aliasing; the letter is in a tag); grey, dashed = "
    "plain guest memory (no vIOMMU, or a bypass bus, as the text says); red with "
    "<b>MISBOUND</b> = a vfio device whose DMA bypasses the vIOMMU. "
    "&#9656; opens a folded part (no vfio device in it).</p>"
)


def vm_page(name: str, result: TargetResult | None) -> str:
    """`/vms/{name}`: banner, topology, evidence."""
    a = result.analysis if result is not None else None
    label = vm_label(name, result)
    facts = [esc(name)]
    if a is not None:
        if a.identity.vmid:
            facts.append(f"VMID {esc(a.identity.vmid)}")
        if a.identity.uuid:
            facts.append(f"UUID {esc(a.identity.uuid)}")
        facts.append(f"QEMU {esc(a.qemu_version or '?')}")
        vi = ", ".join(f"{v.label} ({v.type})" for v in a.viommus) or "none"
        facts.append(f"vIOMMU: {esc(vi)}")
    state = vm_state(result)
    head = (
        _head(f"qmpguard: {label}: {STATE_WORD[state]}")
        + f'<p class="nav"><a href="/">all VMs</a> · <a href="/api/v1/vms/'
        f'{quote(name, safe="")}">JSON</a></p><h1>{esc(label)}</h1>'
        f'<p class="muted">{" · ".join(facts)}</p>'
    )
    findings = target_findings(result) if result is not None else []
    vm_wide = [f for f in findings if f.device is None]
    tail = (
        '<h2 id="vm-findings">Findings on the whole VM</h2><ul>'
        + "".join(_finding_li(f) for f in vm_wide)
        + "</ul>"
        if vm_wide
        else ""
    ) + "</body></html>"
    if result is None or a is None:
        return head + banner(result, []) + tail
    rows = tree_rows(a, findings)
    devices = sum(r.kind == "device" for r in rows)
    return (
        head
        + banner(result, rows)
        + f"<h2>Topology: {devices} PCI devices</h2>"
        + LEGEND
        + topology_html(rows)
        + "<h2>Evidence</h2>"
        + evidence_html(rows)
        + tail
    )
