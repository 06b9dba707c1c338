"""Process discovery end to end: /proc facts -> greeting probes -> classification."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import structlog

from qmpguard.discovery.classify import classify, monitor_addresses
from qmpguard.discovery.model import DiscoveredVM, ProbeResult, ProcessFacts
from qmpguard.discovery.probe import PROBE_TIMEOUT_S, probe
from qmpguard.discovery.procfs import qemu_processes, read_facts
from qmpguard.targets import Target, parse_target

log = structlog.get_logger("qmpguard.discovery")


def read_all(only: Collection[int] | None = None) -> list[ProcessFacts]:
    """Facts of every QEMU process on the host, or of those in `only` (blocking reads)."""
    return [read_facts(pid, argv) for pid, argv in qemu_processes(only)]


async def discover(
    *,
    probe_monitors: bool = True,
    timeout: float = PROBE_TIMEOUT_S,
    only: Collection[int] | None = None,
) -> list[DiscoveredVM]:
    """Every QEMU process with how it would be inspected.

    With `probe_monitors`, each QMP monitor of its own that no client is seen holding
    gets a greeting probe (connect, read the greeting, close): busy ones are told apart.
    Without, the socket table alone decides (what the daemon uses on every rescan).
    `only`: look at these process ids alone.
    """
    facts = await asyncio.to_thread(read_all, only)
    probes: dict[str, ProbeResult] = {}
    if probe_monitors:
        addresses = sorted({a for f in facts for a in monitor_addresses(f)})
        results = await asyncio.gather(*(probe(a, timeout) for a in addresses))
        probes = dict(zip(addresses, results, strict=True))
    return [classify(f, probes) for f in facts]


#: Discovery sources the daemon's `discover` setting accepts.
SOURCES = frozenset({"proc"})


class ProcessTargets:
    """The daemon's process discovery: targets of every inspectable QEMU, from /proc
    alone (no probe on each rescan); a QEMU that cannot be inspected is logged once per
    process and reason, not every rescan."""

    def __init__(self) -> None:
        self._said: set[tuple[int, str]] = set()
        self._last: list[Target] = []

    async def __call__(self) -> list[Target]:
        """Targets now; if /proc cannot be listed (no fd left), the last ones, so that a
        failed listing does not drop every VM."""
        try:
            vms = await discover(probe_monitors=False)
        except OSError as exc:
            log.warning("process_discovery_failed", error=exc.strerror or str(exc))
            return list(self._last)
        targets, said = [], set()
        for vm in vms:
            if vm.target is not None:
                targets.append(parse_target(vm.target))
                continue
            key = (vm.pid, str(vm.unavailable))
            said.add(key)
            if key not in self._said:
                log.info(
                    "qemu_not_inspectable",
                    pid=vm.pid,
                    name=vm.name,
                    reason=str(vm.unavailable),
                    message=vm.message,
                )
        self._said, self._last = said, targets
        return targets
