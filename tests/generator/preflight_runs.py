"""Preflight beside the live check, and fixes proven on the DMA log (issue 16).

agreement()  preflight of a scenario's command line (its -readconfig files read from
             disk, as `qmpguard preflight` does) against `check` of the running VM, per
             vfio device, by tests/agreement.py's compare() (the rule every live VM of
             the suite is held to): the same verdict; or preflight unverified with a
             stated reason while check concludes; or check unverified while preflight
             concludes. ok against misbound is never allowed. Where both conclude, the
             expected binding (kind, requester, devfn) must agree too. Here preflight's
             conclusions must also match the DMA log.
prove_fix()  a scenario with a vfio device realized before its vIOMMU: preflight's fix
             applied to the rendered command line, the VM started again with the VFIO
             emulation, and then every cold-plugged vfio device behind a vIOMMU must
             show 0 bytes mapped in the DMA log and `check` must say ok.

Scenarios run through runner.py (the same rendering, monitors, guest and audit).
"""

from __future__ import annotations

import asyncio
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qmpguard.analysis.model import BindingKind, Verdict
from qmpguard.analysis.preflight import HIDDEN_VFIO, Preflight, preflight, read_config_files
from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis
from qmpguard.demo.fakevfio import VfioDeviceSpec, create_sysfs_device
from qmpguard.fix import Fix, fixes
from qmpguard.preflight_command import qemu_version
from tests.agreement import Match, compare, side_of, side_of_json, unverified_reason
from tests.conftest import AUDIT, audit_qmp_trace
from tests.generator import runner
from tests.generator.model import QemuBinary, RenderContext, Scenario, render
from tests.generator.oracle import truth_of
from tests.generator.runner import Built, RunResult, free_tcp_port, run_scenario

_GROUP = re.compile(r"0000:([0-9a-f]+):00\.0$")


def preflight_of(argv: list[str], cwd: Path | None = None) -> Preflight:
    """What `qmpguard preflight --cwd CWD -- ARGV` computes (files read from disk)."""
    files, unreadable = read_config_files(argv, str(cwd) if cwd else None)
    return preflight(argv, files, unreadable, version=qemu_version(argv[0], None, None))


def rendered_preflight(scn: Scenario, argv: list[str], workdir: Path, built: Built) -> Preflight:
    """Preflight of `argv` with the -readconfig files as the scenario renders them into
    `workdir` (whether or not they are still on disk)."""
    ctx = RenderContext(workdir, QemuBinary("qemu", "qemu"), built.guest, 0, built.amd_guest)
    files: dict[str, str] = {}
    for n in range(len(scn.cfg_runs())):
        path = workdir / scn.cfg_file(n)
        text = render(scn, ctx).files.get(path)
        if text is not None:
            files[str(path)] = files[scn.cfg_file(n)] = text
    return preflight(argv, files, version=qemu_version(argv[0], None, None))


def vfio_by_group(pf: Preflight, vm: VmAnalysis) -> dict[int, DeviceAnalysis]:
    """Preflight's vfio devices by their IOMMU group (from the option's sysfsdev)."""
    out = {}
    for dev in vm.devices:
        if not dev.device.vfio:
            continue
        option = pf.option_of(dev.device.path)
        m = _GROUP.search((option.prop("sysfsdev") if option else None) or "")
        if m:
            out[int(m.group(1), 16)] = dev
    return out


@dataclass
class Agreement:
    """preflight against check for one run: what was compared, what is wrong."""

    compared: int = 0
    problems: list[str] = field(default_factory=list)
    #: preflight unverified (with its reason) where check concluded, or the reverse
    allowed: list[str] = field(default_factory=list)


def agreement(scn: Scenario, run: RunResult, cwd: Path) -> Agreement:
    """Compare preflight of `run.argv` (QEMU's working directory `cwd`) with check's
    report in `run` (status "ran")."""
    out = Agreement()
    assert run.doc is not None
    pf = preflight_of(run.argv, cwd)
    vm = pf.analysis()
    pre = vfio_by_group(pf, vm)
    hidden_said = any(
        d.device.path == HIDDEN_VFIO and d.verdict is Verdict.UNVERIFIED for d in vm.devices
    )
    live = {d["path"]: d for d in run.doc["devices"]}
    touched = {op.group for op in scn.hotplug}
    for present in run.present:
        if present.group in touched:
            continue  # hot-plugged or re-plugged: not on the command line
        doc = live.get(present.path)
        mine = pre.get(present.group)
        where = f"group {present.group} ({present.path})"
        if doc is not None and mine is None and pf.hidden and hidden_said:
            # in what preflight cannot see (a -readconfig gone or unparsable): it says so
            # with its stand-in, unverified, instead of a verdict
            out.allowed.append(
                f"{where}: check {doc['verdict']}, preflight cannot see it: {pf.hidden[0]}"
            )
            continue
        if doc is None or mine is None:
            out.problems.append(f"{where}: missing from {'check' if doc is None else 'preflight'}")
            continue
        out.compared += 1
        if mine.device.path != present.path and not pf.hidden:
            # (devices preflight cannot see take anonymous numbers too)
            out.problems.append(f"{where}: preflight names it {mine.device.path}")
        truth = truth_of(run.mapped.get(present.group))
        said = {f.code for f in vm.findings if f.device == mine.device.path}
        _compare(out, where, doc, mine, truth, "QG003" in said)
    return out


