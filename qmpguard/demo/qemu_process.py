"""Start and stop real QEMU processes with a QMP socket that listens before QEMU runs.

The QMP socket is bound and listening before QEMU runs and handed to it as a file
descriptor, so a client can connect the moment `start()` returns: no polling, no sleeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_QEMU = "qemu-system-x86_64"
_QMP_FD = 3  # where the child keeps the listening QMP socket across exec
_SETUP_FD = 4
#: sun_path is 108 bytes on Linux, one of them the terminating NUL (unix(7)).
MAX_SOCKET_PATH = 107


class SocketPathTooLongError(ValueError):
    """A QMP socket path Linux cannot bind: checked before fork, so the caller gets one
    clear error instead of a failure inside the child's preexec hook."""

    def __init__(self, path: Path) -> None:
        size = len(os.fsencode(path))
        super().__init__(
            f"QMP socket path {path} is {size} bytes, a unix socket path is at most "
            f"{MAX_SOCKET_PATH}: use a shorter directory (e.g. TMPDIR=/tmp)"
        )
        self.path = path


def check_socket_path(path: Path) -> None:
    """Raise SocketPathTooLongError if `path` cannot be bound as a unix socket."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketPathTooLongError(path)


def _monitor_args(fd: int, chardev: tuple[str, Path]) -> list[str]:
    """A QMP monitor on the socket the child already listens on at `fd`."""
    return [
        "-chardev",
        f"socket,id={chardev[0]},fd={fd},server=on,wait=off",
        "-mon",
        f"chardev={chardev[0]},mode=control",
    ]


def qemu_binary(default: str = DEFAULT_QEMU) -> str:
    """The QEMU binary to use: $QMPGUARD_TEST_QEMU if set, else `default` on PATH."""
    return os.environ.get("QMPGUARD_TEST_QEMU") or default


@dataclass
class QemuProcess:
    """One QEMU process with its own QMP socket at `qmp_path`."""

    args: list[str]
    qmp_path: Path
    binary: str = field(default_factory=qemu_binary)
    env: dict[str, str] | None = None
    stderr_path: Path | None = None
    #: Optional second QMP monitor (for test setup such as device_add), also listening
    #: before QEMU runs, so qmpguard's monitor is left to qmpguard.
    setup_qmp_path: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> QemuProcess:
        """Start QEMU with its QMP socket already listening when this returns. Returns self.

        The socket is bound in the child between fork and exec, so QEMU itself owns it
        (SO_PEERCRED then names QEMU's pid, as with `-qmp unix:...,server=on`).
        """
        if shutil.which(self.binary) is None and not Path(self.binary).exists():
            raise FileNotFoundError(f"QEMU binary not found: {self.binary}")
        sockets = self._sockets()
        monitors = [arg for fd, chardev in sockets.items() for arg in _monitor_args(fd, chardev)]

        def listen_in_child() -> None:
            for fd, (_, path) in sockets.items():
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(path))
                listener.listen(16)
                os.dup2(listener.fileno(), fd, inheritable=True)

        cmd = [self.binary, "-nodefaults", "-display", "none", *monitors, *self.args]
        env = {**os.environ, **self.env} if self.env is not None else None
        with contextlib.ExitStack() as stack:
            err: Any = subprocess.DEVNULL
            if self.stderr_path:
                err = stack.enter_context(open(self.stderr_path, "wb"))
            self.popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
                close_fds=False,
                preexec_fn=listen_in_child,
            )
        return self

    def _sockets(self) -> dict[int, tuple[str, Path]]:
        """fd -> (chardev id, path) of each monitor socket: checked bindable (before fork,
        SocketPathTooLongError) and any stale file at its path removed."""
        sockets = {_QMP_FD: ("qmpguard-mon", self.qmp_path)}
        if self.setup_qmp_path is not None:
            sockets[_SETUP_FD] = ("setup-mon", self.setup_qmp_path)
        for _, path in sockets.values():
            check_socket_path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        return sockets

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stderr_text(self) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return self.stderr_path.read_text(errors="replace")
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate QEMU (SIGKILL after `timeout`) and reap it. Safe to call twice."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        for path in (self.qmp_path, self.setup_qmp_path):
            if path is not None:
                path.unlink(missing_ok=True)

    def __enter__(self) -> QemuProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
