"""The preflight contract on every live VM the suite starts (issue 16).

For every live VM with a vfio device on its command line, `preflight` of that command
line and `check` of the running VM must agree on every vfio verdict (`compare`): the
same verdict (and, where both conclude, the same binding); or preflight unverified with
its reason while check concludes; or check unverified while preflight concludes (check
has less to go on than the command line alone: e.g. an anonymous device next to an
implicit one). Never ok against misbound.

`qemu_vm` calls `disagreements_with_preflight` for each VM it started, before stopping it;
the `libvirt_domain` fixture calls `libvirt_disagreements` for each domain before
destroying it. So a new scenario is checked both ways without touching any test. The
generator's agreement (tests/generator/preflight_runs.py) uses the same `compare`.

Both sides come from qmpguard's own code paths: preflight as `qmpguard preflight
--cmdline-file /proc/PID/cmdline` (or `--libvirt-xml`) computes it, in process; check
over QMP through qmpguard.inspection, the allow-list and the trace audit included.

Only devices on the command line are compared: preflight cannot know what a test
hot-plugs later (check's `hotplugged` and the QMP trace say which), and a hot-unplugged
command-line device is no longer the VM's. What is compared and skipped, by reason, is
written to tests/artifacts/agreement-<pid>.json (format: `Tally.to_json`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from traceback import format_exc
from typing import Any, TypeVar

from qmpguard.analysis.model import BindingKind, Verdict
from qmpguard.analysis.preflight import HIDDEN_VFIO, Preflight
from qmpguard.analysis.vm import DeviceAnalysis, VmAnalysis
from qmpguard.demo.fakevfio import mapped_bytes_by_group
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.errors import ErrorReason
from qmpguard.inspection import inspect_target
from qmpguard.preflight_command import InputError, load
from qmpguard.result import TargetResult
from qmpguard.targets import DEFAULT_LIBVIRT_URI, Target

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SCHEMA = "qmpguard.tests.agreement/1"

# ------------------------------------------------------------------ the rule


class Match(StrEnum):
    """How one vfio device's two verdicts relate."""

    SAME = "same"  # the same verdict (and binding, where both conclude)
    PREFLIGHT_UNVERIFIED = "preflight-unverified"  # with its reason; check concludes
    CHECK_UNVERIFIED = "check-unverified"  # preflight concludes
    KNOWN = "known"  # a disagreement listed in KNOWN, until preflight is fixed
    DISAGREE = "disagree"


@dataclass(frozen=True)
class Side:
    """What one side (check or preflight) says about one vfio device."""

    verdict: Verdict
    kind: BindingKind
    devfn: str
    requester_devfn: str | None
    #: every order-evidence statement, as "source: conclusion: detail"
    evidence: tuple[str, ...]
    #: why the order is not known: the details of the inconclusive statements
    reason: str

    def __str__(self) -> str:
        return f"{self.verdict} ({self.kind}, {self.devfn})"


def side_of(dev: DeviceAnalysis) -> Side:
    """A device as qmpguard analysed it (live snapshot or preflight)."""
    b = dev.binding
    evidence = dev.order.evidence
    return Side(
        dev.verdict,
        b.kind,
        dev.device.devfn_text,
        b.requester.devfn_text if b.requester else None,
        tuple(f"{e.source}: {e.conclusion or 'no conclusion'}: {e.detail}" for e in evidence),
        "; ".join(e.detail for e in evidence if e.conclusion is None and e.detail),
    )


def side_of_json(doc: dict[str, Any]) -> Side:
    """A device as `check --format json` reports it (report/document.py device_json)."""
    requester = doc["expected"]["requester"]
    evidence = doc["order"]["evidence"]
    return Side(
        Verdict(doc["verdict"]),
        BindingKind(doc["expected"]["kind"]),
        doc["devfn"],
        requester["devfn"] if requester else None,
        tuple(
            f"{e['source']}: {e['conclusion'] or 'no conclusion'}: {e['detail']}" for e in evidence
        ),
        "; ".join(e["detail"] for e in evidence if e["conclusion"] is None and e["detail"]),
    )


@dataclass(frozen=True)
class Comparison:
    """One device compared: how the verdicts relate, what is wrong (nothing: they agree)."""

    match: Match
    problems: tuple[str, ...] = ()
    note: str = ""  # for the allowed differences: what each side said, and why


