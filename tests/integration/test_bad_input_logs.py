"""Every daemon log line is JSON when not on a TTY, aiohttp's own tracebacks included;
the error reason of a path that is no socket reaches the metrics as `not-a-socket`."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.integration.support import running_daemon, sparse, wait_for

pytestmark = pytest.mark.integration


def test_daemon_logs_are_json_lines_even_for_aiohttp_errors(tmp_path: Path) -> None:
    """A malformed request makes aiohttp log a traceback: it must be one JSON line."""
    config = tmp_path / "config.toml"
    regular = tmp_path / "vm.qmp"
    sparse(regular, 1)
    config.write_text(f'watch = []\n[[target]]\naddress = "unix:{regular}"\n')
    with running_daemon(config, tmp_path / "daemon.log") as d:
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.0 400")
        wait_for(lambda: "Error handling request" in d.log.read_text(), what="aiohttp's log")
        server = [e for e in d.events() if e.get("logger") == "aiohttp.server"]
        assert server and "BadHttpMessage" in server[0]["exception"]
        # The reason label of a file that is no socket: the metric contract.
        wait_for(
            lambda: 'reason="not-a-socket"' in d.get("/metrics")[1], what="not-a-socket in /metrics"
        )
        assert 'reason="refused"' not in d.get("/metrics")[1]
        assert d.stop() == 0
        d.events()  # every line parses
