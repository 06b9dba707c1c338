"""Who owns each monitor of a QEMU process and how qmpguard would inspect it: pure.

Order of preference: a QMP monitor of its own that nobody holds (a brief read-only
session, no manager involved), then the libvirt daemon that manages it (monitor
passthrough: libvirt keeps its monitor), else nothing, with the reason. libvirt's own
monitor is never a candidate (docs/design.md: a client waiting in its backlog takes it
over when libvirtd restarts).
"""

from __future__ import annotations

from collections.abc import Mapping

from qmpguard.discovery.model import (
    DiscoveredVM,
    Manager,
    MonitorFinding,
    MonitorProtocol,
    MonitorSpec,
    MonitorState,
    NamespaceRelation,
    PathKind,
    ProbeFailure,
    ProbeOutcome,
    ProbeResult,
    ProcessFacts,
    Route,
    Transport,
    Unavailable,
    UnixSocketEntry,
)
from qmpguard.discovery.monitors import guest_name, monitors
from qmpguard.discovery.procfs import LIBVIRT_DAEMON_SOCKETS
from qmpguard.errors import InspectionError
from qmpguard.qmp.transport import refuse_libvirt_socket
from qmpguard.targets import DEFAULT_LIBVIRT_URI, Target

#: libvirt names the monitor chardev of every domain it starts `charmonitor`.
LIBVIRT_MONITOR_CHARDEV = "charmonitor"
_WILDCARD = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}
_PATH_PROBLEM = {
    PathKind.MISSING: "no socket at {here}",
    PathKind.NOT_SOCKET: "{here} is not a socket",
    PathKind.DENIED: "permission denied on {here}",
    PathKind.TOO_LONG: "{here} is too long for a UNIX socket address",
}


def is_libvirt_monitor_path(path: str) -> bool:
    """libvirt's layout: .../libvirt/qemu/domain-*/monitor.sock (the transport's rule)."""
    try:
        refuse_libvirt_socket(path)
    except InspectionError:
        return True
    return False


def _resolve_fd(
    spec: MonitorSpec, facts: ProcessFacts
) -> tuple[UnixSocketEntry | None, str | None]:
    """The socket table entry behind `fd=N`, or why it is unknown."""
    if facts.socket_fds is None:
        return None, f"fd={spec.fd}: /proc/{facts.pid}/fd unreadable (needs ptrace access)"
    if spec.fd is None or spec.fd not in facts.socket_fds:
        return None, f"fd={spec.fd} is not an open socket of process {facts.pid}"
    inode = facts.socket_fds[spec.fd]
    for entry in facts.unix_sockets or ():
        if entry.inode == inode:
            return entry, None
    if facts.unix_sockets is None:
        return None, f"fd={spec.fd}: /proc/{facts.pid}/net/unix unreadable"
    return None, f"fd={spec.fd} is not a UNIX socket (inode {inode})"


def _clients(path: str, facts: ProcessFacts) -> tuple[int, int]:
    """(connections QEMU accepted on `path`, clients waiting in its backlog)."""
    accepted = waiting = 0
    mine = set(facts.socket_fds.values()) if facts.socket_fds is not None else None
    for entry in facts.unix_sockets or ():
        if entry.path != path or entry.listening:
            continue
        if entry.state == 3 and entry.inode and (mine is None or entry.inode in mine):
            accepted += 1
        elif entry.state == 2:
            waiting += 1
    return accepted, waiting


def _probed(finding: MonitorFinding, probes: Mapping[str, ProbeResult]) -> MonitorFinding:
    """A reachable monitor with its probe result, if it was probed."""
    assert finding.address is not None
    result = probes.get(finding.address)
    if result is None:
        return finding
    if result.outcome is ProbeOutcome.GREETED:
        return MonitorFinding(finding.spec, MonitorState.FREE, finding.address, finding.path)
    if result.reason is ProbeFailure.BUSY:
        # The socket table's account (who, how many waiting) says more than a timeout.
        reason = finding.reason if finding.state is MonitorState.HELD else result.message
        return MonitorFinding(
            finding.spec, MonitorState.HELD, finding.address, finding.path, reason
        )
    return MonitorFinding(
        finding.spec, MonitorState.UNREACHABLE, finding.address, finding.path, result.message
    )


