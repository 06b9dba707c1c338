"""Collection: the few targeted QMP queries that produce a Snapshot.

Never a full QOM walk: only the containers, host bridges, PCI buses, the devices on
them and vIOMMUs are read, concurrently (qemu.qmp pipelines concurrent commands).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from qmpguard import qemu_types as T
from qmpguard.analysis.qtree import type_facts
from qmpguard.qemu_types import HMP_MTREE, HMP_QTREE, child_type, link_type
from qmpguard.qmp.transport import CommandFailed, InspectionError, Session
from qmpguard.snapshot import Snapshot


class _Recorder:
    """Sends commands through the session and records every reply in the snapshot."""

    def __init__(self, session: Session, snap: Snapshot) -> None:
        self.session = session
        self.snap = snap

    async def __call__(self, command: str, **arguments: Any) -> Any:
        try:
            value = await self.session.execute(command, arguments or None)
        except CommandFailed as exc:
            self.snap.record(
                command, arguments, {"error": {"class": exc.error_class, "desc": exc.desc}}
            )
            return None
        self.snap.record(command, arguments, {"return": value})
        return value


def _names(reply: Any) -> list[tuple[str, str]]:
    """(name, type) pairs from a qom-list reply; tolerate junk by skipping it."""
    if not isinstance(reply, list):
        return []
    return [
        (e["name"], e["type"])
        for e in reply
        if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("type"), str)
    ]


async def collect(session: Session) -> Snapshot:
    """Read one VM into a Snapshot."""
    started = time.perf_counter()
    snap = Snapshot(
        target=session.target.name,
        transport="libvirt" if session.target.kind == "libvirt" else f"qmp-{session.target.kind}",
        collected_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if session.peer is not None:
        snap.pid, snap.cmdline, snap.cmdline_error = (
            session.peer.pid, session.peer.cmdline, session.peer.error,
        )
    q = _Recorder(session, snap)

    (version, _cmds, qtree, *rest) = await asyncio.gather(
        q("query-version"),
        q("query-commands"),
        q("human-monitor-command", **{"command-line": HMP_QTREE}),
        q("qom-list", path="/"),
        *(q("qom-list", path=c) for c in T.OBJECT_CONTAINERS),
        q("qom-get", path="/machine", property="default-bus-bypass-iommu"),
        q("qom-get", path="/machine", property="iommu"),
        q("query-pci"),
        q("human-monitor-command", **{"command-line": HMP_MTREE}),
    )
    if isinstance(version, dict):
        qv = version.get("qemu", {})
        if isinstance(qv, dict):
            snap.qemu_version = f"{qv.get('major')}.{qv.get('minor')}.{qv.get('micro')}"
    facts = type_facts(qtree)
    if facts is None:
        raise InspectionError("bad-reply", "info qtree is not in a known format")
    containers = rest[1 : 1 + len(T.OBJECT_CONTAINERS)]
    bus_types, bridge_types, virtio_types = facts.pci_bus, facts.bridge, facts.virtio_pci

    hosts: list[str] = []
    viommus: list[tuple[str, str]] = []
    for base, reply in zip(T.OBJECT_CONTAINERS, containers, strict=True):
        for name, etype in _names(reply):
            ctype = child_type(etype)
            if ctype is None:
                continue
            path = f"{base}/{name}"
            if ctype in facts.host_bridge:
                hosts.append(path)
            elif ctype in T.VIOMMU_TYPES and ctype not in T.PCI_VIOMMU_TYPES:
                viommus.append((path, ctype))

    seen_buses: set[str] = set()

    async def read_bus(bus: str) -> None:
        if bus in seen_buses:
            return
        seen_buses.add(bus)
        listing = _names(await q("qom-list", path=bus))
        links = [(n, link_type(t)) for n, t in listing if n.startswith("child[")]
        await asyncio.gather(*(read_device(bus, n, t) for n, t in links if t))

    async def read_device(bus: str, link: str, dtype: str) -> None:
        path = await q("qom-get", path=bus, property=link)
        if not isinstance(path, str) or not path.startswith("/"):
            return
        jobs = [q("qom-get", path=path, property="addr")]
        if path.startswith("/machine/peripheral"):  # built-in devices are never hot-plugged
            jobs.append(q("qom-get", path=path, property="hotplugged"))
        if dtype in virtio_types:
            jobs.append(q("qom-get", path=f"{path}/virtio-backend", property="iommu_platform"))
        if dtype in bridge_types:
            jobs.append(q("qom-list", path=path))
        results = await asyncio.gather(*jobs)
        if dtype in bridge_types:
            children = [
                f"{path}/{n}" for n, t in _names(results[-1]) if child_type(t) in bus_types
            ]
            await asyncio.gather(*(read_bus(b) for b in children))

    async def read_host(host: str) -> None:
        listing, _ = await asyncio.gather(
            q("qom-list", path=host), q("qom-get", path=host, property="bypass-iommu")
        )
        roots = [f"{host}/{n}" for n, t in _names(listing) if child_type(t) in bus_types]
        await asyncio.gather(*(read_bus(b) for b in roots))

    async def read_viommu(path: str, vtype: str) -> None:
        props = ["hotplugged", "caching-mode", "primary-bus", "dma-translation"]
        await asyncio.gather(*(q("qom-get", path=path, property=p) for p in props))

    await asyncio.gather(
        *(read_host(h) for h in hosts),
        *(read_viommu(p, t) for p, t in viommus),
    )
    snap.timings = {
        "collect_s": round(time.perf_counter() - started, 6),
        "commands": session.commands_sent,
    }
    return snap
