"""The I/O edge of process discovery: what /proc says about each QEMU process.

Every read that can fail is recorded as an `AccessProblem` (which read, which errno)
instead of raising: an unprivileged run still lists what it can, and says what it
could not see. Reads that need ptrace access to the process (PTRACE_MODE_READ: the
same user, or CAP_SYS_PTRACE): /proc/PID/exe, ns/*, fd/*, root/.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Collection, Iterable

from qmpguard.discovery.model import (
    AccessProblem,
    NamespaceRelation,
    PathKind,
    ProcessFacts,
    ProcRead,
    Transport,
    UnixSocketEntry,
    VisiblePath,
)
from qmpguard.discovery.monitors import monitors
from qmpguard.process import executable_name, is_qemu

#: Where a libvirt daemon listens, in the QEMU process's own mount namespace: the modular
#: daemon (virtqemud, KubeVirt's virt-launcher) first, then the monolithic libvirtd.
LIBVIRT_DAEMON_SOCKETS = (
    "/run/libvirt/virtqemud-sock",
    "/var/run/libvirt/virtqemud-sock",
    "/run/libvirt/libvirt-sock",
    "/var/run/libvirt/libvirt-sock",
)
#: sun_path holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
_SO_ACCEPTCON = 0x10000
_MAX_SYMLINKS = 40
_MAX_CMDLINE = 1 << 20


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def pids() -> list[int]:
    """Every process id in /proc, ascending."""
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def read_argv(pid: int) -> list[str] | None:
    """The process's argv; None if it is gone, a kernel thread, or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read(_MAX_CMDLINE)
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0")]
    if args and args[-1] == "":
        args.pop()
    return args or None


