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
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qmpguard.qmp.allowlist import check_command
from qmpguard.qmp.transport import (
    CommandFailed,
    InspectionError,
    PeerProcess,
    Timeouts,
    read_process_cmdline,
)
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
class LibvirtSession:
    """A read-only QMP session through libvirt for one domain."""

    target: Target
    timeouts: Timeouts
    domain: Any
    qemu: Any
    peer: PeerProcess | None = None
    commands_sent: int = 0

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Send one allow-listed command through libvirt; return its `return` value."""
        check_command(command, arguments)
        self.commands_sent += 1
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        try:
            async with asyncio.timeout(self.timeouts.command):
                text = await asyncio.to_thread(
                    self.qemu.qemuMonitorCommand, self.domain, json.dumps(msg), 0
                )
        except TimeoutError:
            raise InspectionError(
                "timeout",
                f"{command} got no reply through libvirt within {self.timeouts.command:g}s",
            ) from None
        except Exception as exc:  # libvirt.libvirtError and friends
            raise InspectionError("libvirt", f"libvirt: {_libvirt_error(exc)}") from None
        try:
            reply = json.loads(text)
        except (TypeError, json.JSONDecodeError, RecursionError):
            raise InspectionError("bad-reply", f"{command}: libvirt returned non-JSON") from None
        if not isinstance(reply, dict):
            raise InspectionError("bad-reply", f"{command}: reply is not an object")
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise CommandFailed(str(err.get("class")), str(err.get("desc")))
        if "return" not in reply:
            raise InspectionError("bad-reply", f"{command}: reply has no 'return'")
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
