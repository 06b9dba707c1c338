"""A read-only QMP session over qemu.qmp, with timeouts and one-line errors.

Every command passes the allow-list before it is sent. Failures surface as
`InspectionError` with an `ErrorReason` (for metrics) and a one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.message import DeserializationError, Message
from qemu.qmp.protocol import ConnectError

from qmpguard.errors import CommandFailed, ErrorReason, InspectionError
from qmpguard.process import is_qemu
from qmpguard.qmp.guard import GuardedSession, Timeouts
from qmpguard.targets import Target

#: Replies larger than this tear the connection down (qemu.qmp's read limit).
READ_LIMIT_BYTES = 16 * 1024 * 1024

_LIBVIRT_MONITOR_MARKERS = ("/libvirt/qemu/", "/libvirt/qemu-")


#: How often a connect is retried while a UNIX socket's listen backlog is full.
BACKLOG_RETRY_S = 0.05


@dataclass
class PeerProcess:
    """The QEMU process behind a local socket, as far as it could be read."""

    pid: int | None = None
    cmdline: list[str] | None = None
    error: str | None = None


def refuse_libvirt_socket(path: str) -> None:
    """Never take a libvirt-held monitor: a waiting client steals it when libvirtd restarts."""
    if any(m in path for m in _LIBVIRT_MONITOR_MARKERS) and path.endswith("monitor.sock"):
        raise InspectionError(
            ErrorReason.LIBVIRT_SOCKET,
            f"{path} is a libvirt domain monitor; qmpguard never connects to it "
            "(use the target libvirt:DOMAIN instead)",
        )


def read_process_cmdline(pid: int) -> PeerProcess:
    """The command line of QEMU process `pid`, if it is readable and really QEMU."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        return PeerProcess(pid=pid, error=f"cannot read /proc/{pid}/cmdline: {exc.strerror}")
    args = [a.decode(errors="replace") for a in raw.split(b"\0")]
    if args and args[-1] == "":
        args.pop()
    if not args or not is_qemu(pid, args):
        # SO_PEERCRED names whoever called listen(): a manager that created the socket
        # and passed it to QEMU, not QEMU itself. Its command line is no evidence.
        argv0 = args[0] if args else "?"
        return PeerProcess(
            pid=pid,
            error=f"process {pid} ({argv0}) is not QEMU (socket created by another process)",
        )
    return PeerProcess(pid=pid, cmdline=args)


