"""The PCI topology as a tree, and a VM's state at a glance: the model the terminal tree and
table and the daemon's pages all draw.

`tree_rows` is the pure model (one row per bus or device, in drawing order); `vm_state`,
`problem_rows` and `state_sentence` summarise a VM (its worst state; the problem devices,
worst first); `render_tree` draws all of it for a terminal: problems first, then the tree,
each vfio device's verdict right after its name (at most NAME_MAX characters: long names
are shortened in the middle, the JSON report keeps them whole, so the verdict stays on an
80-column screen), colour only on a TTY without NO_COLOR and never the only signal.
"""

from __future__ import annotations

import os
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from qmpguard.analysis.findings import Finding
from qmpguard.analysis.model import BindingKind, Severity, Verdict
from qmpguard.analysis.topology import PciBus
from qmpguard.analysis.viommu import VIommu
from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis
from qmpguard.report.document import target_findings
from qmpguard.report.text import printable as P
from qmpguard.report.words import VERDICT_WORD, memory_short
from qmpguard.result import TargetResult

#: Longest name a terminal report prints whole; longer ones keep their head and tail.
NAME_MAX = 32
ELLIPSIS = "..."
#: A name inside a line of text: a run without spaces, `@`, commas or brackets.
_NAME = re.compile(r"[^\s@,()]+")
#: Problem devices listed above a terminal tree or table; the rest are counted.
PROBLEM_LINES_MAX = 10


def shorten_middle(name: str, limit: int = NAME_MAX) -> str:
    """`/machine/peripheral-anon/device[12]` -> `/machine/periph...anon/device[12]`."""
    if len(name) <= limit:
        return name
    keep = limit - len(ELLIPSIS)
    head = (keep + 1) // 2
    return name[:head] + ELLIPSIS + name[len(name) - (keep - head) :]


def shorten_names(text: str, limit: int = NAME_MAX) -> str:
    """`text` with every name in it longer than `limit` shortened in the middle."""
    return _NAME.sub(lambda m: shorten_middle(m.group(), limit), text)