def compare(where: str, live: Side, pre: Side) -> Comparison:
    """Issue 16's rule for one vfio device: `live` is check's view, `pre` preflight's."""
    if live.verdict == pre.verdict:
        if live.verdict is Verdict.UNVERIFIED:
            return Comparison(Match.SAME)
        return Comparison(Match.SAME, _binding_problems(where, live, pre))
    if pre.verdict is Verdict.UNVERIFIED:
        if not pre.reason:
            problem = f"{where}: preflight unverified without a reason, check {live.verdict}"
            return Comparison(Match.DISAGREE, (problem,))
        note = f"{where}: check {live.verdict}, preflight unverified: {pre.reason}"
        return Comparison(Match.PREFLIGHT_UNVERIFIED, note=note)
    if live.verdict is Verdict.UNVERIFIED:
        note = f"{where}: check unverified ({live.reason}), preflight {pre.verdict}"
        return Comparison(Match.CHECK_UNVERIFIED, note=note)
    problem = (
        f"{where}: check says {live.verdict}, preflight says {pre.verdict}; "
        f"preflight evidence: {list(pre.evidence)}"
    )
    return Comparison(Match.DISAGREE, (problem,))


def _binding_problems(where: str, live: Side, pre: Side) -> tuple[str, ...]:
    """Where both conclude alike, they must expect the same binding."""
    if live.kind != pre.kind:
        return (f"{where}: check expects {live.kind}, preflight {pre.kind}",)
    problems = []
    if live.devfn != pre.devfn:
        problems.append(f"{where}: devfn {live.devfn} live, {pre.devfn} preflight")
    if (
        live.requester_devfn is not None
        and pre.requester_devfn is not None
        and live.requester_devfn != pre.requester_devfn
    ):
        problems.append(
            f"{where}: requester {live.requester_devfn} live, {pre.requester_devfn} preflight"
        )
    return tuple(problems)


def unverified_reason(dev: DeviceAnalysis) -> str:
    """Why qmpguard could not place a device in order (its inconclusive evidence)."""
    return side_of(dev).reason


# ------------------------------------------------------------------ known disagreements


@dataclass(frozen=True)
class KnownDisagreement:
    """A disagreement preflight still has, by name and reason: allowed only where every
    field matches, so it can never hide another. The lead removes the entry once
    preflight (qmpguard/analysis/preflight.py) is fixed."""

    name: str
    reason: str
    #: each a substring of some element of the VM's command line
    argv_has: tuple[str, ...]
    device_type: str
    check: Verdict
    preflight: Verdict

    def covers(self, argv: Iterable[str], device_type: str, live: Side, pre: Side) -> bool:
        args = list(argv)
        return (
            device_type == self.device_type
            and live.verdict is self.check
            and pre.verdict is self.preflight
            and all(any(part in a for a in args) for part in self.argv_has)
        )


KNOWN: tuple[KnownDisagreement, ...] = ()


def known_disagreement(
    argv: Iterable[str], device_type: str, live: Side, pre: Side
) -> KnownDisagreement | None:
    return next((k for k in KNOWN if k.covers(argv, device_type, live, pre)), None)


# ------------------------------------------------------------------ one VM


class Skip(StrEnum):
    """Why a VM, or one of its vfio devices, was not compared."""

    # whole VMs
    NO_VFIO = "no-vfio-device"  # on the command line (as preflight reads it)
    PROCESS_GONE = "process-gone"  # QEMU exited (refused its command line, or the test
    PROCESS_STOPPED = "process-stopped"  # stopped it); SIGSTOPped: it cannot answer
    MONITOR_HELD = "monitor-held"  # a client (the test's) holds the monitor
    CHECK_FAILED = "check-failed"  # check could not inspect the VM (details in the JSON)
    DOMAIN_INACTIVE = "domain-inactive"  # a libvirt domain no longer running
    # single vfio devices
    HOTPLUGGED = "hot-plugged"  # not on the command line
    HOT_UNPLUGGED = "hot-unplugged"  # on the command line, then device_del
    UNSEEN = "preflight-cannot-see"  # behind what preflight cannot read: it says so


