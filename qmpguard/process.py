"""The QEMU process behind a monitor: is it QEMU, and the files its command line names.

The command line is order evidence only if it is QEMU's own; a manager that created the
socket and passed it on would show its own. QEMU is recognised by its executable
(/proc/PID/exe, which follows links such as Proxmox VE's /usr/bin/kvm and survives a
package upgrade that deletes the file), not by the name it was started under.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

#: Executable names of QEMU system emulators as distributions install them.
_QEMU_EXE = re.compile(r"qemu-system-[A-Za-z0-9_]+|qemu-kvm|qemu")
#: Names a QEMU may be started under through a link, when its executable is unreadable.
_QEMU_ALIASES = frozenset({"kvm", "qemu-kvm"})
#: A -readconfig file larger than this is not a QEMU config a person wrote.
MAX_CONFIG_BYTES = 1 << 20


def executable_name(pid: int) -> str | None:
    """Basename of the process's executable; None if /proc/PID/exe is unreadable."""
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return os.path.basename(target.removesuffix(" (deleted)"))


def is_qemu(pid: int, argv: list[str]) -> bool:
    """True if process `pid` (started as `argv`) is a QEMU system emulator."""
    exe = executable_name(pid)
    if exe is not None:
        return _QEMU_EXE.fullmatch(exe) is not None
    name = os.path.basename(argv[0]) if argv else ""
    return _QEMU_EXE.fullmatch(name) is not None or name in _QEMU_ALIASES


def _in_process_view(pid: int, path: str) -> Path:
    """`path` as process `pid` sees it: its root and working directory (mount namespaces)."""
    base = f"/proc/{pid}/root" if path.startswith("/") else f"/proc/{pid}/cwd"
    return Path(base) / path.lstrip("/")


def read_config_file(pid: int, path: str) -> str | None:
    """A -readconfig file's text as QEMU saw it; None unless a regular UTF-8 file <= 1 MiB."""
    return read_small_text(_in_process_view(pid, path))


def read_small_text(path: str | Path) -> str | None:
    """A regular UTF-8 file of at most 1 MiB; None otherwise.

    Opened non-blocking and checked with fstat, so a FIFO or device never stalls us.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
                return None
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_CONFIG_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def readconfig_paths(argv: list[str]) -> list[str]:
    """Paths given to -readconfig (either spelling of the option)."""
    return [
        argv[i + 1]
        for i in range(1, len(argv) - 1)
        if argv[i].startswith("-") and argv[i].lstrip("-") == "readconfig"
    ]


def read_command_line_files(pid: int, argv: list[str]) -> dict[str, str]:
    """Every readable -readconfig file of the process, by the path its command line gives."""
    out = {}
    for path in readconfig_paths(argv):
        text = read_config_file(pid, path)
        if text is not None:
            out[path] = text
    return out
