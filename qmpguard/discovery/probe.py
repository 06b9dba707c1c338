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
from collections.abc import Callable

from qmpguard.discovery.model import ProbeFailure, ProbeOutcome, ProbeResult
from qmpguard.errors import InspectionError
from qmpguard.qmp.transport import refuse_libvirt_socket
from qmpguard.targets import Target, TargetError, parse_target

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
    if target.kind not in ("unix", "tcp"):
        return _failed(ProbeFailure.UNSUPPORTED, f"cannot probe {address}")
    try:
        data = await _greeting(target, timeout)
    except (InspectionError, _Busy, TimeoutError, EOFError, OSError) as exc:
        return _failure(exc, target, timeout)
    return _judged(data, target)


async def _greeting(target: Target, timeout: float) -> bytes:
    """The first bytes the monitor sends (up to its first line), read within `timeout`;
    the socket is closed whatever happens, before the probe says anything."""
    deadline = asyncio.get_running_loop().time() + timeout
    sock: socket.socket | None = None
    try:
        if target.kind == "unix":
            refuse_libvirt_socket(target.address)
            sock = await _connect_unix(target.address, deadline)
        else:
            sock = await _connect_tcp(target, timeout)
        return await _read_greeting(sock, deadline)
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


async def _connect_tcp(target: Target, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket to the target's first address, resolved and
    connected within `timeout`; closed here if the connect fails."""
    loop = asyncio.get_running_loop()
    host, port = target.tcp_host_port
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise
    return sock


def _os_error(exc: BaseException, target: Target, timeout: float) -> str:
    return f"{target.address}: {getattr(exc, 'strerror', None) or exc}"


#: How each failure to get a greeting is reported, first match wins (TimeoutError and
#: the connect errors are OSErrors, so the catch-all OSError comes last).
_FAILURES: tuple[
    tuple[type[BaseException], ProbeFailure, Callable[[BaseException, Target, float], str]],
    ...,
] = (
    (InspectionError, ProbeFailure.REFUSED_LIBVIRT, lambda exc, t, s: str(exc)),
    (_Busy, ProbeFailure.BUSY, lambda exc, t, s: str(exc)),
    (
        TimeoutError,
        ProbeFailure.BUSY,
        lambda exc, t, s: f"held by another client: no QMP greeting within {s:g}s",
    ),
    (
        EOFError,
        ProbeFailure.DISCONNECTED,
        lambda exc, t, s: "closed the connection before a greeting",
    ),
    (FileNotFoundError, ProbeFailure.NO_SOCKET, lambda exc, t, s: f"no such socket: {t.address}"),
    (
        PermissionError,
        ProbeFailure.PERMISSION_DENIED,
        lambda exc, t, s: f"permission denied on {t.address}",
    ),
    (
        ConnectionRefusedError,
        ProbeFailure.REFUSED,
        lambda exc, t, s: f"connection refused by {t.address}",
    ),
    (OSError, ProbeFailure.UNREACHABLE, _os_error),
)


def _failure(exc: BaseException, target: Target, timeout: float) -> ProbeResult:
    """The probe's answer for an exception `_greeting` raised (one of _FAILURES')."""
    for kind, reason, message in _FAILURES:
        if isinstance(exc, kind):
            return _failed(reason, message(exc, target, timeout))
    raise exc


def _judged(data: bytes, target: Target) -> ProbeResult:
    """Greeted when the first line is a JSON object with a "QMP" member."""
    try:
        greeting = json.loads(data.split(b"\n", 1)[0])
    except (ValueError, RecursionError):
        greeting = None
    if not isinstance(greeting, dict) or "QMP" not in greeting:
        return _failed(ProbeFailure.NOT_QMP, f"{target.address} did not greet as QMP")
    return ProbeResult(ProbeOutcome.GREETED)
