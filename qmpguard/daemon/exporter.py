"""Prometheus metrics, read from the ResultStore at scrape time (no stale series).

Per VM (`vm` is the target name; every series joins on it):
qmpguard_vm_up{vm}                                1 if the latest inspection worked
qmpguard_vm_info{vm,label,name,uuid,vmid}         1: the VM's names (from its last success)
qmpguard_findings{vm,code,severity}               findings of the last successful inspection
qmpguard_vfio_devices{vm,verdict}                 vfio devices by verdict, same inspection
qmpguard_last_inspection_timestamp_seconds{vm}    unix time of the latest attempt
qmpguard_last_success_timestamp_seconds{vm}       unix time of the last successful one
qmpguard_inspection_errors_total{vm,reason}       failed inspections since the VM appeared
Daemon: qmpguard_inspection_duration_seconds (histogram), qmpguard_inspection_interval_seconds,
qmpguard_inspection_concurrency, qmpguard_inspections_in_progress, qmpguard_build_info
{version,python_version}, process_* (prometheus_client's ProcessCollector), qmpguard_http_*.

Findings and verdicts are the last known truth: a failed attempt (a busy monitor) keeps
them, and `qmpguard_last_success_timestamp_seconds` says how old they are.
`qmpguard check --format prometheus` writes the per-VM families with the same names.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qmpguard import __version__
from qmpguard.analysis.model import Verdict
from qmpguard.daemon.results import ResultStore, VmRecord

VERDICTS = (Verdict.OK, Verdict.MISBOUND, Verdict.UNVERIFIED)


def build_info() -> GaugeMetricFamily:
    info = GaugeMetricFamily(
        "qmpguard_build_info",
        "qmpguard build: always 1",
        labels=["version", "python_version"],
    )
    info.add_metric([__version__, platform.python_version()], 1)
    return info


def vm_families(records: Iterable[VmRecord]) -> list[Metric]:
    """The per-VM families, from each VM's latest attempt and last known truth."""
    up = GaugeMetricFamily(
        "qmpguard_vm_up", "1 if the VM's latest inspection worked", labels=["vm"]
    )
    info = GaugeMetricFamily(
        "qmpguard_vm_info",
        "The VM's names, always 1: join on vm (label: name, Proxmox VMID or socket name)",
        labels=["vm", "label", "name", "uuid", "vmid"],
    )
    findings = GaugeMetricFamily(
        "qmpguard_findings",
        "Findings of the last successful inspection (kept while inspections fail)",
        labels=["vm", "code", "severity"],
    )
    vfio = GaugeMetricFamily(
        "qmpguard_vfio_devices",
        "vfio devices by verdict, from the last successful inspection",
        labels=["vm", "verdict"],
    )
    last = GaugeMetricFamily(
        "qmpguard_last_inspection_timestamp_seconds",
        "Unix time of the latest inspection attempt, successful or not",
        labels=["vm"],
    )
    success = GaugeMetricFamily(
        "qmpguard_last_success_timestamp_seconds",
        "Unix time of the last successful inspection: the age of the findings and verdicts",
        labels=["vm"],
    )
    for record in records:
        name = record.name
        up.add_metric([name], 1 if record.up else 0)
        identity = record.identity
        if identity is None:
            info.add_metric([name, "", "", "", ""], 1)
        else:
            names = [identity.label, identity.name, identity.uuid, identity.vmid]
            info.add_metric([name, *(n or "" for n in names)], 1)
        if record.last_inspection is not None:
            last.add_metric([name], record.last_inspection)
        good = record.last_good
        if good is None or good.analysis is None:
            continue
        if record.last_success is not None:
            success.add_metric([name], record.last_success)
        counts = Counter((f.code, f.severity) for f in record.findings())
        for (code, severity), n in sorted(counts.items()):
            findings.add_metric([name, code, severity], n)
        verdicts = Counter(d.verdict for d in good.analysis.devices if d.device.vfio)
        for verdict in VERDICTS:
            vfio.add_metric([name, verdict], verdicts.get(verdict, 0))
    return [up, info, findings, vfio, last, success]


class StoreCollector(Collector):
    """Turns the store's current state into metric families on every scrape."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        records = [record for _, record in sorted(self.store.vms.items())]
        yield from vm_families(records)
        errors = CounterMetricFamily(
            "qmpguard_inspection_errors", "Failed inspections by reason", labels=["vm", "reason"]
        )
        for record in records:
            for reason, count in sorted(record.errors.items()):
                errors.add_metric([record.name, reason], count)
        yield errors
        yield build_info()


class Schedule(Protocol):
    """What the scheduler exposes about itself (qmpguard.daemon.watch.Scheduler)."""

    @property
    def interval(self) -> float: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def in_progress(self) -> int: ...


class ScheduleCollector(Collector):
    """The settings in force (they change on SIGHUP): the stale alert counts intervals."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "qmpguard_inspection_interval_seconds",
            "Seconds between inspections of one VM (before jitter)",
            value=self.schedule.interval,
        )
        yield GaugeMetricFamily(
            "qmpguard_inspection_concurrency",
            "Inspections allowed at once",
            value=self.schedule.concurrency,
        )
        yield GaugeMetricFamily(
            "qmpguard_inspections_in_progress",
            "Inspections running now",
            value=self.schedule.in_progress,
        )


def build_registry(store: ResultStore) -> tuple[CollectorRegistry, Histogram]:
    """A registry with the store collector, process_* metrics and the inspection-duration
    histogram."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    ProcessCollector(registry=registry)
    duration = Histogram(
        "qmpguard_inspection_duration_seconds",
        "Time to inspect one VM (connect, collect, analyse)",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        registry=registry,
    )
    return registry, duration
