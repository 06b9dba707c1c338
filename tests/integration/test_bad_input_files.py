"""Bad input files and numbers to the real CLI and daemon, and a stdout that goes away.

Before issue 12: /dev/zero grew memory without bound, a FIFO hung (on SIGHUP the whole
daemon), a 5,000-digit integer or a non-UTF-8 config was a traceback and exit 1,
`nan`/`inf`/1e-9/1e300 were accepted, `check ... | head` was a BrokenPipeError traceback.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpguard.daemon.settings import MAX_CONFIG_BYTES
from qmpguard.snapshot import MAX_SNAPSHOT_BYTES
from tests.integration.support import (
    SNAPSHOT,
    assert_one_line_error,
    fifo,
    free_port,
    qmpguard,
    running_daemon,
    sparse,
    wait_for,
)

pytestmark = pytest.mark.integration


# -- check --snapshot FILE ------------------------------------------------------------------


def written(path: Path, data: str | bytes, replace: bool = False) -> Path:
    """`path`, after writing `data` to it (as a new file if `replace`: never into a FIFO)."""
    if replace:
        path.unlink()
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _huge_int(tmp: Path) -> Path:
    doc = json.loads(SNAPSHOT.read_text())
    doc["timings"]["huge"] = "HUGE"
    path = tmp / "huge-int.json"
    path.write_text(json.dumps(doc).replace('"HUGE"', "9" * 5000))
    return path


def _future(tmp: Path) -> Path:
    doc = json.loads(SNAPSHOT.read_text())
    doc["schema"] = "qmpguard.snapshot/2"
    path = tmp / "future.json"
    path.write_text(json.dumps(doc))
    return path


SNAPSHOT_CASES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "dev-zero": (
        lambda t: Path("/dev/zero"),
        "snapshot /dev/zero is a character device, not a regular file",
        "bad-snapshot",
    ),
    "fifo": (lambda t: fifo(t / "s.json"), "is a FIFO, not a regular file", "bad-snapshot"),
    "directory": (lambda t: t, "is a directory, not a regular file", "bad-snapshot"),
    "too-big": (
        lambda t: sparse(t / "big.json", MAX_SNAPSHOT_BYTES + 1),
        "is larger than 64 MiB",
        "bad-snapshot",
    ),
    "not-utf8": (
        lambda t: written(t / "l1.json", b'{"x": "\xe9"}'),
        "is not UTF-8 text",
        "bad-snapshot",
    ),
    "5000-digit-int": (
        _huge_int,
        "is not usable JSON: Exceeds the limit (4300 digits)",
        "bad-snapshot",
    ),
    "future-schema": (
        _future,
        "unsupported snapshot schema version 'qmpguard.snapshot/2'",
        "unsupported-snapshot",
    ),
}


@pytest.mark.parametrize("case", SNAPSHOT_CASES)
def test_check_snapshot_bad_file(tmp_path: Path, case: str) -> None:
    make, needle, reason = SNAPSHOT_CASES[case]
    path = make(tmp_path)
    proc = qmpguard("check", "--format", "json", "--snapshot", str(path))
    line = assert_one_line_error(proc, needle)
    assert line.startswith("qmpguard: error: ")
    (target,) = json.loads(proc.stdout)["targets"]
    assert target["error_reason"] == reason
    assert "corrupted" not in target["error"] or case != "future-schema"


# -- daemon --config FILE and numbers -------------------------------------------------------


CONFIG_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "dev-zero": (lambda t: Path("/dev/zero"), "config /dev/zero is a character device"),
    "fifo": (lambda t: fifo(t / "c.toml"), "is a FIFO, not a regular file"),
    "too-big": (lambda t: sparse(t / "big.toml", MAX_CONFIG_BYTES + 1), "is larger than 1 MiB"),
    "not-utf8": (
        lambda t: written(t / "l1.toml", b"# caf\xe9\n"),
        "is not UTF-8 text",
    ),
    "5000-digit-int": (
        lambda t: written(t / "i.toml", "interval = " + "9" * 5000),
        "not usable TOML: Exceeds the limit (4300 digits)",
    ),
    "nan-interval": (
        lambda t: written(t / "n.toml", "interval = nan\n"),
        ":1: 'interval' must be a finite number, got nan",
    ),
    "tiny-timeout": (
        lambda t: written(t / "t.toml", "[timeouts]\ncommand = 1e-9\n"),
        "'timeouts.command' must be between 0.05 and 3600 seconds, got 1e-09",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_daemon_bad_config_file(tmp_path: Path, case: str) -> None:
    make, needle = CONFIG_CASES[case]
    path = make(tmp_path)
    proc = qmpguard("daemon", "--config", str(path), "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, needle)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("nan", "--interval must be a finite number, got nan"),
        ("inf", "--interval must be a finite number, got inf"),
        ("1e-9", "--interval must be between 1 and 86400 seconds, got 1e-09"),
        ("1e300", "--interval must be between 1 and 86400 seconds, got 1e+300"),
    ],
)
def test_daemon_interval_flag(value: str, needle: str) -> None:
    proc = qmpguard("daemon", "--interval", value, "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(proc, needle)


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--greeting-timeout", "0", "must be a positive number"),
        ("--greeting-timeout", "-1", "must be a positive number"),
        ("--greeting-timeout", "nan", "must be a finite number, got nan"),
        ("--command-timeout", "inf", "must be a finite number, got inf"),
        ("--command-timeout", "1e-9", "must be between 0.05 and 3600 seconds"),
        ("--timeout", "-5", "must be a positive number"),
        ("--timeout", "1e300", "must be between 0.05 and 3600 seconds"),
        ("--concurrency", "0", "must be a positive integer, got 0"),
        ("--concurrency", "-1", "must be a positive integer, got -1"),
        ("--concurrency", "nan", "must be an integer, got 'nan'"),
        ("--concurrency", "5000", "must be between 1 and 1024, got 5000"),
    ],
)
def test_check_numbers_are_validated(tmp_path: Path, option: str, value: str, needle: str) -> None:
    proc = qmpguard("check", option, value, str(tmp_path / "vm.qmp"))
    line = assert_one_line_error(proc, f"argument {option}: {needle}")
    assert proc.stdout == "", "validation comes before any inspection"
    assert line.startswith("qmpguard: error: ")


# -- stdout that goes away -------------------------------------------------------------------


def test_check_into_a_closed_pipe_keeps_the_verdict() -> None:
    """`qmpguard check ... | head`: the reader is gone, the exit code is still the verdict."""
    verdict = qmpguard("check", "--snapshot", str(SNAPSHOT)).returncode
    assert verdict in (0, 1, 2)
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has already exited: every write gets EPIPE
    try:
        proc = qmpguard("check", "--snapshot", str(SNAPSHOT), stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == verdict


def test_check_into_a_full_disk_says_so() -> None:
    with open("/dev/full", "w") as full:
        proc = qmpguard("check", "--snapshot", str(SNAPSHOT), stdout=full)
    assert_one_line_error(proc, "qmpguard: error: cannot write the report: No space left")


def test_sighup_with_a_bad_config_keeps_the_old_one(tmp_path: Path) -> None:
    """FIFO (froze the event loop), non-UTF-8 and oversized configs on SIGHUP: one JSON
    `config_reload_failed` line each, old config kept, the daemon keeps serving."""
    config = tmp_path / "config.toml"
    regular = tmp_path / "vm.qmp"
    sparse(regular, 1)
    config.write_text(f'watch = []\ninterval = 30\n[[target]]\naddress = "unix:{regular}"\n')
    with running_daemon(config, tmp_path / "daemon.log") as d:
        name = f"unix:{regular}"
        wait_for(lambda: name in d.vm_names(), what="the config's target")

        bad_configs: list[Callable[[], object]] = [
            lambda: fifo(config, replace=True),
            lambda: written(config, b"# caf\xe9\ninterval = 30\n", replace=True),
            lambda: sparse(config, MAX_CONFIG_BYTES + 1),
            lambda: config.write_text("interval = nan\n"),
        ]
        for n, make_bad in enumerate(bad_configs, 1):
            make_bad()
            d.proc.send_signal(signal.SIGHUP)

            def failed(n: int = n) -> bool:
                return d.count("config_reload_failed") == n

            wait_for(failed, what=f"reload failure {n}")
            assert d.get("/healthz")[0] == 200
            assert name in d.vm_names(), "the old config was kept"
        errors = [e["error"] for e in d.events() if e["event"] == "config_reload_failed"]
        assert "is a FIFO, not a regular file" in errors[0]
        assert "is not UTF-8 text" in errors[1]
        assert "is larger than 1 MiB" in errors[2]
        assert "'interval' must be a finite number, got nan" in errors[3]

        config.unlink()
        config.write_text("watch = []\ninterval = 30\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.count("config_reloaded") == 1, what="a good reload after bad ones")
        wait_for(lambda: name not in d.vm_names(), what="target dropped")
        assert d.stop() == 0
        assert all("exception" not in e for e in d.events())