def _unix_finding(
    spec: MonitorSpec, path: str, facts: ProcessFacts, probes: Mapping[str, ProbeResult]
) -> MonitorFinding:
    if is_libvirt_monitor_path(path):
        return MonitorFinding(
            spec, MonitorState.LIBVIRT, path=path, reason="libvirt's monitor: never connected to"
        )
    if not spec.server:
        return MonitorFinding(
            spec,
            MonitorState.CLIENT_MODE,
            path=path,
            reason=f"QEMU connects out to {path}: the listener there owns this monitor",
        )
    if spec.detail == "abstract":
        return MonitorFinding(
            spec, MonitorState.UNREACHABLE, path=path, reason="abstract socket: not supported"
        )
    seen = facts.visible.get(path)
    if seen is None or seen.kind is not PathKind.SOCKET:
        reason = (
            _PATH_PROBLEM[seen.kind].format(here=seen.here)
            if seen is not None and seen.kind in _PATH_PROBLEM
            else f"{path} not looked up"
        )
        if facts.mount_ns is NamespaceRelation.UNKNOWN:
            reason += f" (its mount namespace is unknown: /proc/{facts.pid}/ns/mnt unreadable)"
        return MonitorFinding(spec, MonitorState.UNREACHABLE, path=path, reason=reason)
    address = Target("unix", seen.here).name
    accepted, waiting = _clients(path, facts)
    if accepted:
        # Seen held in the socket table. A probe still decides when there is one: the
        # holder may just have closed (QEMU has not noticed yet).
        more = f"; {waiting} more waiting" if waiting else ""
        held = MonitorFinding(
            spec,
            MonitorState.HELD,
            address,
            path,
            f"held by another client (QEMU has accepted a connection on {path}{more})",
        )
        return _probed(held, probes)
    return _probed(MonitorFinding(spec, MonitorState.LISTENING, address, path), probes)


def _finding(
    spec: MonitorSpec, facts: ProcessFacts, probes: Mapping[str, ProbeResult]
) -> MonitorFinding:
    """Who owns one monitor and whether qmpguard can reach it, by its transport; only a
    UNIX or TCP socket QEMU listens on is reachable (HMP never counts: not QMP)."""
    if spec.protocol is MonitorProtocol.HMP:
        return MonitorFinding(
            spec, MonitorState.HMP, reason="human monitor (HMP), not QMP: ignored"
        )
    if spec.transport is Transport.UNIX and spec.path:
        return _unix_finding(spec, spec.path, facts, probes)
    if spec.transport is Transport.FD:
        return _fd_finding(spec, facts, probes)
    if spec.transport is Transport.TCP:
        return _tcp_finding(spec, facts, probes)
    return MonitorFinding(
        spec,
        MonitorState.PRIVATE,
        reason=f"{spec.detail or 'unknown'} monitor: only QEMU's parent can talk to it",
    )


def _fd_finding(
    spec: MonitorSpec, facts: ProcessFacts, probes: Mapping[str, ProbeResult]
) -> MonitorFinding:
    """`fd=N`: a listening socket with a path is judged as that path; anything else is
    out of reach (a connected socket belongs to QEMU's parent). An unknown fd on
    libvirt's monitor chardev is libvirt's monitor all the same."""
    entry, problem = _resolve_fd(spec, facts)
    if entry is None:
        if spec.chardev == LIBVIRT_MONITOR_CHARDEV:
            return MonitorFinding(
                spec, MonitorState.LIBVIRT, reason=f"libvirt's monitor chardev ({problem})"
            )
        return MonitorFinding(spec, MonitorState.UNREACHABLE, reason=problem or "")
    if entry.listening and entry.path.startswith("/"):
        return _unix_finding(spec, entry.path, facts, probes)
    if entry.listening:
        return MonitorFinding(
            spec, MonitorState.UNREACHABLE, reason=f"fd={spec.fd} listens on no path"
        )
    return MonitorFinding(
        spec,
        MonitorState.PRIVATE,
        reason=f"fd={spec.fd} is a connected socket passed by QEMU's parent",
    )


def _tcp_finding(
    spec: MonitorSpec, facts: ProcessFacts, probes: Mapping[str, ProbeResult]
) -> MonitorFinding:
    """A TCP server monitor is reachable at its address (a wildcard one on loopback)
    unless it is telnet, unparsable, or in another network namespace."""
    if not spec.server:
        return MonitorFinding(
            spec,
            MonitorState.CLIENT_MODE,
            reason=f"QEMU connects out to {spec.host}:{spec.port}",
        )
    if spec.port is None or spec.detail == "telnet":
        return MonitorFinding(
            spec, MonitorState.UNREACHABLE, reason="telnet or unparsable TCP monitor"
        )
    if facts.net_ns is NamespaceRelation.OTHER:
        return MonitorFinding(
            spec,
            MonitorState.UNREACHABLE,
            reason="TCP monitor in another network namespace: its address is not ours",
        )
    host = _WILDCARD.get(spec.host or "", spec.host or "")
    address = Target("tcp", f"[{host}]:{spec.port}" if ":" in host else f"{host}:{spec.port}")
    return _probed(MonitorFinding(spec, MonitorState.LISTENING, address.name), probes)


