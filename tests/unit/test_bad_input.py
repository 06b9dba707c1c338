"""Bad input files and numbers: bounded reads, one-line errors naming the file or key.

Each case failed before issue 12: /dev/zero grew memory without bound, a FIFO hung the
reader, a 5,000-digit integer escaped as ValueError, `nan`/`inf`/1e-9/1e300 were accepted.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpguard.daemon.settings import (
    MAX_CONFIG_BYTES,
    ConfigError,
    load_settings,
    settings_from_toml,
)
from qmpguard.files import InputFileError, read_bytes_bounded, read_text_bounded
from qmpguard.snapshot import (
    MAX_SNAPSHOT_BYTES,
    SnapshotError,
    UnsupportedSnapshot,
    load_snapshot,
)

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """A FIFO nobody writes to: opening it for reading blocks a plain open() for ever."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        yield path


def sparse(path: Path, size: int) -> Path:
    """A file of `size` bytes that takes no disk space."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


# -- bounded reads ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp: Path("/dev/zero"), "is a character device, not a regular file"),
        (lambda tmp: tmp, "is a directory, not a regular file"),
        (lambda tmp: tmp / "missing", "No such file or directory"),
        (lambda tmp: sparse(tmp / "big", 1025), "is larger than 1024 bytes"),
    ],
    ids=["dev-zero", "directory", "missing", "too-big"],
)
def test_bounded_read_refuses(tmp_path: Path, make: object, needle: str) -> None:
    assert callable(make)
    with pytest.raises(InputFileError) as info:
        read_bytes_bounded(make(tmp_path), 1024, "input")
    assert needle in one_line(info.value)


def test_bounded_read_of_a_fifo_does_not_block(fifo: Path) -> None:
    with pytest.raises(InputFileError) as info:
        read_bytes_bounded(fifo, 1024, "input")
    assert one_line(info.value) == f"input {fifo} is a FIFO, not a regular file"


def test_bounded_read_of_a_socket(unix_socket: Path) -> None:
    with pytest.raises(InputFileError) as info:
        read_bytes_bounded(unix_socket, 1024, "input")
    assert one_line(info.value) == f"input {unix_socket} is a socket, not a regular file"


def test_bounded_read_at_the_limit_and_text(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1024)
    assert read_bytes_bounded(path, 1024, "input") == b"x" * 1024
    path.write_bytes(b"ok \xff")
    with pytest.raises(InputFileError) as info:
        read_text_bounded(path, 1024, "input")
    assert "is not UTF-8 text (invalid byte at offset 3)" in one_line(info.value)


# -- snapshots ------------------------------------------------------------------------------


def test_snapshot_limits(tmp_path: Path, fifo: Path) -> None:
    for path, needle in [
        (Path("/dev/zero"), "snapshot /dev/zero is a character device, not a regular file"),
        (fifo, f"snapshot {fifo} is a FIFO, not a regular file"),
        (sparse(tmp_path / "big.json", MAX_SNAPSHOT_BYTES + 1), "is larger than 64 MiB"),
    ]:
        with pytest.raises(SnapshotError) as info:
            load_snapshot(path)
        assert needle in one_line(info.value)


def test_snapshot_with_a_5000_digit_integer(tmp_path: Path) -> None:
    doc = json.loads((DATA / "q35-intel-topology-7.2.22.json").read_text())
    doc["timings"]["huge"] = "HUGE"
    text = json.dumps(doc).replace('"HUGE"', "9" * 5000)
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path)
    assert one_line(info.value) == (
        f"snapshot {path} is not usable JSON: "
        "Exceeds the limit (4300 digits) for integer string conversion"
    )


def test_future_snapshot_schema_is_unsupported_not_corrupted(tmp_path: Path) -> None:
    doc = json.loads((DATA / "q35-intel-topology-7.2.22.json").read_text())
    doc["schema"] = "qmpguard.snapshot/2"
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UnsupportedSnapshot) as info:
        load_snapshot(path)
    message = one_line(info.value)
    assert message == (
        "unsupported snapshot schema version 'qmpguard.snapshot/2': "
        "this qmpguard reads 'qmpguard.snapshot/1'"
    )
    assert "corrupted" not in message
    doc["schema"] = "something else"
    path.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="corrupted snapshot: schema is 'something else'"):
        load_snapshot(path)


# -- daemon config files -------------------------------------------------------------------


def test_config_file_limits(tmp_path: Path, fifo: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\ninterval = 30\n")
    cases = [
        (Path("/dev/zero"), "config /dev/zero is a character device, not a regular file"),
        (fifo, f"config {fifo} is a FIFO, not a regular file"),
        (sparse(tmp_path / "big.toml", MAX_CONFIG_BYTES + 1), "is larger than 1 MiB"),
        (latin1, f"config {latin1} is not UTF-8 text (invalid byte at offset 5)"),
    ]
    for path, needle in cases:
        with pytest.raises(ConfigError) as info:
            load_settings(str(path), {})
        assert needle in one_line(info.value)


def test_token_file_must_be_a_small_regular_file(fifo: Path) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_toml(f'[http]\ntoken_file = "{fifo}"\n', "c.toml")
    assert f"'http.token_file': token file {fifo} is a FIFO" in one_line(info.value)
    with pytest.raises(ConfigError) as info:
        settings_from_toml('[http]\ntoken_file = "/dev/zero"\n', "c.toml")
    assert "is a character device" in one_line(info.value)


def test_config_with_a_5000_digit_integer() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_toml("interval = " + "9" * 5000, "c.toml")
    assert one_line(info.value) == (
        "c.toml: not usable TOML: Exceeds the limit (4300 digits) for integer string conversion"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("interval = nan", "c.toml:1: 'interval' must be a finite number, got nan"),
        ("interval = inf", "c.toml:1: 'interval' must be a finite number, got inf"),
        ("interval = -inf", "c.toml:1: 'interval' must be a finite number, got -inf"),
        ("interval = 1e-9", "c.toml:1: 'interval' must be between 1 and 86400 seconds, got 1e-09"),
        ("interval = 1e300", "'interval' must be between 1 and 86400 seconds, got 1e+300"),
        ("interval = 100000", "'interval' must be between 1 and 86400 seconds, got 100000"),
        ("rescan_interval = nan", "'rescan_interval' must be a finite number, got nan"),
        ("rescan_interval = 0.001", "'rescan_interval' must be between 1 and 86400 seconds"),
        ("[timeouts]\ngreeting = 0.0", "'timeouts.greeting' must be a positive number, got 0.0"),
        ("[timeouts]\ngreeting = nan", "'timeouts.greeting' must be a finite number, got nan"),
        ("[timeouts]\ncommand = 1e-9", "'timeouts.command' must be between 0.05 and 3600 seconds"),
        ("[timeouts]\ntarget = inf", "'timeouts.target' must be a finite number, got inf"),
        ("[timeouts]\ntarget = 1e300", "'timeouts.target' must be between 0.05 and 3600 seconds"),
        ("concurrency = 0", "'concurrency' must be a positive integer, got 0"),
        ("concurrency = 1.5", "'concurrency' must be a positive integer, got 1.5"),
        ("concurrency = 100000", "'concurrency' must be between 1 and 1024, got 100000"),
        (
            "concurrency = " + "9" * 4000,
            "'concurrency' must be between 1 and 1024, got 9999999999"
            "9999999999...(4000 characters)",
        ),
    ],
)
def test_numbers_must_be_finite_and_sane(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_toml(text, "c.toml")
    assert message in one_line(info.value)


def test_sane_numbers_at_the_bounds() -> None:
    s = settings_from_toml(
        "interval = 1\nrescan_interval = 86400\nconcurrency = 1024\n"
        "[timeouts]\ngreeting = 0.05\ncommand = 3600\ntarget = 20\n"
    )
    assert (s.interval, s.rescan_interval, s.concurrency) == (1.0, 86400.0, 1024)
    assert (s.greeting_timeout, s.command_timeout, s.target_timeout) == (0.05, 3600.0, 20.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e-9, 1e300])
def test_interval_flag_is_validated(value: float) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"interval": value})
    assert one_line(info.value).startswith("command line: --interval must be")
