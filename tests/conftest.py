"""Shared fixtures: real QEMU processes, each stopped at teardown, each audited.

Read-only proof: every VM started here runs with QEMU's `handle_qmp_command` trace, so
QEMU itself logs every command any client sends. At teardown each logged command that
did not come from the test's own setup monitor must pass qmpguard's allow-list; the
session ends with a count of audited commands (and fails if a test sent none at all
through qmpguard while claiming to).
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.qmp.allowlist import ForbiddenCommand, check_command
from tests.agreement import disagreements_with_preflight

REPO = Path(__file__).resolve().parent.parent
QEMU_ARM = "qemu-system-aarch64"
#: QEMU builds unpacked into .cache by deploy/ scripts (no system change), oldest first.
CACHED_QEMU = {"10.0": "qemu-10.0", "11.1": "qemu-11.1"}


def qemu_matrix(arch: str = "x86_64") -> dict[str, str]:
    """The QEMU builds the integration tests run on, by label, for x86_64 or aarch64.

    QMPGUARD_TEST_QEMU=/path/to/qemu-system-x86_64 (QMPGUARD_TEST_QEMU_ARM for aarch64)
    runs them on that binary alone; otherwise the system QEMU (7.2 on Debian 12) and each
    build in .cache that deploy/install-dev.sh has unpacked: bookworm-backports' 10.0
    (x86_64 only, deploy/fetch-qemu-backport.sh) and trixie-backports' 11.1 (x86_64 and
    aarch64, deploy/fetch-qemu-11.sh).
    """
    override = os.environ.get("QMPGUARD_TEST_QEMU" + ("_ARM" if arch == "aarch64" else ""))
    if override:
        return {"custom": override}
    matrix = {"system": f"qemu-system-{arch}"}
    for label, folder in CACHED_QEMU.items():
        binary = REPO / ".cache" / folder / f"qemu-system-{arch}"
        if binary.exists():
            matrix[label] = str(binary)
    return matrix


QEMU_MATRIX = qemu_matrix()
QEMU_ARM_MATRIX = qemu_matrix("aarch64")
QEMU_X86 = next(iter(QEMU_MATRIX.values()))
SETUP_MARKER = "qmpguard-test-setup"

requires_qemu = pytest.mark.skipif(
    shutil.which(QEMU_X86) is None and not Path(QEMU_X86).exists(),
    reason=f"{QEMU_X86} not installed",
)

VmFactory = Callable[..., QemuProcess]
_TRACE_LINE = re.compile(r"handle_qmp_command mon (0x[0-9a-f]+) req: (.*)")
AUDIT = {"commands": 0, "vms": 0}


def audit_qmp_trace(trace: Path) -> list[str]:
    """Commands in a QEMU trace log that the allow-list refuses (setup monitor excluded)."""
    if not trace.exists():
        return []
    entries = []
    for line in trace.read_text(errors="replace").splitlines():
        m = _TRACE_LINE.search(line)
        if m:
            try:
                entries.append((m.group(1), json.loads(m.group(2))))
            except json.JSONDecodeError:
                entries.append((m.group(1), {"execute": f"<unparsable: {m.group(2)[:80]}>"}))
    setup_monitors = {
        mon for mon, req in entries if (req.get("arguments") or {}).get("property") == SETUP_MARKER
    }
    refused = []
    for mon, req in entries:
        if mon in setup_monitors:
            continue
        AUDIT["commands"] += 1
        try:
            check_command(req.get("execute"), req.get("arguments"))
        except ForbiddenCommand as exc:
            refused.append(str(exc))
    return refused


@pytest.fixture(params=list(QEMU_MATRIX), ids=lambda label: f"qemu-{label}")
def qemu_vm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VmFactory]:
    """Start real QEMU VMs: `qemu_vm(*args, name="vm", binary=None, env=None,
    setup_monitor=False)`.

    Every VM listens on `<tmp>/<name>.qmp` (and `<tmp>/<name>.setup.qmp` with
    setup_monitor, for the test's own commands: use `setup_client`) before QEMU starts.
    At teardown the VM is stopped and its QMP trace audited against the allow-list.
    """
    started: list[tuple[QemuProcess, Path]] = []
    x86 = QEMU_MATRIX[request.param]

    def start(
        *args: str,
        name: str = "vm",
        binary: str | None = None,
        env: dict[str, str] | None = None,
        setup_monitor: bool = False,
    ) -> QemuProcess:
        if binary is not None and request.param != next(iter(QEMU_MATRIX)):
            pytest.skip(f"{binary} is not part of the x86 version matrix")
        trace = tmp_path / f"{name}.qmp-trace.log"
        vm = QemuProcess(
            args=[*args, "-trace", f"handle_qmp_command,file={trace}"],
            qmp_path=tmp_path / f"{name}.qmp",
            binary=binary or x86,
            env=env,
            stderr_path=tmp_path / f"{name}.stderr",
            setup_qmp_path=tmp_path / f"{name}.setup.qmp" if setup_monitor else None,
        )
        started.append((vm, trace))
        return vm.start()

    try:
        yield start
    finally:
        refused, disagreements = [], []
        for vm, trace in started:
            disagreements += disagreements_with_preflight(vm)
            vm.stop()
            AUDIT["vms"] += 1
            refused += audit_qmp_trace(trace)
        assert not refused, f"qmpguard sent commands outside the allow-list: {refused}"
        assert not disagreements, "\n".join(disagreements)


async def setup_client(vm: QemuProcess) -> AsyncIterator[QMPClient]:
    """The test's own QMP client on the VM's setup monitor (excluded from the audit)."""
    assert vm.setup_qmp_path is not None, "start the VM with setup_monitor=True"
    client = QMPClient("test-setup")
    await client.connect(str(vm.setup_qmp_path))
    # Mark this monitor in QEMU's trace: a read of a property no object has.
    with contextlib.suppress(ExecuteError):
        await client.execute("qom-get", {"path": "/machine", "property": SETUP_MARKER})
    try:
        yield client
    finally:
        await client.disconnect()


#: QEMU version -> "evidence source (scenario)" -> outcomes seen ("concludes", "inconclusive")
COMPAT: dict[str, dict[str, set[str]]] = {}
ARTIFACTS = REPO / "tests" / "artifacts"
COMPAT_START, COMPAT_END = "<!-- compat:start -->", "<!-- compat:end -->"


def record_evidence(doc: dict[str, Any], scenario: str, vfio_only: bool = True) -> None:
    """Note which order-evidence sources concluded for the (vfio) devices of a report."""
    version = doc["qemu"]["version"] or "?"
    for dev in doc["devices"]:
        if dev["vfio"] or (not vfio_only and dev["id"]):
            for e in dev["order"]["evidence"]:
                if e["source"] == "cmdline" and "no cmdline" in scenario:
                    continue
                outcome = "concludes" if e["conclusion"] else "inconclusive"
                COMPAT.setdefault(version, {}).setdefault(f"{e['source']} ({scenario})", set()).add(
                    outcome
                )


def compatibility_table() -> str:
    versions = sorted(COMPAT)
    rows = sorted({row for v in versions for row in COMPAT[v]})
    lines = [
        "| evidence source (scenario) | " + " | ".join(f"QEMU {v}" for v in versions) + " |",
        "|---|" + "---|" * len(versions),
    ]
    for row in rows:
        cells = [" / ".join(sorted(COMPAT[v].get(row, {"-"}))) for v in versions]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Tests deselected in this process (-k, -m, plugins): any of them makes the run partial.
DESELECTED = {"count": 0}
#: What the terminal summary says about the README's table (set at session finish).
README_STATUS: list[str] = []


@dataclass(frozen=True)
class RunScope:
    """What a session ran, as far as the README's table cares: only a run of the whole
    suite on the whole QEMU matrix, passed, measured the table the README shows."""

    #: the paths/node ids pytest was given, relative to the root ("tests", "tests/unit")
    selected: frozenset[str]
    testpaths: frozenset[str]
    keyword: str = ""
    markexpr: str = ""
    deselected: int = 0
    #: --lf, --sw and the like: they leave out tests without counting them as deselected
    reruns_only_some: bool = False
    #: QEMU builds of the matrix that are not there (QMPGUARD_TEST_QEMU*, no .cache)
    missing_qemu: frozenset[str] = frozenset()
    #: tests skipped because the machine lacks something (libvirtd, a tool, root): their
    #: rows would be missing (CI fails such a test instead: install-dev.sh provides all)
    prerequisite_skips: int = 0
    passed: bool = True


def partial_run_reason(scope: RunScope) -> str | None:
    """Why this run's table is not the README's to write (None: a full run, it is)."""
    if scope.selected != scope.testpaths:
        return f"tests selected ({', '.join(sorted(scope.selected))})"
    if scope.keyword or scope.markexpr:
        return "tests selected with -k/-m"
    if scope.deselected:
        return f"{scope.deselected} tests deselected"
    if scope.reruns_only_some:
        return "--lf/--sw ran only some tests"
    if scope.missing_qemu:
        return f"QEMU matrix incomplete (no {', '.join(sorted(scope.missing_qemu))})"
    if scope.prerequisite_skips:
        return f"{scope.prerequisite_skips} tests skipped for want of a tool or service"
    if not scope.passed:
        return "the session did not pass"
    return None


#: The labels qemu_matrix finds when install-dev.sh has run and nothing overrides them.
FULL_MATRIX = {"x86_64": {"system", *CACHED_QEMU}, "aarch64": {"system", "11.1"}}


def run_scope(session: pytest.Session, exitstatus: int) -> RunScope:
    config = session.config
    root = config.rootpath

    def relative(arg: str, base: Path) -> str:
        path, sep, node = arg.partition("::")
        return os.path.relpath(Path(base, path).resolve(), root) + sep + node

    matrices = {"x86_64": QEMU_MATRIX, "aarch64": QEMU_ARM_MATRIX}
    missing = {f"{label} ({arch})" for arch, want in FULL_MATRIX.items() for label in want}
    missing -= {f"{label} ({arch})" for arch, have in matrices.items() for label in have}
    return RunScope(
        selected=frozenset(relative(a, config.invocation_params.dir) for a in config.args),
        testpaths=frozenset(relative(t, root) for t in config.getini("testpaths")),
        keyword=config.getoption("keyword", ""),
        markexpr=config.getoption("markexpr", ""),
        deselected=DESELECTED["count"],
        reruns_only_some=bool(config.getoption("lf", False) or config.getoption("stepwise", False)),
        missing_qemu=frozenset(missing),
        prerequisite_skips=PREREQUISITE_SKIPS["count"],
        passed=exitstatus == 0,
    )


class ReadmeTable(enum.Enum):
    """What a full run did to README.md's compatibility table (the summary's wording)."""

    UNCHANGED = "unchanged"
    REWRITTEN = "rewritten from this run: commit it"
    NO_MARKERS = f"not written: README.md has no {COMPAT_START} ... {COMPAT_END} section"


def rewrite_readme_table(readme: Path, table: str) -> ReadmeTable:
    """Put `table` between the compat markers of `readme` (written only if it differs)."""
    text = readme.read_text()
    head, sep, rest = text.partition(COMPAT_START)
    _, sep2, tail = rest.partition(COMPAT_END)
    if not (sep and sep2):
        return ReadmeTable.NO_MARKERS
    new = f"{head}{COMPAT_START}\n{table}\n{COMPAT_END}{tail}"
    if new == text:
        return ReadmeTable.UNCHANGED
    readme.write_text(new)
    return ReadmeTable.REWRITTEN


#: Test modules that share something host-wide, by group: under pytest-xdist one worker
#: runs a group's tests one after another. libvirtd: `check --libvirt-all` and the daemon's
#: /proc discovery see every domain on qemu:///system, so a domain another worker defines
#: or destroys meanwhile would enter (or vanish from) their results.
XDIST_GROUPS = {
    "libvirtd": frozenset(
        {
            "test_libvirt.py",
            "test_discovery_libvirt.py",
            "test_preflight_libvirt.py",
            "test_libvirt_xml_native.py",
        }
    ),
}


def xdist_scope(nodeid: str) -> str:
    """The unit of work a test is scheduled in: its group's name, or the test alone."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return next((g for g, modules in XDIST_GROUPS.items() if module in modules), nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Tests one by one to whichever worker is free, XDIST_GROUPS' modules as one unit each.

    xdist's own `--dist loadgroup` does this with xdist_group marks, but appends "@group"
    to the ids of the marked tests; this keeps every test id what a serial run reports.
    An explicit other `--dist` (loadscope, loadfile, ...) is left to xdist."""
    if config.getoption("dist") not in ("load", "loadgroup"):
        return None
    scheduling: Any = importlib.import_module("xdist.scheduler").LoadScopeScheduling(config, log)
    scheduling._split_scope = xdist_scope
    return scheduling


#: `-n auto` (pyproject's addopts): one worker per core this process may run on, at most
#: this many. Each worker starts its own QEMUs; past four the suite waits on its longest
#: tests, not on cores, and timing tests (deadlines, rescans) get a crowded machine.
MAX_WORKERS = 4

#: Modules whose tests run for tens of seconds each (many QEMUs per test): scheduled first,
#: so under pytest-xdist the short tests fill the other workers around them instead of a
#: long test starting last and running alone.
LONG_MODULES = ("test_preflight_generated.py", "test_generated.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for `-n auto`: the usable cores (cgroup/affinity aware), capped."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """LONG_MODULES' tests first, everything else in its collected order."""
    items.sort(key=lambda item: item.path.name not in LONG_MODULES)


