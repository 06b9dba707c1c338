"""QMP through libvirt's monitor passthrough, for VMs whose monitor libvirt holds.

libvirt owns a domain's QMP socket; qmpguard never touches it. Commands go through
`virDomainQemuMonitorCommand` (libvirt-python), behind the same allow-list as direct
QMP. libvirt marks a domain "tainted: custom-monitor" the first time this is used
(read-only commands included, libvirt 9.0). The optional extra `qmpguard[libvirt]`
provides libvirt-python.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from qmpguard.errors import CommandFailed, ErrorReason, InspectionError
from qmpguard.qmp.guard import GuardedSession, Timeouts
from qmpguard.qmp.transport import PeerProcess, read_process_cmdline
from qmpguard.targets import Target

PID_DIR = "/run/libvirt/qemu"


def _libvirt() -> tuple[Any, Any]:
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        raise InspectionError(
            "unsupported",
            "libvirt targets need libvirt-python: pip install 'qmpguard[libvirt]' "
            "(on Debian first: apt install libvirt-dev pkg-config python3-dev)",
        ) from None
    return libvirt, libvirt_qemu


def _libvirt_error(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class LibvirtSession(GuardedSession):
    """A read-only QMP session through libvirt for one domain."""

    via = " through libvirt"

    target: Target
    timeouts: Timeouts
    domain: Any
    qemu: Any
    peer: PeerProcess | None = None
    commands_sent: int = 0

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            text = await asyncio.to_thread(
                self.qemu.qemuMonitorCommand, self.domain, json.dumps(msg), 0
            )
        except Exception as exc:  # libvirt.libvirtError and friends
            raise InspectionError(ErrorReason.LIBVIRT, f"libvirt: {_libvirt_error(exc)}") from None
        return _reply_value(command, text)


def _reply_value(command: str, text: object) -> Any:
    """The `return` of libvirt's passthrough reply; CommandFailed for QEMU's error."""
    try:
        reply = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise InspectionError(ErrorReason.BAD_REPLY, f"{command}: libvirt returned no JSON object")
    if "error" in reply:
        err = reply["error"] if isinstance(reply["error"], dict) else {}
        raise CommandFailed(str(err.get("class")), str(err.get("desc")))
    if "return" not in reply:
        raise InspectionError(ErrorReason.BAD_REPLY, f"{command}: reply has no 'return'")
    return reply["return"]


def domain_peer(name: str) -> PeerProcess:
    """The QEMU process of a libvirt domain, from libvirt's pid file."""
    try:
        with open(f"{PID_DIR}/{name}.pid") as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError) as exc:
        return PeerProcess(error=f"cannot read {PID_DIR}/{name}.pid: {exc}")
    return read_process_cmdline(pid)


@contextlib.asynccontextmanager
async def open_libvirt_session(
    target: Target, timeouts: Timeouts | None = None
) -> AsyncIterator[LibvirtSession]:
    """Connect to libvirt, look up the domain, yield a session; always close."""
    libvirt, libvirt_qemu = _libvirt()
    timeouts = timeouts or Timeouts()
    try:
        async with asyncio.timeout(timeouts.greeting + timeouts.command):
            conn = await asyncio.to_thread(libvirt.open, target.uri)
    except TimeoutError:
        raise InspectionError("unreachable", f"libvirt {target.uri} did not answer") from None
    except libvirt.libvirtError as exc:
        raise InspectionError(
            "unreachable", f"libvirt {target.uri}: {_libvirt_error(exc)}"
        ) from None
    try:
        try:
            dom = await asyncio.to_thread(conn.lookupByName, target.address)
        except libvirt.libvirtError as exc:
            raise InspectionError("no-domain", f"libvirt: {_libvirt_error(exc)}") from None
        if not dom.isActive():
            raise InspectionError("not-running", f"domain {target.address} is not running")
        yield LibvirtSession(
            target=target,
            timeouts=timeouts,
            domain=dom,
            qemu=libvirt_qemu,
            peer=domain_peer(target.address),
        )
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def running_domains(uri: str) -> list[Target]:
    """Every running domain at `uri` as a libvirt target."""
    libvirt, _ = _libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise InspectionError("unreachable", f"libvirt {uri}: {_libvirt_error(exc)}") from None
    try:
        doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return [Target("libvirt", d.name(), uri) for d in sorted(doms, key=lambda d: d.name())]
    finally:
        conn.close()


class LifecycleWatcher:
    """Calls `on_change()` (from libvirt's event thread) when a domain starts or stops.

    Uses libvirt's default event loop implementation in a daemon thread. If libvirt is
    unreachable or events are unsupported, `start()` returns False and the caller polls.
    """

    def __init__(self, uris: tuple[str, ...], on_change: Callable[[], None]) -> None:
        self.uris = uris
        self.on_change = on_change
        self._conns: list[Any] = []

    def start(self) -> bool:
        try:
            libvirt, _ = _libvirt()
        except InspectionError:
            return False
        try:
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(
                target=self._run, args=(libvirt,), daemon=True, name="libvirt-events"
            ).start()
            for uri in self.uris:
                conn = libvirt.open(uri)
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None
                )
                self._conns.append(conn)
        except libvirt.libvirtError:
            return False
        return True

    def _run(self, libvirt: Any) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _event(self, *_: Any) -> None:
        self.on_change()