def _ns_id(pid: int | str, kind: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/{kind}")
    return (st.st_dev, st.st_ino)


def namespace_relation(
    pid: int, kind: str, what: ProcRead, problems: list[AccessProblem]
) -> tuple[NamespaceRelation, tuple[int, int] | None]:
    """SAME/OTHER compared with ours (and the namespace's id), UNKNOWN if unreadable."""
    try:
        theirs = _ns_id(pid, kind)
        ours = _ns_id("self", kind)
    except OSError as exc:
        problems.append(AccessProblem(what, _errname(exc)))
        return NamespaceRelation.UNKNOWN, None
    return (NamespaceRelation.SAME if theirs == ours else NamespaceRelation.OTHER), theirs


def socket_fds(pid: int, problems: list[AccessProblem]) -> dict[int, int] | None:
    """fd -> socket inode for every socket the process holds; None if unreadable."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError as exc:
        problems.append(AccessProblem(ProcRead.FDS, _errname(exc)))
        return None
    out: dict[int, int] = {}
    for name in names:
        try:
            link = os.readlink(f"{base}/{name}")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue  # closed meanwhile
            problems.append(AccessProblem(ProcRead.FDS, _errname(exc)))
            return None
        if link.startswith("socket:[") and link.endswith("]") and name.isdigit():
            out[int(name)] = int(link[8:-1])
    return out


def parse_unix_table(text: str) -> tuple[UnixSocketEntry, ...]:
    """Lines of /proc/net/unix: `Num RefCount Protocol Flags Type St Inode [Path]`."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split(None, 7)
        if len(parts) < 7:
            continue
        try:
            flags, state, inode = int(parts[3], 16), int(parts[5], 16), int(parts[6])
        except ValueError:
            continue
        path = parts[7] if len(parts) == 8 else ""
        out.append(UnixSocketEntry(inode, path, bool(flags & _SO_ACCEPTCON), state))
    return tuple(out)


def unix_table(pid: int, problems: list[AccessProblem]) -> tuple[UnixSocketEntry, ...] | None:
    try:
        with open(f"/proc/{pid}/net/unix") as fh:
            return parse_unix_table(fh.read())
    except OSError as exc:
        problems.append(AccessProblem(ProcRead.NET_UNIX, _errname(exc)))
        return None


def resolve_in_root(root: str, path: str) -> str:
    """`path` of another mount namespace under its `root` (/proc/PID/root), following
    its symlinks inside that root: an absolute link (Debian's /var/run -> /run) would
    otherwise resolve against our root. OSError if a link cannot be read."""
    parts: deque[str] = deque(p for p in path.split("/") if p)
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.popleft()
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/".join([root, *done, part])
        try:
            target = os.readlink(candidate)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
                done.append(part)  # not a link (or not there): keep the name
                continue
            raise
        hops += 1
        if hops > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many symbolic links", candidate)
        if target.startswith("/"):
            done = []
        parts.extendleft(reversed([p for p in target.split("/") if p]))
    return "/".join([root, *done])


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def visible_path(pid: int, path: str, mount_ns: NamespaceRelation) -> VisiblePath:
    """Where the process's `path` is for us, and what is there. A path of another mount
    namespace that is the very same file in ours (a shared /run, as libvirt's private
    namespaces for QEMU keep it) is given as the plain path."""
    if mount_ns is NamespaceRelation.OTHER:
        try:
            here = resolve_in_root(f"/proc/{pid}/root", path)
        except OSError as exc:
            kind = PathKind.DENIED if exc.errno in (errno.EACCES, errno.EPERM) else PathKind.MISSING
            return VisiblePath(f"/proc/{pid}/root{path}", kind)
        if _same_file(here, path):
            here = path
    else:
        here = path
    if len(os.fsencode(here)) > MAX_UNIX_PATH:
        return VisiblePath(here, PathKind.TOO_LONG)
    try:
        mode = os.stat(here).st_mode
    except PermissionError:
        return VisiblePath(here, PathKind.DENIED)
    except OSError:
        return VisiblePath(here, PathKind.MISSING)
    return VisiblePath(here, PathKind.SOCKET if stat.S_ISSOCK(mode) else PathKind.NOT_SOCKET)


def _monitor_paths(
    argv: list[str], fds: dict[int, int] | None, table: Iterable[UnixSocketEntry] | None
) -> list[str]:
    """Unix paths (in the process's view) of its monitors, fd= ones resolved."""
    by_inode = {e.inode: e for e in table or ()}
    out = []
    for spec in monitors(argv):
        if spec.transport is Transport.UNIX and spec.path and spec.detail != "abstract":
            out.append(spec.path)
        elif spec.transport is Transport.FD and fds is not None and spec.fd in fds:
            entry = by_inode.get(fds[spec.fd])
            if entry is not None and entry.path.startswith("/"):
                out.append(entry.path)
    return out


def read_facts(pid: int, argv: list[str]) -> ProcessFacts:
    """Everything discovery needs to know about QEMU process `pid` (started as `argv`)."""
    problems: list[AccessProblem] = []
    exe = executable_name(pid)
    if exe is None:
        try:
            os.readlink(f"/proc/{pid}/exe")
        except OSError as exc:
            problems.append(AccessProblem(ProcRead.EXE, _errname(exc)))
    mnt, _ = namespace_relation(pid, "mnt", ProcRead.MOUNT_NS, problems)
    net, _ = namespace_relation(pid, "net", ProcRead.NET_NS, problems)
    fds = socket_fds(pid, problems)
    table = unix_table(pid, problems)
    if mnt is NamespaceRelation.OTHER:
        try:
            os.stat(f"/proc/{pid}/root/")
        except OSError as exc:
            problems.append(AccessProblem(ProcRead.ROOT, _errname(exc)))
    visible = {
        path: visible_path(pid, path, mnt)
        for path in [*_monitor_paths(argv, fds, table), *LIBVIRT_DAEMON_SOCKETS]
    }
    return ProcessFacts(
        pid=pid,
        argv=tuple(argv),
        exe=exe,
        mount_ns=mnt,
        net_ns=net,
        socket_fds=fds,
        unix_sockets=table,
        visible=visible,
        problems=tuple(problems),
    )


def qemu_processes(only: Collection[int] | None = None) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every QEMU system emulator (or of those in `only`), recognised by
    its executable."""
    found = []
    for pid in pids() if only is None else sorted(set(only)):
        argv = read_argv(pid)
        if argv is not None and is_qemu(pid, argv):
            found.append((pid, argv))
    return found
