"""`check --format prometheus`: the daemon's per-VM metrics as Prometheus text exposition,
for hosts that run no daemon (node_exporter's textfile collector reads the file
`--output` writes atomically).

The same names and labels as the daemon's /metrics: qmpguard_vm_up, qmpguard_vm_info,
qmpguard_findings, qmpguard_vfio_devices, qmpguard_last_inspection_timestamp_seconds,
qmpguard_last_success_timestamp_seconds and qmpguard_build_info; so the alerting rules
and the dashboard in deploy/ work on either. Daemon-only series (inspection error
counters, durations, process and HTTP metrics) have no meaning for one run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qmpguard.result import TargetResult

#: Readable by node_exporter, which runs as its own user.
TEXTFILE_MODE = 0o644


def render_prometheus(results: list[TargetResult], now: float | None = None) -> str:
    """The exposition of one check run; a target given twice is reported once."""
    # Imported here: the other formats do not pay for prometheus_client.
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.registry import Collector

    from qmpguard.daemon.exporter import build_info, vm_families
    from qmpguard.daemon.results import VmRecord

    stamp = time.time() if now is None else now
    records: dict[str, VmRecord] = {}
    for r in results:
        if r.target in records:
            continue
        records[r.target] = VmRecord(
            r.target,
            "check",
            result=r,
            last_good=r if r.ok else None,
            last_inspection=stamp,
            last_success=stamp if r.ok else None,
        )

    class Once(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from vm_families(records.values())
            yield build_info()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Once())
    return generate_latest(registry).decode()


def write_text_atomically(path: str | Path, text: str, mode: int = TEXTFILE_MODE) -> None:
    """Write `text` to a temporary file beside `path` (a dot name without `.prom`: the
    textfile collector skips it), then rename over `path`: a reader sees the old file
    or the new one, never a partial one."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