def _compare(
    out: Agreement,
    where: str,
    doc: dict[str, Any],
    mine: DeviceAnalysis,
    truth: str,
    qg003: bool,
) -> None:
    """tests/agreement.py's rule (the one every live VM of the suite is held to), and
    preflight's conclusions against the DMA log (`qg003`: preflight raised it on the
    device: pass-through is said per device, not per vIOMMU, since amd-iommu's IOAPIC
    space at 00:14.0 maps nothing on 10.0.0-10.0.3)."""
    live, pre = side_of_json(doc), side_of(mine)
    if pre.verdict is Verdict.MISBOUND and truth != "all-ram":
        out.problems.append(f"{where}: preflight says misbound, the DMA log says {truth}")
    v = mine.binding.viommu
    passthrough = v is not None and v.passthrough is not None and qg003
    if pre.verdict is Verdict.OK and passthrough and truth != "all-ram":
        # QG003: kept in pass-through, all guest RAM stays mapped in either order
        out.problems.append(f"{where}: preflight says pass-through, the DMA log says {truth}")
    if (
        pre.verdict is Verdict.OK
        and pre.kind is BindingKind.VIOMMU
        and not passthrough
        and truth != "translated"
    ):
        out.problems.append(f"{where}: preflight says ok, the DMA log says {truth}")
    result = compare(where, live, pre)
    out.problems += result.problems
    if result.match is Match.CHECK_UNVERIFIED:
        out.allowed.append(f"{result.note} (DMA log: {truth})")
    elif result.note:
        out.allowed.append(result.note)


# ------------------------------------------------------------------ running a rewritten argv


def run_transformed(
    scn: Scenario,
    qemu: QemuBinary,
    workdir: Path,
    built: Built,
    transform: Callable[[list[str]], list[str]],
) -> RunResult:
    """run_scenario, with `transform` applied to the rendered argv before QEMU starts."""
    started = time.monotonic()
    for attempt in range(3):
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = RenderContext(workdir, qemu, built.guest, free_tcp_port(), built.amd_guest)
        for path in (ctx.dma_log, ctx.console, ctx.trace):
            path.unlink(missing_ok=True)
        for group in scn.vfio_groups():
            create_sysfs_device(ctx.sysfs_root, VfioDeviceSpec(ctx.sysfs_dir(group).name, group))
        rendered = render(scn, ctx)
        for path, text in rendered.files.items():  # transform may read -readconfig files
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        rendered = replace(rendered, argv=transform(list(rendered.argv)))
        proc = runner._start(rendered, ctx, built.so)
        try:
            result = asyncio.run(runner._drive(scn, rendered, ctx, proc))
        except runner.Rejected as exc:
            if "Address already in use" in str(exc) and attempt < 2:
                continue
            result = RunResult(rendered.argv, "rejected", str(exc))
        except runner.HarnessError as exc:
            result = RunResult(rendered.argv, "harness-error", str(exc))
        except Exception:
            result = RunResult(rendered.argv, "harness-error", traceback.format_exc(limit=6))
        finally:
            runner._kill(proc)
        result.audit_refused = audit_qmp_trace(ctx.trace)
        AUDIT["vms"] += 1
        result.seconds = time.monotonic() - started
        return result
    raise AssertionError("unreachable")


def fixed_argv(argv: list[str], cwd: Path) -> tuple[list[str], list[Fix]]:
    """preflight --fix: fixes applied until nothing is realized before its vIOMMU."""
    pf = preflight_of(argv, cwd)
    applied: list[Fix] = []
    for _ in range(4):
        found = fixes(pf.analysis())
        if not found:
            return list(pf.argv), applied
        fix = found[0]
        applied.append(fix)
        if fix.argv is None:
            return list(pf.argv), applied
        pf = preflight(list(fix.argv), pf.files, target=pf.target, version=pf.version)
    return list(pf.argv), applied


