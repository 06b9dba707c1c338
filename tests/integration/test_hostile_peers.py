"""The CLI against a HostileFakeQMPPeer: exit 3, one line, no traceback, bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hostile_peer import MODES, HostileFakeQMPPeer

pytestmark = pytest.mark.integration

#: Peak RSS bound for the whole `qmpguard check` process facing any of these peers.
#: The read limit is 16 MiB per message (qemu.qmp tears the connection down past it).
MEMORY_BOUND_KIB = 64 * 1024  # measured peak: 41 MiB, on the 100 MiB line


def run_with_rss(args: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run a child; also return that child's own peak RSS in KiB (wait4's rusage)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()  # small: the CLI prints a few lines
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return subprocess.CompletedProcess(args, proc.returncode, out, err), usage.ru_maxrss


#: The one-line reason each misbehaviour must produce (the failure it really causes).
EXPECTED = {
    "garbage": "not a QMP peer",
    "invalid-json": "not a QMP peer",
    "wrong-greeting": "not a QMP peer",
    "no-greeting": "monitor busy",
    "close-at-once": "closed the connection before the greeting",
    "huge-line": "connection lost",
    "deep-nesting": "connection lost",
    "stall-mid-reply": "no reply within 2s",
    "close-mid-reply": "connection lost",
    "unknown-ids": "no reply within 2s",  # replies nobody asked for are not answers
    "event-flood": "no reply within 2s",
    "wrong-shapes": "info qtree is not in a known format",
}


@pytest.mark.parametrize("mode", MODES)
def test_cli_survives_hostile_peer(tmp_path: Path, mode: str) -> None:
    sock = tmp_path / "hostile.qmp"
    with HostileFakeQMPPeer(sock, mode):
        start = time.monotonic()
        proc, peak_kib = run_with_rss([
            sys.executable, "-m", "qmpguard", "check", "--greeting-timeout", "1",
            "--command-timeout", "2", "--timeout", "8", str(sock)])
        elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "Traceback" not in output
    assert elapsed < 20
    findings = [line for line in proc.stdout.splitlines() if "QG100" in line]
    assert len(findings) == 1, proc.stdout  # exactly one one-line reason
    assert EXPECTED[mode] in findings[0], findings[0]
    assert peak_kib < MEMORY_BOUND_KIB, f"peak RSS {peak_kib} KiB"