def short_bus(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def expected_text(d: DeviceAnalysis) -> str:
    b = d.binding
    if b.kind is BindingKind.MEMORY:
        return memory_short(b)
    assert b.viommu is not None and b.requester is not None
    return f"{b.viommu.label} rid {b.requester.devfn_text}@{short_bus(b.requester.bus)}"


@dataclass(frozen=True)
class TreeRow:
    """One line of the tree."""

    depth: int
    kind: str  # "bus" | "device"
    label: str  # bus name, or device id/path
    detail: str  # bus: type and role; device: devfn, BDF, type
    expected: str  # device: where its DMA goes
    space: str | None  # letter of a shared IOMMU address space (aliasing), else None
    memory: bool  # DMA to plain guest memory (no vIOMMU or bypass)
    vfio: bool
    verdict: Verdict
    findings: tuple[Finding, ...]
    evidence: tuple[str, ...]


def _shared_spaces(vm: VmAnalysis) -> dict[str, str]:
    """device path -> letter, for devices whose requester ID is shared with others."""
    groups: dict[tuple[object, str, int], list[str]] = {}
    for d in vm.devices:
        r = d.binding.requester
        if r is not None:
            groups.setdefault((d.binding.viommu, r.bus, r.devfn), []).append(d.device.path)
    letters = iter(string.ascii_uppercase * 4)
    out: dict[str, str] = {}
    for key in sorted(groups, key=str):
        if len(groups[key]) > 1:
            letter = next(letters)
            out.update(dict.fromkeys(groups[key], letter))
    return out


@dataclass(frozen=True)
class _Tree:
    """What every row of one VM's tree is drawn from (tree_rows: one walk, many rows)."""

    vm: VmAnalysis
    findings: list[Finding]
    by_dev: dict[str, DeviceAnalysis]
    shared: dict[str, str]  # device path -> letter of its shared address space
    covered: dict[str, VIommu]  # bus path -> the vIOMMU translating it
    child_buses: dict[str, list[str]]  # device path -> the buses it owns
    rows: list[TreeRow]


def tree_rows(vm: VmAnalysis, findings: list[Finding]) -> list[TreeRow]:
    """Rows in drawing order: each root bus, then its devices and their buses, depth-first."""
    topo = vm.topology
    child_buses: dict[str, list[str]] = {}
    for bus in topo.buses.values():
        if bus.parent_device:
            child_buses.setdefault(bus.parent_device, []).append(bus.path)
    tree = _Tree(
        vm,
        findings,
        {d.device.path: d for d in vm.devices},
        _shared_spaces(vm),
        {v.covers: v for v in vm.viommus if v.covers},
        child_buses,
        [],
    )
    roots = [b for b in topo.buses.values() if b.parent_device is None]
    for bus in sorted(roots, key=lambda b: (b.path != topo.main_root, b.path)):
        _bus_rows(tree, bus.path, 0)
    return tree.rows


def _bus_role(bus: PciBus, covered: VIommu | None) -> list[str]:
    """What a bus does to the requester IDs and DMA of the devices on it."""
    role = []
    if bus.root:
        role.append("root bus")
    if bus.bypass_iommu:
        # QEMU checks bypass on the root of the aliased requester: behind a conventional
        # expander that is the expander's own bus, so its bypass_iommu has no effect.
        role.append(
            "bypasses the vIOMMU"
            if bus.express
            else "bypass_iommu set but without effect (requester IDs aliased upstream)"
        )
    if covered is not None:
        role.append(f"translated by {covered.label} ({covered.type})")
    if not bus.express:
        role.append("conventional PCI: requester IDs aliased")
    return role


def _bus_rows(tree: _Tree, path: str, depth: int) -> None:
    """The row of one bus, then those of its devices by devfn (and so on down)."""
    bus = tree.vm.topology.buses[path]
    role = _bus_role(bus, tree.covered.get(path))
    tree.rows.append(
        TreeRow(
            depth,
            "bus",
            path.rsplit("/", 1)[-1],
            f"{bus.type}" + (f", {', '.join(role)}" if role else ""),
            "",
            None,
            False,
            False,
            Verdict.NOT_APPLICABLE,
            (),
            (),
        )
    )
    members = sorted(
        (tree.by_dev[p] for p in bus.devices if p in tree.by_dev), key=lambda d: d.device.devfn
    )
    for d in members:
        _device_rows(tree, d, depth + 1)


def _device_rows(tree: _Tree, d: DeviceAnalysis, depth: int) -> None:
    """The row of one device, then those of the buses it owns (a bridge's, by path)."""
    dev = d.device
    mine = tuple(f for f in tree.findings if f.device == dev.path)
    tree.rows.append(
        TreeRow(
            depth,
            "device",
            dev.label,
            f"{dev.devfn_text} {d.bdf or '-'} {dev.type}",
            expected_text(d),
            tree.shared.get(dev.path),
            d.binding.kind is BindingKind.MEMORY,
            dev.vfio,
            d.verdict,
            mine,
            tuple(
                f"{e.source}: {e.conclusion or 'inconclusive'}: {e.detail}"
                for e in d.order.evidence
            ),
        )
    )
    for child in sorted(tree.child_buses.get(dev.path, [])):
        _bus_rows(tree, child, depth + 1)


class VmState(StrEnum):
    """A VM at a glance, worst first: the status page's order, counts and filter."""

    CRITICAL = "critical"
    UNKNOWN = "unknown"  # not inspected (yet), or a finding of unknown severity
    WARNING = "warning"
    VFIO_OK = "vfio-ok"  # vfio devices, every one bound to its vIOMMU
    NO_VFIO = "no-vfio"  # no vfio device: nothing here can be misbound

    @property
    def rank(self) -> int:
        """0 for the worst state."""
        return list(VmState).index(self)

    @property
    def problem(self) -> bool:
        return self in (VmState.CRITICAL, VmState.UNKNOWN, VmState.WARNING)


#: The state as one word (in capitals when it needs action, so it reads without colour).
STATE_WORD: dict[VmState, str] = {
    VmState.CRITICAL: "CRITICAL",
    VmState.UNKNOWN: "UNKNOWN",
    VmState.WARNING: "WARNING",
    VmState.VFIO_OK: "ok",
    VmState.NO_VFIO: "no vfio",
}
#: The state in a summary's counts ("3 critical, 40 vfio devices, all ok").
STATE_COUNTED: dict[VmState, str] = {
    VmState.CRITICAL: "critical",
    VmState.UNKNOWN: "unknown or not inspected",
    VmState.WARNING: "warning",
    VmState.VFIO_OK: "vfio devices, all ok",
    VmState.NO_VFIO: "no vfio device",
}
_BY_SEVERITY = (
    (Severity.CRITICAL, VmState.CRITICAL),
    (Severity.UNKNOWN, VmState.UNKNOWN),
    (Severity.WARNING, VmState.WARNING),
)


def vm_state(result: TargetResult | None) -> VmState:
    """The worst state of one VM; None (never inspected) is UNKNOWN."""
    if result is None or result.analysis is None:
        return VmState.UNKNOWN
    severities = {f.severity for f in result.analysis.findings}
    for severity, state in _BY_SEVERITY:
        if severity in severities:
            return state
    if any(d.device.vfio for d in result.analysis.devices):
        return VmState.VFIO_OK
    return VmState.NO_VFIO


def row_severity(row: TreeRow) -> Severity | None:
    """A device row's worst finding at warning or above (a MISBOUND verdict is critical
    and UNVERIFIED a warning even without their findings); None for no problem."""
    found = [f.severity for f in row.findings if f.severity.rank >= Severity.WARNING.rank]
    if row.verdict is Verdict.MISBOUND:
        found.append(Severity.CRITICAL)
    elif row.verdict is Verdict.UNVERIFIED:
        found.append(Severity.WARNING)
    return max(found, key=lambda s: s.rank) if found else None


def problem_rows(rows: list[TreeRow]) -> list[TreeRow]:
    """The device rows with a problem, worst first (drawing order among equals)."""
    ranked = [
        (sev.rank, i, r)
        for i, r in enumerate(rows)
        if r.kind == "device" and (sev := row_severity(r)) is not None
    ]
    return [r for _, _, r in sorted(ranked, key=lambda t: (-t[0], t[1]))]


def worst_finding(row: TreeRow) -> Finding | None:
    return max(row.findings, key=lambda f: f.severity.rank, default=None)


def first_sentence(message: str) -> str:
    return message.split(". ")[0]


def state_sentence(result: TargetResult | None) -> str:
    """`4 vfio devices: 1 MISBOUND, 3 ok; findings: 1 critical, 1 warning`."""
    if result is None:
        return "not inspected yet"
    if result.analysis is None:
        return f"not inspected: {result.error.message if result.error else 'unknown error'}"
    vfio = Counter(d.verdict for d in result.analysis.devices if d.device.vfio)
    total = sum(vfio.values())
    if not total:
        text = "no vfio device"
    elif vfio[Verdict.OK] == total:
        text = f"{total} vfio devices, all ok" if total > 1 else "1 vfio device, ok"
    else:
        counts = ", ".join(
            f"{vfio[v]} {VERDICT_WORD[v]}"
            for v in (Verdict.MISBOUND, Verdict.UNVERIFIED, Verdict.OK)
            if vfio[v]
        )
        text = f"{total} vfio device{'s' if total > 1 else ''}: {counts}"
    by_sev = Counter(f.severity for f in result.analysis.findings)
    found = ", ".join(
        f"{by_sev[s]} {s}"
        for s in (Severity.CRITICAL, Severity.UNKNOWN, Severity.WARNING, Severity.INFO)
        if by_sev[s]
    )
    return text + (f"; findings: {found}" if found else "")


_COLOURS = {
    "critical": "\033[1;31m",
    "warning": "\033[33m",
    "memory": "\033[2m",
    "reset": "\033[0m",
    "vfio": "\033[1m",
}
_STATE_COLOUR = {
    VmState.CRITICAL: "critical",
    VmState.UNKNOWN: "warning",
    VmState.WARNING: "warning",
}


def _use_colour() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _verdict_word(row: TreeRow) -> str:
    return VERDICT_WORD[row.verdict] if row.verdict is not Verdict.NOT_APPLICABLE else ""


def problem_lines(result: TargetResult, colour: bool = False) -> list[str]:
    """The head of a VM's terminal report: its state, then each problem device (worst
    first, at most PROBLEM_LINES_MAX) and each finding on no device."""
    c = _COLOURS if colour else dict.fromkeys(_COLOURS, "")
    state = vm_state(result)
    style = c[_STATE_COLOUR[state]] if state in _STATE_COLOUR else ""
    lines = [
        f"  {style}{STATE_WORD[state]}{c['reset'] if style else ''}  " + P(state_sentence(result))
    ]
    if result.analysis is None:
        return lines
    findings = target_findings(result)
    entries: list[str] = []
    for row in problem_rows(tree_rows(result.analysis, findings)):
        f = worst_finding(row)
        sev = row_severity(row)
        style = c["critical"] if sev is Severity.CRITICAL else c["warning"]
        word = _verdict_word(row) or (f.code if f else "")
        why = f"{f.code} {f.severity}: {first_sentence(f.message)}" if f else ""
        entries.append(
            f"  {style}! {word:<10}{c['reset'] if style else ''} "
            + P(shorten_names(f"{shorten_middle(row.label)}  {why}"))
        )
    entries.extend(
        f"  ! {f.code} {f.severity}: {P(shorten_names(first_sentence(f.message)))}"
        for f in findings
        if f.device is None and f.severity.rank >= Severity.WARNING.rank
    )
    if len(entries) > PROBLEM_LINES_MAX:
        more = len(entries) - PROBLEM_LINES_MAX + 1
        entries = [*entries[: PROBLEM_LINES_MAX - 1], f"  ... and {more} more problems below"]
    return lines + entries


def render_tree_target(result: TargetResult, colour: bool | None = None) -> str:
    colour = _use_colour() if colour is None else colour
    findings = target_findings(result)
    vm = result.analysis
    if vm is None:
        return f"== {P(result.target)}: NOT INSPECTED\n  {P(findings[0].message)}"
    c = _COLOURS if colour else dict.fromkeys(_COLOURS, "")
    vi = P(", ".join(f"{shorten_middle(v.label)} ({v.type})" for v in vm.viommus) or "none")
    head = f"{P(vm.identity.label)} ({P(result.target)})"
    lines = [f"== {head}  QEMU {vm.qemu_version or '?'}  vIOMMU: {vi}"]
    lines.extend(problem_lines(result, colour))
    rows = tree_rows(vm, findings)
    for row in rows:
        indent = "  " * (row.depth + 1)
        label = P(shorten_middle(row.label))
        if row.kind == "bus":
            lines.append(f"{indent}[bus {label}] {P(shorten_names(row.detail))}")
            continue
        tags = []
        if row.vfio:
            tags.append("VFIO")
        if row.space:
            tags.append(f"shared space {row.space}")
        verdict = _verdict_word(row)
        line = (
            f"{indent}{label}  {verdict + '  ' if verdict else ''}{P(row.detail)}"
            f"  -> {P(shorten_names(row.expected))}" + (f"  [{', '.join(tags)}]" if tags else "")
        )
        style = (
            c["critical"]
            if row.verdict is Verdict.MISBOUND
            else c["vfio"]
            if row.vfio
            else c["memory"]
            if row.memory
            else ""
        )
        lines.append(f"{style}{line}{c['reset'] if style else ''}")
        for f in row.findings:
            sev = c["critical"] if f.severity is Severity.CRITICAL else c["warning"]
            lines.append(
                f"{indent}  {sev}! {f.code} {f.severity}{c['reset']}: "
                + P(shorten_names(first_sentence(f.message)))
            )
    rest = [f for f in findings if f.device is None]
    lines.extend(f"  ! {f.code} {f.severity}: {P(f.message)}" for f in rest)
    return "\n".join(lines)


def render_tree(results: list[TargetResult]) -> str:
    return "\n\n".join(render_tree_target(r) for r in results) + "\n"
