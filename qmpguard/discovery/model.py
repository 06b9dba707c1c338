"""What process discovery knows: typed records, no I/O.

`ProcessFacts` is what the I/O edge read about one QEMU process (its command line, its
namespaces, its socket table); `DiscoveredVM` is the verdict: how qmpguard would inspect
it (a target) or why it would not. Logic compares enums, never message text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class MonitorProtocol(StrEnum):
    QMP = "qmp"
    HMP = "hmp"  # the human monitor (-monitor, -mon mode=readline): never used


class Transport(StrEnum):
    """How the monitor's character device is reached."""

    UNIX = "unix"  # a path on the command line
    TCP = "tcp"
    FD = "fd"  # a socket inherited from the parent (libvirt's way): resolved via /proc
    OTHER = "other"  # stdio, pty, file, ...: only the parent process talks to it


@dataclass(frozen=True)
class MonitorSpec:
    """One monitor as the command line declares it."""

    protocol: MonitorProtocol
    option: str  # "-qmp", "-mon", "-monitor", "-qmp-pretty"
    argument: int  # argv index of the option's value (evidence)
    transport: Transport
    chardev: str | None = None  # the -chardev id, for -mon
    path: str | None = None  # unix path as the QEMU process sees it
    host: str | None = None
    port: int | None = None
    fd: int | None = None
    server: bool = True  # False: QEMU connects out to whoever listens there
    detail: str = ""  # the backend for OTHER (e.g. "stdio"), or why it was not understood


class NamespaceRelation(StrEnum):
    """A process's namespace compared with ours."""

    SAME = "same"
    OTHER = "other"
    UNKNOWN = "unknown"  # /proc/PID/ns/* unreadable (needs ptrace access)


class ProcRead(StrEnum):
    """A /proc read that discovery attempts: the `what` of an access problem."""

    EXE = "exe"  # /proc/PID/exe: QEMU recognised by executable
    MOUNT_NS = "ns/mnt"
    NET_NS = "ns/net"
    FDS = "fd"  # /proc/PID/fd: which sockets it holds (fd= monitors, accepted clients)
    NET_UNIX = "net/unix"  # its network namespace's UNIX socket table
    ROOT = "root"  # /proc/PID/root: paths in its mount namespace


@dataclass(frozen=True)
class AccessProblem:
    """A /proc read that failed, with the errno name (EACCES, EPERM, ...)."""

    what: ProcRead
    error: str


class PathKind(StrEnum):
    SOCKET = "socket"
    MISSING = "missing"
    NOT_SOCKET = "not-a-socket"
    DENIED = "permission-denied"
    TOO_LONG = "too-long"  # longer than a UNIX socket address can hold (107 bytes)


@dataclass(frozen=True)
class VisiblePath:
    """A path of the process's mount namespace, as we can reach it from ours."""

    here: str
    kind: PathKind


@dataclass(frozen=True)
class UnixSocketEntry:
    """One line of /proc/PID/net/unix."""

    inode: int
    path: str  # "" for an unbound socket; "@name" for an abstract one
    listening: bool
    state: int  # 1 unconnected (or listening), 2 connecting (in a backlog), 3 connected


@dataclass(frozen=True)
class ProcessFacts:
    """Everything the I/O edge read about one QEMU process (None: could not be read)."""

    pid: int
    argv: tuple[str, ...]
    exe: str | None
    mount_ns: NamespaceRelation
    net_ns: NamespaceRelation
    socket_fds: Mapping[int, int] | None  # fd -> socket inode
    unix_sockets: tuple[UnixSocketEntry, ...] | None
    #: Unix paths of its mount namespace (monitor sockets, libvirt daemon sockets) as
    #: reachable from ours.
    visible: Mapping[str, VisiblePath] = field(default_factory=dict)
    problems: tuple[AccessProblem, ...] = ()


class ProbeOutcome(StrEnum):
    GREETED = "greeted"  # a QMP greeting came; we closed without sending anything
    FAILED = "failed"


