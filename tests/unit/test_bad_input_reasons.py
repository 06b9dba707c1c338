"""Inspection-error reasons: the enum is the metric label contract; reasons say what
happened (a path that is no socket was "stale socket: QEMU gone?" before issue 12)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmpguard.errors import ErrorReason, InspectionError
from qmpguard.inspection import inspect_target
from qmpguard.targets import parse_target


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


# -- error reasons: the metric label contract ----------------------------------------------


def test_error_reasons_are_the_documented_contract() -> None:
    assert {r.value for r in ErrorReason} == {
        "busy",
        "timeout",
        "disconnected",
        "not-qmp",
        "not-a-socket",
        "no-socket",
        "permission-denied",
        "refused",
        "unreachable",
        "unsupported",
        "libvirt-socket",
        "libvirt",
        "no-domain",
        "not-running",
        "bad-reply",
        "bad-snapshot",
        "unsupported-snapshot",
        "internal",
    }
    err = InspectionError("busy", "m")
    assert err.reason is ErrorReason.BUSY
    with pytest.raises(ValueError):
        InspectionError("monitor-busy", "a reason outside the contract")


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda tmp: sparse(tmp / "file.qmp", 0), "a regular file"),
        (lambda tmp: tmp, "a directory"),
        (lambda tmp: Path("/dev/zero"), "a device"),
    ],
    ids=["file", "directory", "dev-zero"],
)
def test_a_target_that_is_no_socket_says_so(tmp_path: Path, make: object, kind: str) -> None:
    assert callable(make)
    path = make(tmp_path)
    result = asyncio.run(inspect_target(parse_target(f"unix:{path}")))
    assert result.error is not None
    assert result.error.reason is ErrorReason.NOT_A_SOCKET
    assert result.error.message == f"{path} is {kind}, not a QMP socket"