@dataclass
class FixProof:
    """One fix, applied and run."""

    #: proven | nothing-to-fix | no-fix | rejected | harness-error | check-failed | failed
    status: str
    detail: str = ""
    fixes: list[str] = field(default_factory=list)
    before: RunResult | None = None
    after: RunResult | None = None
    #: vfio devices the DMA log shows bound after the fix but check cannot place in order
    #: (its own limits, e.g. anonymous devices next to -drive if=virtio): with reasons
    check_unverified: list[str] = field(default_factory=list)
    #: vfio devices preflight could not see (and said so): outside what the fix covers
    unseen: list[str] = field(default_factory=list)


def prove_fix(scn: Scenario, qemu: QemuBinary, workdir: Path, built: Built) -> FixProof:
    """Run `scn` as written, fix its command line, run it again: the DMA log and check
    must show every cold vfio device behind a vIOMMU correctly bound."""
    scn = replace(scn, hotplug=())
    before = run_scenario(scn, qemu, workdir / "before", built)
    if before.status != "ran":
        return FixProof(before.status, before.detail, before=before)
    if before.inspection_error is not None:  # check's failure: test_generated.py reports it
        return FixProof("check-failed", before.inspection_error, before=before)
    pf = rendered_preflight(scn, before.argv, workdir / "before", built)
    misbound = [d for d in pf.analysis().devices if d.verdict is Verdict.MISBOUND]
    if not misbound:
        verdicts = [
            f"{d.device.label}: {d.verdict}"
            + (f" ({unverified_reason(d)})" if d.verdict == "unverified" else "")
            for d in pf.analysis().devices
            if d.device.vfio
        ]
        return FixProof("nothing-to-fix", "; ".join(verdicts), before=before)
    applied: list[Fix] = []

    def transform(argv: list[str]) -> list[str]:
        new, found = fixed_argv(argv, workdir / "after")
        applied[:] = found
        return new

    after = run_transformed(scn, qemu, workdir / "after", built, transform)
    proof = FixProof("failed", fixes=[f.text for f in applied], before=before, after=after)
    if any(f.argv is None for f in applied):
        proof.status, proof.detail = "no-fix", "; ".join(f.text for f in applied)
        return proof
    if after.status != "ran":
        proof.status, proof.detail = after.status, after.detail
        return proof
    if after.inspection_error is not None:
        proof.status, proof.detail = "check-failed", after.inspection_error
        return proof
    problems = _fixed_problems(pf, before, after, proof.check_unverified, proof.unseen)
    if problems:
        proof.detail = "; ".join(problems)
        return proof
    proof.status = "proven"
    return proof


def _fixed_problems(
    pf_before: Preflight,
    before: RunResult,
    after: RunResult,
    unverified: list[str],
    unseen: list[str],
) -> list[str]:
    problems = []
    assert after.doc is not None and before.doc is not None
    was = vfio_by_group(pf_before, pf_before.analysis())
    for g, dev in was.items():
        if dev.verdict is Verdict.MISBOUND and truth_of(before.mapped.get(g)) != "all-ram":
            problems.append(
                f"group {g}: misbound by preflight, but {before.mapped.get(g)} bytes mapped"
            )
    live = {d["path"]: d for d in after.doc["devices"]}
    for present in after.present:
        if present.group not in was:
            # a device preflight cannot see (an unparsable -readconfig): it said so, as
            # unverified; its fix cannot cover what it cannot see
            unseen.append(f"group {present.group}")
            continue
        doc = live.get(present.path)
        if doc is None:
            problems.append(f"group {present.group}: not in check's report after the fix")
            continue
        truth = truth_of(after.mapped.get(present.group))
        if doc["verdict"] == "unverified":
            reasons = [e["detail"] for e in doc["order"]["evidence"] if e["conclusion"] is None]
            unverified.append(f"group {present.group}: {'; '.join(reasons)}")
        elif doc["verdict"] != "ok":
            problems.append(f"group {present.group}: check says {doc['verdict']} after the fix")
        if doc["expected"]["kind"] == "viommu" and truth != "translated":
            problems.append(
                f"group {present.group}: {after.mapped.get(present.group)} bytes still mapped "
                "after the fix"
            )
    seen = {present.path for present in after.present if present.group in was}
    qg001 = [f for f in after.doc["findings"] if f["code"] == "QG001" and f["device"] in seen]
    if qg001:
        problems.append(f"QG001 after the fix: {[f['device'] for f in qg001]}")
    if after.audit_refused:
        problems.append(f"audit: {after.audit_refused}")
    return problems