@dataclass
class VmOutcome:
    """One VM compared (or skipped): per device, how the verdicts relate."""

    label: str  # the command line, for messages
    argv: tuple[str, ...] = ()
    skipped: Skip | None = None
    detail: str = ""
    matches: list[tuple[str, Match]] = field(default_factory=list)  # (device, match)
    device_skips: list[tuple[str, Skip]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)  # names of KNOWN entries that applied
    verdicts: list[str] = field(default_factory=list)  # "check/preflight" per compared device
    seconds: float = 0.0

    def message(self) -> str:
        """For the failing test: the VM, each device's verdicts, what is wrong."""
        lines = [f"preflight and check disagree on {self.label}:", *self.problems]
        if self.notes:
            lines += ["(allowed differences on the same VM:)", *self.notes]
        return "\n  ".join(lines)


@dataclass(frozen=True)
class HotPlug:
    """What the QMP trace says was hot-plugged and unplugged (on any monitor)."""

    added_ids: frozenset[str] = frozenset()
    added_anonymous: bool = False
    removed: frozenset[str] = frozenset()  # device_del ids and QOM paths


_TRACE_REQ = re.compile(r"handle_qmp_command mon 0x[0-9a-f]+ req: (.*)")
_TRACE_ARG = re.compile(r"handle_qmp_command,.*file=([^,]+)")


def hotplug_of_trace(trace: Path | None) -> HotPlug:
    """device_add / device_del requests in a `-trace handle_qmp_command` log."""
    if trace is None or not trace.exists():
        return HotPlug()
    added: set[str] = set()
    anonymous = False
    removed: set[str] = set()
    for line in trace.read_text(errors="replace").splitlines():
        m = _TRACE_REQ.search(line)
        if not m:
            continue
        try:
            req = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        args = req.get("arguments") or {}
        if req.get("execute") == "device_add":
            if isinstance(args.get("id"), str):
                added.add(args["id"])
            else:
                anonymous = True
        elif req.get("execute") == "device_del" and isinstance(args.get("id"), str):
            removed.add(args["id"])
    return HotPlug(frozenset(added), anonymous, frozenset(removed))


def trace_of(argv: Iterable[str]) -> Path | None:
    """The `-trace handle_qmp_command,file=PATH` log of a command line, if any."""
    for arg in argv:
        m = _TRACE_ARG.search(arg)
        if m:
            return Path(m.group(1))
    return None


def _vfio(analysis: VmAnalysis) -> dict[str, DeviceAnalysis]:
    return {
        d.device.path: d for d in analysis.devices if d.device.vfio and d.device.path != HIDDEN_VFIO
    }


def pair(out: VmOutcome, pf: Preflight, live: VmAnalysis, hot: HotPlug) -> None:
    """Compare every vfio device on the command line with check's verdict for it."""
    pre_analysis = pf.analysis()
    pre = _vfio(pre_analysis)
    now = _vfio(live)
    unseen_said = any(
        d.device.path == HIDDEN_VFIO and d.verdict is Verdict.UNVERIFIED
        for d in pre_analysis.devices
    )
    for path, mine in pre.items():
        where = f"{mine.device.type} {mine.device.label}"
        if path in hot.removed or (mine.device.id is not None and mine.device.id in hot.removed):
            # gone, or a device the test plugged in its place: not the command line's
            now.pop(path, None)
            out.device_skips.append((where, Skip.HOT_UNPLUGGED))
            continue
        theirs = now.pop(path, None)
        if theirs is None:
            out.problems.append(f"{where} ({path}): in preflight, missing from check")
            continue
        if theirs.device.hotplugged:
            out.device_skips.append((where, Skip.HOTPLUGGED))  # re-plugged under its id
            continue
        _compare_device(out, where, theirs, mine)
    for path, theirs in now.items():
        where = f"{theirs.device.type} {theirs.device.label}"
        if theirs.device.hotplugged or _added(hot, theirs):
            out.device_skips.append((where, Skip.HOTPLUGGED))
        elif pf.hidden and unseen_said:
            out.device_skips.append((where, Skip.UNSEEN))
            out.notes.append(f"{where}: check {theirs.verdict}, preflight: {pf.hidden[0]}")
        else:
            out.problems.append(f"{where} ({path}): check {theirs.verdict}, missing from preflight")


