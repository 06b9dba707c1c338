"""Fixtures the integration tests share (pytest finds them here; never import them)."""

from __future__ import annotations

import contextlib
import resource
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpguard.demo.fakevfio import build_emulation
from tests.agreement import libvirt_disagreements
from tests.conftest import QEMU_MATRIX, audit_qmp_trace
from tests.integration.support import (
    DOMAIN,
    FAST_RESCAN,
    TRACE_DIR,
    URI,
    Daemon,
    _connect,
    free_port,
    wait_for,
)
from tests.integration.vfio_vm import qemu_version


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, token: str | None = None, nofile: int | None = None) -> Daemon:
        """A daemon on a free port; `nofile` sets its RLIMIT_NOFILE (soft and hard).

        Without `--config` it reads one that only sets FAST_RESCAN: the tests wait for the
        daemon to notice VMs come and go, and the default rescan (2 s) is most of that
        wait. A test that passes its own `--config` puts FAST_RESCAN in it."""
        port = free_port()
        if "--config" not in args:
            base = tmp_path / f"daemon-{port}.toml"
            base.write_text(FAST_RESCAN)
            args = ("--config", str(base), *args)

        def limit_fds() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qmpguard",
                "daemon",
                "--listen",
                f"127.0.0.1:{port}",
                "--log-format",
                "json",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"daemon-{port}.log", "w"),  # noqa: SIM115
            text=True,
            preexec_fn=limit_fds if nofile is not None else None,
        )
        started.append(proc)
        d = Daemon(proc, port, token, tmp_path / f"daemon-{port}.log")

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / f"daemon-{port}.log").read_text()
            with contextlib.suppress(OSError):
                return d.get("/healthz")[0] == 200
            return False

        wait_for(healthy, what="daemon to listen")
        return d

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def fakevfio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_emulation(tmp_path_factory.mktemp("fakevfio"))


@pytest.fixture
def libvirt_domain() -> Iterator[Callable[[dict[str, str]], str]]:
    """Define and start (paused) libvirt domains; at teardown, hold each to the preflight
    agreement (tests/agreement.py), then destroy and undefine them all."""
    libvirt = pytest.importorskip("libvirt")
    conn = _connect()
    TRACE_DIR.mkdir(mode=0o777, parents=True, exist_ok=True)
    TRACE_DIR.chmod(0o777)
    made: list[tuple[Any, Path]] = []

    def start(kind: dict[str, str]) -> str:
        name = f"qmpguard-test-{uuid.uuid4().hex[:8]}"
        trace = TRACE_DIR / f"{name}.log"
        dom = conn.defineXML(DOMAIN.format(name=name, trace=trace, **kind))
        made.append((dom, trace))
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        return name

    try:
        yield start
    finally:
        refused, disagreements = [], []
        for dom, trace in made:
            # preflight --libvirt-xml of the domain against check libvirt:DOMAIN (issue
            # 16); every domain is destroyed before a disagreement fails the test
            disagreements += libvirt_disagreements(dom, URI)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            refused += audit_qmp_trace(trace)
            trace.unlink(missing_ok=True)
        conn.close()
        # libvirt's own commands (qmp_capabilities, query-*, ...) pass too, except the
        # ones it sends to manage the VM: only qmpguard's are judged here.
        ours = [r for r in refused if "qom-" in r or "human-monitor" in r]
        assert not ours, ours
        assert not disagreements, "\n".join(disagreements)


@pytest.fixture
def x86(request: pytest.FixtureRequest) -> tuple[int, int]:
    """The version of the x86 QEMU this test instance runs on."""
    return qemu_version(QEMU_MATRIX[request.node.callspec.params["qemu_vm"]])


@pytest.fixture
def domains() -> Iterator[Callable[[str], Any]]:
    """Define libvirt domains from XML; destroy and undefine them at teardown."""
    conn = _connect()
    made: list[Any] = []

    def define(xml: str) -> Any:
        dom = conn.defineXML(xml)
        made.append(dom)
        return dom

    try:
        yield define
    finally:
        for dom in made:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()
