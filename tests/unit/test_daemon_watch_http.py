"""The HTTP side of the daemon's watch: the connection cap follows the fd limit (and the
systemd unit sets one), and error floods become one log line per burst."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import structlog

from qmpguard.daemon.web import (
    MAX_CONNECTIONS,
    AsyncioErrorLog,
    BurstLog,
    connection_cap,
)

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "qmpguard.service"


def test_connection_cap_is_a_quarter_of_the_fd_limit_at_most_256() -> None:
    assert connection_cap(256) == 64
    assert connection_cap(1024) == MAX_CONNECTIONS == 256
    assert connection_cap(10**6) == 256
    assert connection_cap(8) == 4  # never zero: /healthz must stay reachable
    assert 0 < connection_cap() <= 256  # this process's own limit


def test_unit_sets_an_fd_limit_with_room_beyond_the_cap() -> None:
    """LimitNOFILE in the unit (issue 12: none, so 1,024, and 1,100 connections won)."""
    found = re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.M)
    assert found, "deploy/qmpguard.service sets no LimitNOFILE"
    limit = int(found.group(1))
    assert limit - connection_cap(limit) >= 1024  # left for QMP sockets and discovery


def test_a_burst_is_one_line_and_the_next_says_how_many_it_had() -> None:
    now = [0.0]
    burst = BurstLog("thing_failed", quiet=10.0, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for i in range(1000):  # one every 5 ms: one burst
            now[0] = i * 0.005
            burst.note(detail="x")
        now[0] += 30.0  # quiet for 30 s: the next one starts a new burst
        burst.note(detail="y")
    assert [(e["event"], e["detail"], e["previous_burst"]) for e in logs] == [
        ("thing_failed", "x", None),
        ("thing_failed", "y", 1000),
    ]


def test_event_loop_errors_are_one_json_line_per_burst_without_traceback() -> None:
    """A callback failing 500 times on a real event loop: one `asyncio_error` line."""

    def broken() -> None:
        raise KeyError("boom")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(AsyncioErrorLog())
        for _ in range(500):
            loop.call_soon(broken)
        await asyncio.sleep(0)  # let the loop run the callbacks it was given

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    [line] = logs
    assert line["event"] == "asyncio_error"
    assert line["error"] == "KeyError: 'boom'"
    assert line["location"].endswith("in broken")