def _added(hot: HotPlug, dev: DeviceAnalysis) -> bool:
    return dev.device.id in hot.added_ids if dev.device.id else hot.added_anonymous


def _compare_device(
    out: VmOutcome, where: str, theirs: DeviceAnalysis, mine: DeviceAnalysis
) -> None:
    live, pre = side_of(theirs), side_of(mine)
    out.verdicts.append(f"{live.verdict}/{pre.verdict}")
    result = compare(f"{where}: check {live}, preflight {pre}", live, pre)
    if result.match is Match.DISAGREE:
        known = known_disagreement(out.argv, mine.device.type, live, pre)
        if known is not None:
            out.matches.append((where, Match.KNOWN))
            out.known.append(known.name)
            out.notes.append(f"{where}: known disagreement {known.name!r}: {known.reason}")
            return
    out.matches.append((where, result.match))
    out.problems += result.problems
    if result.note:
        out.notes.append(result.note)


# ------------------------------------------------------------------ running both sides

_T = TypeVar("_T")


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """asyncio.run, also from inside a running loop (an async test's teardown)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def preflight_of_process(pid: int) -> Preflight:
    """What `qmpguard preflight --cmdline-file /proc/PID/cmdline` computes: the argv QEMU
    really got (wrapper scripts included) and its -readconfig files as QEMU sees them."""
    args = argparse.Namespace(argv=[], cmdline_file=f"/proc/{pid}/cmdline", libvirt_xml=None)
    return load(args).pf


def preflight_of_domain_xml(xml: str) -> Preflight:
    """What `virsh dumpxml DOMAIN | qmpguard preflight --libvirt-xml -` computes."""
    with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
        f.write(xml)
        f.flush()
        args = argparse.Namespace(argv=[], cmdline_file=None, libvirt_xml=f.name)
        return load(args).pf


def _failed(out: VmOutcome, result: TargetResult, gone: bool) -> bool:
    """A check without an analysis: skipped, by why."""
    if result.analysis is not None:
        return False
    err = result.error
    if gone:
        out.skipped = Skip.PROCESS_GONE
    elif err is not None and err.reason is ErrorReason.BUSY:
        out.skipped = Skip.MONITOR_HELD
    else:
        out.skipped = Skip.CHECK_FAILED
    out.detail = err.message if err else "no analysis"
    return True


def _dma_note(vm: QemuProcess) -> str:
    """The VFIO emulation's DMA log, if the VM has one: the truth behind a disagreement."""
    log = (vm.env or {}).get("QMPGUARD_VFIO_DMA_LOG")
    if not log or not Path(log).exists():
        return ""
    return f"DMA log {log}: bytes still mapped by IOMMU group {mapped_bytes_by_group(Path(log))}"


def is_stopped(pid: int) -> bool:
    """SIGSTOPped (a test of qmpguard's timeouts): it would only time out."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["T"]


def outcome_of_vm(vm: QemuProcess) -> VmOutcome:
    """Preflight of a running VM's command line against check of the VM."""
    out = VmOutcome(" ".join(vm.args))
    if vm.popen is None or vm.popen.poll() is not None:
        out.skipped = Skip.PROCESS_GONE
        return out
    try:
        pf = preflight_of_process(vm.pid)
    except InputError as exc:  # /proc/PID/cmdline went with the process
        out.skipped, out.detail = Skip.PROCESS_GONE, str(exc)
        return out
    out.argv = pf.argv
    out.label = " ".join(pf.argv)
    if not _vfio(pf.analysis()) and not pf.hidden:
        out.skipped = Skip.NO_VFIO
        return out
    if is_stopped(vm.pid):
        out.skipped = Skip.PROCESS_STOPPED
        return out
    result = _run(inspect_target(Target("unix", str(vm.qmp_path))))
    if _failed(out, result, vm.popen.poll() is not None):
        return out
    assert result.analysis is not None
    pair(out, pf, result.analysis, hotplug_of_trace(trace_of(vm.args)))
    if out.problems:
        dma = _dma_note(vm)
        out.problems += [dma] if dma else []
    return out


