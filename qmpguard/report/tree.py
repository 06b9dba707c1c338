"""The PCI topology as a tree: root bus -> bridges -> devices, with DMA spaces and findings.

`tree_rows` is the pure model (one row per bus or device, in drawing order); `render_tree`
draws it for a terminal. The daemon's SVG page draws the same rows.
"""

from __future__ import annotations

import os
import string
import sys
from dataclasses import dataclass

from qmpguard.analysis.findings import Finding
from qmpguard.analysis.model import BindingKind, Severity, Verdict
from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis
from qmpguard.report.document import target_findings
from qmpguard.report.table import expected_text
from qmpguard.report.text import printable as P
from qmpguard.report.words import VERDICT_WORD
from qmpguard.result import TargetResult


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


def tree_rows(vm: VmAnalysis, findings: list[Finding]) -> list[TreeRow]:
    """Rows in drawing order: each root bus, then its devices and their buses, depth-first."""
    topo = vm.topology
    by_dev: dict[str, DeviceAnalysis] = {d.device.path: d for d in vm.devices}
    shared = _shared_spaces(vm)
    covered = {v.covers: v for v in vm.viommus if v.covers}
    child_buses: dict[str, list[str]] = {}
    for bus in topo.buses.values():
        if bus.parent_device:
            child_buses.setdefault(bus.parent_device, []).append(bus.path)
    rows: list[TreeRow] = []

    def bus_row(path: str, depth: int) -> None:
        bus = topo.buses[path]
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
        if path in covered:
            role.append(f"translated by {covered[path].label} ({covered[path].type})")
        if not bus.express:
            role.append("conventional PCI: requester IDs aliased")
        rows.append(
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
            (by_dev[p] for p in bus.devices if p in by_dev), key=lambda d: d.device.devfn
        )
        for d in members:
            device_row(d, depth + 1)

    def device_row(d: DeviceAnalysis, depth: int) -> None:
        dev = d.device
        mine = tuple(f for f in findings if f.device == dev.path)
        rows.append(
            TreeRow(
                depth,
                "device",
                dev.label,
                f"{dev.devfn_text} {d.bdf or '-'} {dev.type}",
                expected_text(d),
                shared.get(dev.path),
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
        for child in sorted(child_buses.get(dev.path, [])):
            bus_row(child, depth + 1)

    roots = [b for b in topo.buses.values() if b.parent_device is None]
    for bus in sorted(roots, key=lambda b: (b.path != topo.main_root, b.path)):
        bus_row(bus.path, 0)
    return rows


_COLOURS = {
    "critical": "\033[1;31m",
    "warning": "\033[33m",
    "memory": "\033[2m",
    "reset": "\033[0m",
    "vfio": "\033[1m",
}


def _use_colour() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def render_tree_target(result: TargetResult, colour: bool | None = None) -> str:
    colour = _use_colour() if colour is None else colour
    findings = target_findings(result)
    vm = result.analysis
    if vm is None:
        return f"== {P(result.target)}: NOT INSPECTED\n  {P(findings[0].message)}"
    c = _COLOURS if colour else dict.fromkeys(_COLOURS, "")
    vi = P(", ".join(f"{v.label} ({v.type})" for v in vm.viommus) or "none")
    head = f"{P(vm.identity.label)} ({P(result.target)})"
    lines = [f"== {head}  QEMU {vm.qemu_version or '?'}  vIOMMU: {vi}"]
    for row in tree_rows(vm, findings):
        indent = "  " * (row.depth + 1)
        if row.kind == "bus":
            lines.append(f"{indent}[bus {P(row.label)}] {P(row.detail)}")
            continue
        tags = []
        if row.vfio:
            tags.append("VFIO")
        if row.space:
            tags.append(f"shared space {row.space}")
        verdict = VERDICT_WORD[row.verdict] if row.verdict is not Verdict.NOT_APPLICABLE else ""
        line = (
            f"{indent}{P(row.label)}  {P(row.detail)}  -> {P(row.expected)}"
            + (f"  [{', '.join(tags)}]" if tags else "")
            + (f"  {verdict}" if verdict else "")
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
                + P(f.message.split(". ")[0])
            )
    rest = [f for f in findings if f.device is None]
    lines.extend(f"  ! {f.code} {f.severity}: {P(f.message)}" for f in rest)
    return "\n".join(lines)


def render_tree(results: list[TargetResult]) -> str:
    return "\n\n".join(render_tree_target(r) for r in results) + "\n"