#: How the suite's skip reasons say the machine lacks something (not that a QEMU version
#: lacks a feature, which every full run skips the same way).
MISSING_PREREQUISITE = ("not installed", "no libvirtd", "needs root", "no system QEMU")
PREREQUISITE_SKIPS = {"count": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count skips for a missing prerequisite (on xdist's controller too: it gets every
    worker's reports)."""
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if any(phrase in reason for phrase in MISSING_PREREQUISITE):
            PREREQUISITE_SKIPS["count"] += 1


def pytest_deselected(items: list[pytest.Item]) -> None:
    DESELECTED["count"] += len(items)


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _measured() -> dict[str, Any]:
    """This process's audit counts, compatibility rows and deselections, as plain data."""
    return {
        "audit": dict(AUDIT),
        "compat": {v: {row: sorted(o) for row, o in rows.items()} for v, rows in COMPAT.items()},
        "deselected": DESELECTED["count"],
    }


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist controller: add a finished worker's audit and table rows to ours, so
    the summary line and the table cover every worker (each collects everything, so each
    deselects the same tests: the largest count is the run's)."""
    measured = getattr(node, "workeroutput", {}).get("qmpguard")
    if measured is None:
        return
    for key, count in measured["audit"].items():
        AUDIT[key] += count
    for version, rows in measured["compat"].items():
        for row, outcomes in rows.items():
            COMPAT.setdefault(version, {}).setdefault(row, set()).update(outcomes)
    DESELECTED["count"] = max(DESELECTED["count"], measured["deselected"])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the compatibility table measured by this run, and into README.md when the run
    was full (the whole suite, the whole matrix, passed). An xdist worker only hands its
    measurements to the controller, which writes."""
    if _is_xdist_worker(session.config):
        session.config.workeroutput["qmpguard"] = _measured()  # type: ignore[attr-defined]
        return
    if not COMPAT:
        return
    table = compatibility_table()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "compatibility.md").write_text(table + "\n")
    reason = partial_run_reason(run_scope(session, exitstatus))
    if reason is not None:
        README_STATUS[:] = [f"README compatibility table: not touched (partial run: {reason})"]
    else:
        outcome = rewrite_readme_table(REPO / "README.md", table)
        README_STATUS[:] = [f"README compatibility table: {outcome.value}"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if AUDIT["vms"]:
        terminalreporter.write_line(
            f"read-only audit: {AUDIT['commands']} QMP commands from qmpguard to "
            f"{AUDIT['vms']} QEMU processes, all within the allow-list (QEMU trace)"
        )
    for line in README_STATUS:
        terminalreporter.write_line(line)
