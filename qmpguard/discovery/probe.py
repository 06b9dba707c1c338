"""A greeting probe: connect, wait briefly for QEMU's QMP greeting, close. Nothing is sent.

A QMP socket serves one client; others wait in its listen backlog without a greeting.
The probe tells a free monitor from a held one without taking it: it never completes
negotiation, and it closes at once when the greeting does not come (so it cannot be
the client that inherits the monitor when its holder lets go). libvirt's monitor
sockets are refused before any connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket

from qmpguard.discovery.model import ProbeFailure, ProbeOutcome, ProbeResult
from qmpguard.errors import InspectionError
from qmpguard.qmp.transport import refuse_libvirt_socket
from qmpguard.targets import TargetError, parse_target

PROBE_TIMEOUT_S = 0.5
GREETING_LIMIT = 64 * 1024
_RETRY_S = 0.02


class _Busy(Exception):
    pass


def _failed(reason: ProbeFailure, message: str) -> ProbeResult:
    return ProbeResult(ProbeOutcome.FAILED, reason, message)


async def _connect_unix(path: str, deadline: float) -> socket.socket:
    """A connected non-blocking UNIX socket; EAGAIN (a full backlog) is retried until the
    deadline, then reported as busy."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
            if loop.time() >= deadline:
                raise _Busy(f"held by another client: the listen backlog of {path} is full")
            await asyncio.sleep(_RETRY_S)
    except BaseException:
        sock.close()
        raise


async def _read_greeting(sock: socket.socket, deadline: float) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while b"\n" not in data and len(data) < GREETING_LIMIT:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError
        async with asyncio.timeout(remaining):
            chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise EOFError
        data += chunk
    return data


async def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Probe `address` (a `unix:` or `tcp:` target string) for a QMP greeting."""
    try:
        target = parse_target(address)
    except TargetError as exc:
        return _failed(ProbeFailure.UNSUPPORTED, str(exc))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sock: socket.socket | None = None
    try:
        if target.kind == "unix":
            refuse_libvirt_socket(target.address)
            sock = await _connect_unix(target.address, deadline)
        elif target.kind == "tcp":
            host, port = target.tcp_host_port
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, _, proto, _, addr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM, proto)
                sock.setblocking(False)
                await loop.sock_connect(sock, addr)
        else:
            return _failed(ProbeFailure.UNSUPPORTED, f"cannot probe {address}")
        data = await _read_greeting(sock, deadline)
    except InspectionError as exc:
        return _failed(ProbeFailure.REFUSED_LIBVIRT, str(exc))
    except _Busy as exc:
        return _failed(ProbeFailure.BUSY, str(exc))
    except TimeoutError:
        return _failed(
            ProbeFailure.BUSY,
            f"held by another client: no QMP greeting within {timeout:g}s",
        )
    except EOFError:
        return _failed(ProbeFailure.DISCONNECTED, "closed the connection before a greeting")
    except FileNotFoundError:
        return _failed(ProbeFailure.NO_SOCKET, f"no such socket: {target.address}")
    except PermissionError:
        return _failed(ProbeFailure.PERMISSION_DENIED, f"permission denied on {target.address}")
    except ConnectionRefusedError:
        return _failed(ProbeFailure.REFUSED, f"connection refused by {target.address}")
    except OSError as exc:
        return _failed(ProbeFailure.UNREACHABLE, f"{target.address}: {exc.strerror or exc}")
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
    try:
        greeting = json.loads(data.split(b"\n", 1)[0])
    except (ValueError, RecursionError):
        greeting = None
    if not isinstance(greeting, dict) or "QMP" not in greeting:
        return _failed(ProbeFailure.NOT_QMP, f"{target.address} did not greet as QMP")
    return ProbeResult(ProbeOutcome.GREETED)
