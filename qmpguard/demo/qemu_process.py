"""Start and stop real QEMU processes with a QMP socket that listens before QEMU runs.

The QMP socket is bound and listening in this process and handed to QEMU as a file
descriptor, so a client can connect the moment `start()` returns: no polling, no sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_QEMU = "qemu-system-x86_64"


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
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> QemuProcess:
        """Bind the QMP socket, then start QEMU on it. Returns self."""
        if shutil.which(self.binary) is None and not Path(self.binary).exists():
            raise FileNotFoundError(f"QEMU binary not found: {self.binary}")
        self.qmp_path.parent.mkdir(parents=True, exist_ok=True)
        if self.qmp_path.exists() or self.qmp_path.is_symlink():
            self.qmp_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.qmp_path))
            listener.listen(16)
            fd = listener.fileno()
            cmd = [
                self.binary,
                "-nodefaults",
                "-display", "none",
                "-chardev", f"socket,id=qmpguard-mon,fd={fd},server=on,wait=off",
                "-mon", "chardev=qmpguard-mon,mode=control",
                *self.args,
            ]
            err = open(self.stderr_path, "wb") if self.stderr_path else subprocess.DEVNULL  # noqa: SIM115
            try:
                env = {**os.environ, **self.env} if self.env is not None else None
                self.popen = subprocess.Popen(
                    cmd, pass_fds=[fd], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err, env=env,
                    start_new_session=True,
                )
            finally:
                if err is not subprocess.DEVNULL:
                    err.close()  # type: ignore[union-attr]
        finally:
            listener.close()
        return self

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
        if self.qmp_path.exists():
            self.qmp_path.unlink(missing_ok=True)

    def __enter__(self) -> QemuProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