class ProbeFailure(StrEnum):
    """Why a probe saw no greeting (values as the inspection error reasons)."""

    BUSY = "busy"  # no greeting in time, or the listen backlog stayed full
    DISCONNECTED = "disconnected"
    NOT_QMP = "not-qmp"
    NO_SOCKET = "no-socket"
    PERMISSION_DENIED = "permission-denied"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    REFUSED_LIBVIRT = "libvirt-socket"  # libvirt's monitor: never connected to
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class ProbeResult:
    """What a greeting probe saw on one address (`unix:...` or `tcp:...`)."""

    outcome: ProbeOutcome
    reason: ProbeFailure | None = None
    message: str = ""


class MonitorState(StrEnum):
    FREE = "free"  # probed: greeted, nobody else connected
    LISTENING = "listening"  # not probed; no client seen in the socket table
    HELD = "held"  # another client has it (socket table or no greeting in time)
    LIBVIRT = "libvirt"  # libvirt's monitor: never connected to
    CLIENT_MODE = "client-mode"  # QEMU dials out: whoever listens owns it
    PRIVATE = "private"  # stdio, pty or a connected socket passed by the parent
    UNREACHABLE = "unreachable"
    HMP = "hmp"  # human monitor: not QMP, ignored


class MonitorOwner(StrEnum):
    """Who holds a monitor, as far as can be told."""

    NOBODY = "nobody"  # free for qmpguard's brief, read-only session
    LIBVIRT = "libvirt"
    ANOTHER_CLIENT = "another-client"
    PARENT = "parent"  # the process that started QEMU (stdio, inherited connected fd)
    UNKNOWN = "unknown"


STATE_OWNER = {
    MonitorState.FREE: MonitorOwner.NOBODY,
    MonitorState.LISTENING: MonitorOwner.NOBODY,
    MonitorState.HELD: MonitorOwner.ANOTHER_CLIENT,
    MonitorState.LIBVIRT: MonitorOwner.LIBVIRT,
    MonitorState.CLIENT_MODE: MonitorOwner.UNKNOWN,
    MonitorState.PRIVATE: MonitorOwner.PARENT,
    MonitorState.UNREACHABLE: MonitorOwner.UNKNOWN,
    MonitorState.HMP: MonitorOwner.UNKNOWN,
}


@dataclass(frozen=True)
class MonitorFinding:
    """One monitor with where it is reached from here and who holds it."""

    spec: MonitorSpec
    state: MonitorState
    address: str | None = None  # target string from here: "unix:/proc/7/root/x.qmp"
    path: str | None = None  # unix path in the process's view (resolved for fd=N)
    reason: str = ""  # one line for people

    @property
    def owner(self) -> MonitorOwner:
        return STATE_OWNER[self.state]


class Manager(StrEnum):
    LIBVIRT = "libvirt"
    NONE = "none"  # no manager recognised: QEMU's own monitors are used


class Route(StrEnum):
    MONITOR = "monitor"  # one of its own QMP monitors
    LIBVIRT = "libvirt"  # through the libvirt daemon that manages it
    NONE = "none"


class Unavailable(StrEnum):
    """Why a discovered QEMU cannot be inspected (the contract of `reason`)."""

    BUSY = "busy"  # every QMP monitor is held by another client
    NO_QMP_MONITOR = "no-qmp-monitor"
    NO_LIBVIRT_DAEMON = "no-libvirt-daemon"  # libvirt-managed, its daemon's socket not found
    NO_DOMAIN_NAME = "no-domain-name"  # libvirt-managed without -name
    UNREACHABLE = "unreachable"  # monitors exist, none reachable from here


@dataclass(frozen=True)
class DiscoveredVM:
    """One QEMU process: how it would be inspected, or why not."""

    pid: int
    name: str | None
    exe: str | None
    mount_ns: NamespaceRelation
    manager: Manager
    monitors: tuple[MonitorFinding, ...]
    route: Route
    target: str | None  # a target string for `qmpguard check`, when route is not NONE
    unavailable: Unavailable | None = None
    message: str = ""
    problems: tuple[AccessProblem, ...] = ()
    notes: tuple[str, ...] = ()