def read_peer_process(sock: socket.socket) -> PeerProcess:
    """PID (SO_PEERCRED) and command line of the process at the other end of a UNIX socket."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
    except OSError as exc:
        return PeerProcess(error=f"SO_PEERCRED failed: {exc.strerror}")
    return read_process_cmdline(pid)


class Session(Protocol):
    """What collection needs from any transport (direct QMP, libvirt passthrough)."""

    target: Target
    peer: PeerProcess | None
    commands_sent: int

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any: ...


@dataclass
class QMPSession(GuardedSession):
    """One connected, read-only QMP session. Use `async with open_session(...)`."""

    target: Target
    timeouts: Timeouts
    client: QMPClient
    peer: PeerProcess | None = None
    commands_sent: int = 0

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        try:
            return await self.client.execute(command, arguments)
        except ExecuteError as exc:
            err = exc.error.error
            raise CommandFailed(str(err.class_), str(err.desc)) from None
        except Exception as exc:  # qemu.qmp raises assorted types when the peer goes away
            raise InspectionError(
                ErrorReason.DISCONNECTED, f"connection lost during {command}: {_describe(exc)}"
            ) from None


class PrettyTolerantClient(QMPClient):
    """qemu.qmp's client, also reading QEMU's pretty-printed QMP (`-qmp-pretty`,
    `-mon ...,pretty=on`), where one message spans many lines.

    A line that fails to parse only because the JSON is cut short at its end is joined
    with the next one, up to the read limit; anything else fails as before.
    """

    async def _do_recv(self) -> Message:
        raw = await self._readline()
        while True:
            try:
                return Message(raw, eager=True)
            except DeserializationError as exc:
                if not _cut_short(exc) or len(raw) > self.readbuflen:
                    raise
            raw += await self._readline()


def _cut_short(exc: DeserializationError) -> bool:
    """The JSON error lies at the very end of the text: more lines would complete it."""
    cause = exc.__cause__
    return isinstance(cause, json.JSONDecodeError) and cause.pos >= len(cause.doc.rstrip())


def _describe(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if inner is not None and str(inner) and str(inner) not in text:
        text = f"{text}: {inner}"
    return text.splitlines()[0] if text else type(exc).__name__


def _not_a_socket(path: str) -> InspectionError | None:
    """An error if `path` exists and is no socket (a file, directory or device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    kind = (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a regular file"
        if stat.S_ISREG(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a socket"
    )
    return InspectionError(ErrorReason.NOT_A_SOCKET, f"{path} is {kind}, not a QMP socket")


async def _connect_unix(sock: socket.socket, path: str, timeout: float) -> None:
    """connect() a non-blocking UNIX socket. EAGAIN means the listener's backlog is full
    (QEMU stopped, or its one monitor held while others queue): retried until `timeout`,
    then reported as busy. asyncio's sock_connect would take EAGAIN for success."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError as exc:
            if exc.errno != errno.EAGAIN:
                raise
        if loop.time() >= deadline:
            raise InspectionError(
                ErrorReason.BUSY,
                f"monitor busy: the listen backlog of {path} stayed full for {timeout:g}s "
                "(QEMU stopped or hung, or its monitor held while other clients wait)",
            )
        await asyncio.sleep(BACKLOG_RETRY_S)


async def _connect_socket(target: Target, timeout: float) -> socket.socket:
    """A connected non-blocking socket to the target's QMP monitor, within `timeout`; a
    failure is an InspectionError with a one-line reason, and the socket is closed."""
    sock, address = await _new_socket(target)
    sock.setblocking(False)
    try:
        await _connect(sock, target, address, timeout)
    except OSError as exc:
        sock.close()
        raise _connect_error(exc, target) from None
    except BaseException:  # busy backlog, or cancelled while connecting: ours to close
        sock.close()
        raise
    return sock


async def _new_socket(target: Target) -> tuple[socket.socket, Any]:
    """An unconnected socket for the target and the address to connect it to. A UNIX
    path is checked first: never libvirt's monitor, and never a path that is no socket
    (a file or directory would only say "connection refused")."""
    if target.kind == "unix":
        refuse_libvirt_socket(target.address)
        wrong = _not_a_socket(target.address)
        if wrong is not None:
            raise wrong
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), target.address
    if target.kind == "tcp":
        host, port = target.tcp_host_port
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise InspectionError(
                ErrorReason.UNREACHABLE, f"cannot resolve {host}: {exc}"
            ) from None
        family, _, proto, _, address = infos[0]
        return socket.socket(family, socket.SOCK_STREAM, proto), address
    raise InspectionError(ErrorReason.UNSUPPORTED, f"{target.kind} targets do not use a QMP socket")


async def _connect(sock: socket.socket, target: Target, address: Any, timeout: float) -> None:
    """connect() within `timeout`: a UNIX socket by _connect_unix (never blocks: bounded
    by its own deadline), a TCP one by asyncio."""
    if target.kind == "unix":
        await _connect_unix(sock, address, timeout)
        return
    async with asyncio.timeout(timeout):
        await asyncio.get_running_loop().sock_connect(sock, address)


def _connect_error(exc: OSError, target: Target) -> InspectionError:
    """The one-line reason for a failed connect()."""
    if isinstance(exc, FileNotFoundError):
        return InspectionError(ErrorReason.NO_SOCKET, f"no such socket: {target.address}")
    if isinstance(exc, PermissionError):
        return InspectionError(
            ErrorReason.PERMISSION_DENIED, f"permission denied on {target.address}"
        )
    if isinstance(exc, ConnectionRefusedError):
        # Re-checked: the path may have been replaced by a file since the first look.
        return _not_a_socket(target.address) or InspectionError(
            ErrorReason.REFUSED,
            f"connection refused by {target.address} (stale socket: QEMU gone?)",
        )
    if isinstance(exc, TimeoutError):
        return InspectionError(ErrorReason.UNREACHABLE, f"connect to {target.address} timed out")
    return InspectionError(
        ErrorReason.UNREACHABLE, f"cannot connect to {target.address}: {exc.strerror or exc}"
    )


@contextlib.asynccontextmanager
async def open_session(
    target: Target, timeouts: Timeouts | None = None, read_limit: int = READ_LIMIT_BYTES
) -> Any:
    """Connect, wait for the greeting (bounded), negotiate; yield a QMPSession; always close."""
    timeouts = timeouts or Timeouts()
    sock = await _connect_socket(target, timeouts.greeting)
    client = PrettyTolerantClient(target.name, readbuflen=read_limit)
    # The built-in listener keeps every event forever and cannot be removed: make it
    # listen for a name no event has, so a flood of events costs no memory.
    client.events.names = {"QMPGUARD-NO-EVENT"}
    try:
        try:
            async with asyncio.timeout(timeouts.greeting):
                await client.connect(sock)
        except TimeoutError:
            if client.greeting is not None:
                raise InspectionError(
                    ErrorReason.TIMEOUT,
                    f"{target.address} greeted but did not answer "
                    f"qmp_capabilities within {timeouts.greeting:g}s",
                ) from None
            raise InspectionError(
                ErrorReason.BUSY,
                f"monitor busy, held by another client: no QMP greeting from {target.address} "
                f"within {timeouts.greeting:g}s",
            ) from None
        except ConnectError as exc:
            cause = exc.exc if hasattr(exc, "exc") else exc.__cause__
            if isinstance(cause, EOFError | ConnectionResetError | BrokenPipeError):
                raise InspectionError(
                    ErrorReason.DISCONNECTED,
                    f"{target.address} closed the connection before the greeting",
                ) from None
            raise InspectionError(
                ErrorReason.NOT_QMP, f"{target.address} is not a QMP peer: {_describe(exc)}"
            ) from None
        # Read the peer only now: after the greeting the process is QEMU for sure (a wrapper
        # that execs QEMU would otherwise be caught mid-way).
        peer = read_peer_process(sock) if target.kind == "unix" else None
        yield QMPSession(target=target, timeouts=timeouts, client=client, peer=peer)
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await client.disconnect()
        sock.close()
