"""The CLI against a HostileFakeQMPPeer: exit 3, one line, no traceback, bounded memory."""

from __future__ import annotations

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


#: Runs qmpguard's CLI and, on the way out, reports the process's own peak RSS (VmHWM
#: belongs to the address space created by exec, unlike the forked parent's pages).
_MEASURED = (
    "import runpy, sys\n"
    "sys.argv = ['qmpguard', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('qmpguard', run_name='__main__')\n"
    "finally:\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "    print('PEAK-RSS-KIB', hwm.split()[1], file=sys.stderr)\n"
)


def run_with_rss(args: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `qmpguard ARGS`; also return its own peak RSS in KiB."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, *args], capture_output=True, text=True, timeout=60
    )
    peak = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK-RSS-KIB")]
    assert peak, proc.stderr
    stderr = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("PEAK-RSS"))
    return subprocess.CompletedProcess(args, proc.returncode, proc.stdout, stderr), int(
        peak[0].split()[1]
    )


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
    "wrong-shapes": "qom-list /machine/peripheral: reply is not a list",
}


@pytest.mark.parametrize("mode", MODES)
def test_cli_survives_hostile_peer(tmp_path: Path, mode: str) -> None:
    sock = tmp_path / "hostile.qmp"
    with HostileFakeQMPPeer(sock, mode):
        start = time.monotonic()
        proc, peak_kib = run_with_rss(
            [
                "check",
                "--greeting-timeout",
                "1",
                "--command-timeout",
                "2",
                "--timeout",
                "8",
                str(sock),
            ]
        )
        elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "Traceback" not in output
    assert elapsed < 20
    findings = [line for line in proc.stdout.splitlines() if "QG100" in line]
    assert len(findings) == 1, proc.stdout  # exactly one one-line reason
    assert EXPECTED[mode] in findings[0], findings[0]
    assert peak_kib < MEMORY_BOUND_KIB, f"peak RSS {peak_kib} KiB"
