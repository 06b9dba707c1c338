"""Prometheus metrics, read from the ResultStore at scrape time (no stale series).

qmpguard_vm_up{vm}                              1 if the last inspection worked
qmpguard_findings{vm,code,severity}             findings of the last inspection
qmpguard_vfio_devices{vm,verdict}               vfio devices by verdict
qmpguard_inspection_duration_seconds            histogram over all inspections
qmpguard_inspection_errors_total{vm,reason}     failed inspections since the VM appeared
qmpguard_last_inspection_timestamp_seconds{vm}  unix time of the last inspection
qmpguard_build_info{version}                    always 1
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qmpguard import __version__
from qmpguard.analysis.model import Verdict
from qmpguard.daemon.results import ResultStore
from qmpguard.report.document import target_findings


class StoreCollector(Collector):
    """Turns the store's current state into metric families on every scrape."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "qmpguard_vm_up", "1 if the VM's last inspection worked", labels=["vm"]
        )
        findings = GaugeMetricFamily(
            "qmpguard_findings",
            "Findings of the last inspection",
            labels=["vm", "code", "severity"],
        )
        vfio = GaugeMetricFamily(
            "qmpguard_vfio_devices", "vfio devices by verdict", labels=["vm", "verdict"]
        )
        errors = CounterMetricFamily(
            "qmpguard_inspection_errors", "Failed inspections by reason", labels=["vm", "reason"]
        )
        last = GaugeMetricFamily(
            "qmpguard_last_inspection_timestamp_seconds",
            "Unix time of the last inspection",
            labels=["vm"],
        )
        info = GaugeMetricFamily("qmpguard_build_info", "qmpguard build", labels=["version"])
        info.add_metric([__version__], 1)
        for name, record in sorted(self.store.vms.items()):
            up.add_metric([name], 1 if record.up else 0)
            if record.last_inspection is not None:
                last.add_metric([name], record.last_inspection)
            for reason, count in sorted(record.errors.items()):
                errors.add_metric([name, reason], count)
            if record.result is None:
                continue
            if record.result.ok:
                counts = Counter((f.code, f.severity) for f in target_findings(record.result))
                for (code, severity), n in sorted(counts.items()):
                    findings.add_metric([name, code, severity], n)
                assert record.result.analysis is not None
                verdicts = Counter(
                    d.verdict for d in record.result.analysis.devices if d.device.vfio
                )
                for verdict in (Verdict.OK, Verdict.MISBOUND, Verdict.UNVERIFIED):
                    vfio.add_metric([name, verdict], verdicts.get(verdict, 0))
        yield from (up, findings, vfio, errors, last, info)


def build_registry(store: ResultStore) -> tuple[CollectorRegistry, Histogram]:
    """A registry with the store collector and the inspection-duration histogram."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    duration = Histogram(
        "qmpguard_inspection_duration_seconds",
        "Time to inspect one VM (connect, collect, analyse)",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        registry=registry,
    )
    return registry, duration