def outcome_of_domain(dom: Any, uri: str = DEFAULT_LIBVIRT_URI) -> VmOutcome:
    """Preflight --libvirt-xml of a running domain's XML against check libvirt:DOMAIN."""
    name = dom.name()
    out = VmOutcome(f"libvirt domain {name}")
    if not dom.isActive():
        out.skipped = Skip.DOMAIN_INACTIVE
        return out
    pf = preflight_of_domain_xml(dom.XMLDesc(0))
    out.argv = pf.argv
    out.label = f"libvirt domain {name}: {' '.join(pf.argv)}"
    if not _vfio(pf.analysis()) and not pf.hidden:
        out.skipped = Skip.NO_VFIO
        return out
    result = _run(inspect_target(Target("libvirt", name, uri)))
    if _failed(out, result, not dom.isActive()):
        return out
    assert result.analysis is not None
    pair(out, pf, result.analysis, HotPlug())
    return out


# ------------------------------------------------------------------ the tally


@dataclass
class Tally:
    """What this process compared and skipped: written after every VM."""

    started: float = field(default_factory=time.time)
    vms_compared: int = 0
    vm_skips: Counter[str] = field(default_factory=Counter)
    device_matches: Counter[str] = field(default_factory=Counter)
    device_skips: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    by_file: Counter[str] = field(default_factory=Counter)  # devices compared per test file
    seconds: float = 0.0
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    known: Counter[str] = field(default_factory=Counter)
    check_failures: list[dict[str, str]] = field(default_factory=list)
    #: the allowed differences (one side unverified, a known disagreement), each named
    allowed: list[dict[str, Any]] = field(default_factory=list)

    def add(self, out: VmOutcome, test: str) -> None:
        self.seconds += out.seconds
        if out.skipped is not None:
            self.vm_skips[out.skipped.value] += 1
            if out.skipped is Skip.CHECK_FAILED:
                self.check_failures.append({"test": test, "vm": out.label, "error": out.detail})
            return
        self.vms_compared += 1
        self.device_matches.update(m.value for _, m in out.matches)
        self.device_skips.update(s.value for _, s in out.device_skips)
        self.verdicts.update(out.verdicts)
        self.by_file[test.partition("::")[0]] += len(out.matches)
        self.known.update(out.known)
        if out.problems:
            self.disagreements.append({"test": test, "vm": out.label, "problems": out.problems})
        elif out.notes:
            self.allowed.append({"test": test, "vm": out.label, "notes": out.notes})

    def to_json(self) -> dict[str, Any]:
        """The artifact: counts of VMs and devices, compared and skipped by reason."""
        return {
            "schema": SCHEMA,
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "vms": {"compared": self.vms_compared, "skipped": dict(self.vm_skips)},
            "devices": {
                "compared": sum(self.device_matches.values()),
                "by_match": dict(self.device_matches),
                "by_verdicts": dict(self.verdicts),  # "check/preflight": count
                "by_file": dict(self.by_file),
                "skipped": dict(self.device_skips),
            },
            "known": dict(self.known),
            "disagreements": self.disagreements,
            "allowed": self.allowed,
            "check_failures": self.check_failures,
            "seconds": round(self.seconds, 3),
        }

    def write(self, folder: Path = ARTIFACTS) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"agreement-{os.getpid()}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path


TALLY = Tally()


def _record(make: Any, *args: Any) -> VmOutcome:
    """Compare, time and tally one VM. Never raises: a comparison that fails (preflight
    raising on a command line QEMU accepted, say) is a disagreement to report, and the
    fixture must still stop every VM."""
    started = time.monotonic()
    try:
        out: VmOutcome = make(*args)
    except Exception as exc:
        out = VmOutcome(repr(args), problems=[f"the comparison raised {exc!r}:\n{format_exc()}"])
    out.seconds = time.monotonic() - started
    test = os.environ.get("PYTEST_CURRENT_TEST", "").removesuffix(" (teardown)")
    TALLY.add(out, test)
    TALLY.write()
    return out


def disagreements_with_preflight(vm: QemuProcess) -> list[str]:
    """Compare a running VM both ways and tally it: the failure message, if any."""
    out = _record(outcome_of_vm, vm)
    return [out.message()] if out.problems else []


def libvirt_disagreements(dom: Any, uri: str = DEFAULT_LIBVIRT_URI) -> list[str]:
    """The same for a libvirt domain, before it is destroyed."""
    out = _record(outcome_of_domain, dom, uri)
    return [out.message()] if out.problems else []