def _libvirt_uri(facts: ProcessFacts, session: bool) -> str | None:
    """The URI of the libvirt daemon in the process's mount namespace, if it has one."""
    for path in LIBVIRT_DAEMON_SOCKETS:
        seen = facts.visible.get(path)
        if seen is None or seen.kind is not PathKind.SOCKET:
            continue
        if seen.here == path and not session:  # the daemon we would reach by default
            return DEFAULT_LIBVIRT_URI
        return f"qemu+unix:///{'session' if session else 'system'}?socket={seen.here}"
    return None


def _is_session(findings: tuple[MonitorFinding, ...]) -> bool:
    """A session daemon's domains live under $XDG_CONFIG_HOME/libvirt/qemu/lib/."""
    for f in findings:
        if f.state is MonitorState.LIBVIRT and f.path:
            return not f.path.startswith(("/var/lib/libvirt/", "/run/libvirt/"))
    return False


def monitor_addresses(facts: ProcessFacts) -> list[str]:
    """Addresses a greeting probe may connect to: QMP servers of its own, reachable from
    here (never libvirt's)."""
    found = [_finding(spec, facts, {}) for spec in monitors(facts.argv)]
    probe = (MonitorState.LISTENING, MonitorState.HELD)
    return [f.address for f in found if f.state in probe and f.address]


def _route(
    facts: ProcessFacts, name: str | None, findings: tuple[MonitorFinding, ...], hmp: bool
) -> tuple[Route, str | None, Unavailable | None, str]:
    """(route, target, why not, message) for one process."""
    usable = [f for f in findings if f.state in (MonitorState.FREE, MonitorState.LISTENING)]
    if usable:
        return Route.MONITOR, usable[0].address, None, "its own QMP monitor"
    if any(f.state is MonitorState.LIBVIRT for f in findings):
        if name is None:
            return (
                Route.NONE,
                None,
                Unavailable.NO_DOMAIN_NAME,
                "libvirt-managed, but without -name: the domain is unknown",
            )
        uri = _libvirt_uri(facts, _is_session(findings))
        if uri is None:
            where = (
                "/run/libvirt"
                if facts.mount_ns is NamespaceRelation.SAME
                else "its mount namespace"
            )
            return (
                Route.NONE,
                None,
                Unavailable.NO_LIBVIRT_DAEMON,
                f"libvirt-managed, but no libvirt daemon socket found in {where}",
            )
        return (
            Route.LIBVIRT,
            Target("libvirt", name, uri).name,
            None,
            "libvirt-managed: through its libvirt daemon, never its monitor",
        )
    qmp = [f for f in findings if f.state is not MonitorState.HMP]
    if not qmp:
        only = " (only HMP monitors, which qmpguard does not use)" if hmp else ""
        return Route.NONE, None, Unavailable.NO_QMP_MONITOR, f"no QMP monitor{only}"
    held = [f for f in qmp if f.state is MonitorState.HELD]
    if held:
        return Route.NONE, None, Unavailable.BUSY, f"monitor busy: {held[0].reason}"
    return (
        Route.NONE,
        None,
        Unavailable.UNREACHABLE,
        f"no QMP monitor reachable from here: {qmp[0].reason}",
    )


def classify(facts: ProcessFacts, probes: Mapping[str, ProbeResult]) -> DiscoveredVM:
    """How QEMU process `facts` would be inspected, from its facts and probe results."""
    name = guest_name(facts.argv)
    findings = tuple(_finding(spec, facts, probes) for spec in monitors(facts.argv))
    notes = tuple(
        f"{f.spec.option} at argv[{f.spec.argument}]: {f.reason}"
        for f in findings
        if f.state is MonitorState.HMP
    )
    route, target, unavailable, message = _route(facts, name, findings, bool(notes))
    libvirt = any(f.state is MonitorState.LIBVIRT for f in findings)
    return DiscoveredVM(
        pid=facts.pid,
        name=name,
        exe=facts.exe,
        mount_ns=facts.mount_ns,
        manager=Manager.LIBVIRT if libvirt else Manager.NONE,
        monitors=findings,
        route=route,
        target=target,
        unavailable=unavailable,
        message=message,
        problems=facts.problems,
        notes=notes,
    )
