"""Operating the daemon (issue 15), on a real daemon process over real HTTP: the last
known truth survives a held monitor, VMs carry their names, SIGHUP applies what it says,
the daemon refuses to serve beyond loopback without a token, and the metrics pass
promtool. Plus `check --format nagios|prometheus` against the demo's VMs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VmFactory, requires_qemu
from tests.hostile_peer import HostileFakeQMPPeer
from tests.integration.support import (
    FAST_RESCAN,
    Daemon,
    demo_vm,
    free_port,
    monitor_held,
    requires_openssl,
    self_signed_cert,
    wait_for,
)

pytestmark = [pytest.mark.integration]

JSON_LOG = ("--log-format", "json")


def samples(metrics: str, family: str) -> dict[str, float]:
    """`{labels: value}` of one family in a text exposition."""
    out = {}
    for line in metrics.splitlines():
        m = re.fullmatch(rf"{family}(\{{.*\}})? (\S+)", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI"):
            raise AssertionError("promtool missing: deploy/install-dev.sh installs prometheus")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return tool


def promtool_check_metrics(text: str) -> None:
    proc = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@requires_qemu
def test_a_held_monitor_keeps_the_last_known_truth(
    qemu_vm: VmFactory, daemon: Any, tmp_path: Path, fakevfio: Path
) -> None:
    """The issue's operator scenario: the demo's misbound VM at a 1 s interval, its
    monitor held by another client for several intervals. QG001 and the misbound verdict
    are in every scrape throughout, marked stale with their age; finding_appeared is
    logged once."""
    vm = demo_vm(qemu_vm, tmp_path, fakevfio, "bad-vm", viommu_first=False)
    name = f"unix:{vm.qmp_path}"
    config = tmp_path / "daemon.toml"
    config.write_text(
        f'watch = ["{tmp_path}/*.qmp"]\ninterval = 1\n{FAST_RESCAN}[timeouts]\ngreeting = 0.3\n'
    )
    d: Daemon = daemon("--config", str(config))
    qg001 = f'{{code="QG001",severity="critical",vm="{name}"}}'
    misbound = f'{{verdict="misbound",vm="{name}"}}'
    wait_for(lambda: qg001 in samples(d.metrics(), "qmpguard_findings"), what="QG001")
    metrics = d.metrics()
    promtool_check_metrics(metrics)
    info = samples(metrics, "qmpguard_vm_info")
    assert info == {f'{{label="bad-vm",name="bad-vm",uuid="",vm="{name}",vmid=""}}': 1.0}
    assert samples(metrics, "process_resident_memory_bytes")
    (build,) = samples(metrics, "qmpguard_build_info")
    assert f'python_version="{sys.version.split()[0]}"' in build
    assert samples(metrics, "qmpguard_inspection_interval_seconds") == {"": 1.0}
    summary = d.vms()[name]
    assert summary["vm"]["name"] == "bad-vm" and summary["label"] == "bad-vm"
    first_success = summary["last_success"]

    scrapes = 0
    down_seen = stale_seen = False
    held_success: float | None = None  # once a failure is recorded: frozen from then on
    with monitor_held(vm.qmp_path):
        held_at = time.monotonic()
        deadline = held_at + 30
        while True:  # every scrape while held: the findings and the verdict are there
            metrics = d.metrics()
            scrapes += 1
            assert samples(metrics, "qmpguard_findings").get(qg001) == 1.0, metrics
            assert samples(metrics, "qmpguard_vfio_devices").get(misbound) == 1.0, metrics
            (success,) = samples(metrics, "qmpguard_last_success_timestamp_seconds").values()
            assert success >= first_success
            if held_success is not None:  # their age, unchanged while the monitor is held
                assert success == held_success
            if samples(metrics, "qmpguard_vm_up")[f'{{vm="{name}"}}'] == 0.0:
                # (An inspection already under way when the holder connected may still
                # have succeeded: the truth is frozen from the first failure on.)
                held_success = held_success or success
                down_seen = True
                vm_summary = d.vms()[name]
                assert vm_summary["findings"] == ["QG001"] and vm_summary["worst"] == "critical"
                assert vm_summary["error_reason"] == "busy"
                stale_seen |= vm_summary["stale"]
            errors = samples(metrics, "qmpguard_inspection_errors_total")
            if errors.get(f'{{reason="busy",vm="{name}"}}', 0) >= 4:
                break  # several intervals of failed inspections
            assert time.monotonic() < deadline, f"no 4 busy inspections in 30 s: {errors}"
            time.sleep(0.1)
        held_for = time.monotonic() - held_at
    assert down_seen and stale_seen and scrapes >= 10
    doc = d.vm(name)  # the API's document: the last known truth, marked
    assert doc["findings"][0]["code"] == "QG001" and doc["vm"]["name"] == "bad-vm"
    assert doc["inspection"]["up"] is False and doc["inspection"]["stale"] is True
    # Released: the next inspection succeeds and the truth is fresh again.
    wait_for(
        lambda: d.vms()[name]["up"] and d.vms()[name]["last_success"] > (held_success or 0),
        what="inspection after the monitor is released",
    )
    assert qg001 in samples(d.metrics(), "qmpguard_findings")
    log = d.log_lines()
    appeared = [e for e in log if e["event"] == "finding_appeared" and e["vm"] == name]
    assert [e["code"] for e in appeared] == ["QG001"]  # once, for the whole scenario
    assert not [e for e in log if e["event"] == "finding_cleared"]
    (down,) = [e for e in log if e["event"] == "vm_down" and e["vm"] == name]
    assert down["reason"] == "busy" and down["keeping"] == ["QG001"]
    print(f"monitor held {held_for:.1f} s, {scrapes} scrapes, QG001 in every one")


def https_get(port: int, path: str, token: str, cafile: Path) -> int:
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
    req.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def gauge(
    d: Daemon, family: str, token: str, scheme: str = "http", ca: Path | None = None
) -> float:
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{d.port}/metrics")
    req.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    with urllib.request.urlopen(req, timeout=5, context=context) as resp:
        return samples(resp.read().decode(), family)[""]


@requires_openssl
@contextlib.contextmanager
def daemon_from_config(config: Path, port: int, token: str) -> Iterator[Daemon]:
    """A daemon whose every setting, `listen` included, comes from `config` (the fixture
    passes --listen, which a reload could not change)."""
    log = config.with_suffix(".log")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmpguard", "daemon", "--config", str(config), *JSON_LOG],
            stderr=err,
            text=True,
        )
    d = Daemon(proc, port, token, log)
    try:
        wait_for(lambda: proc.poll() is None and _healthy(d), what="daemon to listen")
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_sighup_applies_token_tls_concurrency_and_names_what_needs_a_restart(
    tmp_path: Path,
) -> None:
    """Real requests before and after: the old token 401 and the new one 200, TLS from
    the next connection on, the new concurrency in force (three VMs whose monitors never
    greet hold the gate: 1 at a time before, 3 after). 'listen' is named in one line; an
    invalid file, or unusable TLS files, keep what runs."""
    old_token, new_token = "old-token-0123456789", "new-token-9876543210"
    (tmp_path / "old.token").write_text(old_token + "\n")
    (tmp_path / "new.token").write_text(new_token + "\n")
    cert, key = self_signed_cert(tmp_path)
    config = tmp_path / "daemon.toml"
    port = free_port()
    common = f'watch = ["{tmp_path}/h*.qmp"]\ninterval = 1\n[timeouts]\ngreeting = 5\n'
    config.write_text(
        f'listen = "127.0.0.1:{port}"\nconcurrency = 1\n{common}'
        f'[http]\ntoken_file = "{tmp_path}/old.token"\n'
    )
    with contextlib.ExitStack() as stack:
        for i in range(3):
            stack.enter_context(HostileFakeQMPPeer(tmp_path / f"h{i}.qmp", "no-greeting"))
        d = stack.enter_context(daemon_from_config(config, port, old_token))
        assert d.get("/api/v1/vms", token=old_token)[0] == 200
        assert d.get("/api/v1/vms", token=new_token)[0] == 401
        wait_for(
            lambda: gauge(d, "qmpguard_inspections_in_progress", old_token) == 1,
            what="an inspection in progress",
        )
        busy = []
        for _ in range(15):  # 3 VMs want in, 1 may: never more than 1 at a time
            busy.append(gauge(d, "qmpguard_inspections_in_progress", old_token))
            time.sleep(0.1)
        assert max(busy) == 1, busy

        config.write_text(
            f'listen = "127.0.0.1:{free_port()}"\nconcurrency = 3\n{common}[http]\n'
            f'token_file = "{tmp_path}/new.token"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        )
        d.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: any(e["event"] == "config_reloaded" for e in d.log_lines()),
            what="config_reloaded",
        )
        assert https_get(d.port, "/api/v1/vms", old_token, cert) == 401
        assert https_get(d.port, "/api/v1/vms", new_token, cert) == 200
        assert https_get(d.port, "/healthz", "", cert) == 200
        with pytest.raises(OSError):  # plain HTTP is no longer served
            d.get("/healthz")
        assert gauge(d, "qmpguard_inspection_concurrency", new_token, "https", cert) == 3
        wait_for(
            lambda: gauge(d, "qmpguard_inspections_in_progress", new_token, "https", cert) == 3,
            what="three inspections at once after the reload",
        )
        log = d.log_lines()
        (reloaded,) = [e for e in log if e["event"] == "config_reloaded"]
        assert {"concurrency", "token", "tls_cert", "tls_key", "listen"} <= set(reloaded["changed"])
        assert new_token not in json.dumps(log)
        (restart,) = [e for e in log if e["event"] == "config_needs_restart"]
        assert restart["settings"] == ["listen"]
        assert restart["running"] == {"listen": f"127.0.0.1:{d.port}"}

        # Refused reloads: the running config stays, in full.
        bad_files = [
            "concurrency = 0\n",  # invalid value
            f'{common}[http]\ntoken_file = "{tmp_path}/old.token"\n'  # unusable TLS files
            f'tls_cert = "{tmp_path}/new.token"\ntls_key = "{tmp_path}/new.token"\n',
        ]
        for n, text in enumerate(bad_files, 1):  # (listen unchanged: not named again)
            config.write_text(text)
            d.proc.send_signal(signal.SIGHUP)

            def refused(n: int = n) -> bool:
                return len([e for e in d.log_lines() if e["event"] == "config_reload_failed"]) == n

            wait_for(refused, what="config_reload_failed")
            assert https_get(d.port, "/api/v1/vms", new_token, cert) == 200
            assert https_get(d.port, "/api/v1/vms", old_token, cert) == 401
            assert gauge(d, "qmpguard_inspection_concurrency", new_token, "https", cert) == 3
        failed = [e for e in d.log_lines() if e["event"] == "config_reload_failed"]
        assert "'concurrency'" in failed[0]["error"] and "TLS" in failed[1]["error"]
        assert all(e["keeping"] == "previous config" for e in failed)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=10) == 0


def test_beyond_loopback_without_a_token_is_refused_unless_allowed(
    daemon: Any, tmp_path: Path
) -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "qmpguard", "daemon", "--listen", f"0.0.0.0:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3
    assert proc.stderr.startswith("qmpguard: error: listening on 0.0.0.0:")
    assert "without a token" in proc.stderr and len(proc.stderr.splitlines()) == 1
    # Allowed explicitly: it serves, and says so once.
    allowed = tmp_path / "allowed.toml"
    allowed.write_text("watch = []\n[http]\nallow_unauthenticated = true\n")
    proc2 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmpguard",
            "daemon",
            "--config",
            str(allowed),
            "--listen",
            f"0.0.0.0:{port}",
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        d = Daemon(proc2, port)
        wait_for(lambda: _healthy(d), what="daemon on 0.0.0.0")
    finally:
        proc2.send_signal(signal.SIGTERM)
        _, err = proc2.communicate(timeout=10)
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert events.count("http_unauthenticated") == 1


def test_a_reload_cannot_drop_the_token_of_an_exposed_daemon_by_moving_listen(
    tmp_path: Path,
) -> None:
    """Serving 0.0.0.0 with a token, a reload that removes the token *and* names another
    `listen` is refused: `listen` needs a restart, so the daemon would have gone on
    serving 0.0.0.0 unauthenticated (it did before: the check ran only for an unchanged
    `listen`)."""
    token = "exposed-token-0123456789"
    (tmp_path / "daemon.token").write_text(token + "\n")
    config = tmp_path / "daemon.toml"
    port = free_port()
    config.write_text(
        f'listen = "0.0.0.0:{port}"\nwatch = []\n[http]\ntoken_file = "{tmp_path}/daemon.token"\n'
    )
    with daemon_from_config(config, port, token) as d:
        assert d.get("/api/v1/vms")[0] == 200  # Daemon.get sends d.token
        d.token = None
        assert d.get("/api/v1/vms")[0] == 401
        config.write_text(f'listen = "127.0.0.1:{free_port()}"\nwatch = []\n')
        d.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: any(e["event"] == "config_reload_failed" for e in d.log_lines()),
            what="config_reload_failed",
        )
        (failed,) = [e for e in d.log_lines() if e["event"] == "config_reload_failed"]
        assert f"listening on 0.0.0.0:{port} (beyond loopback) without a token" in failed["error"]
        assert not [e for e in d.log_lines() if e["event"] == "config_reloaded"]
        assert d.get("/api/v1/vms")[0] == 401
        assert d.get("/api/v1/vms", token=token)[0] == 200


def _healthy(d: Daemon) -> bool:
    with contextlib.suppress(OSError):
        return d.get("/healthz")[0] == 200
    return False


@requires_qemu
def test_check_nagios_and_prometheus_formats_on_the_demo_vms(
    qemu_vm: VmFactory, tmp_path: Path, fakevfio: Path
) -> None:
    """As an Icinga check and a textfile collector would run them."""
    good = demo_vm(qemu_vm, tmp_path, fakevfio, "good-vm", viommu_first=True)
    bad = demo_vm(qemu_vm, tmp_path, fakevfio, "bad-vm", viommu_first=False)
    targets = [str(good.qmp_path), str(bad.qmp_path)]

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qmpguard", "check", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    nagios = check("--format", "nagios", *targets)
    assert nagios.returncode == 2, nagios.stderr
    first, *details = nagios.stdout.splitlines()
    assert first.startswith("QMPGUARD CRITICAL - 1 misbound vfio device on bad-vm | ")
    perfdata = dict(p.split("=", 1) for p in first.split(" | ", 1)[1].split())
    assert perfdata["misbound"] == "1;;0;0" and perfdata["vfio_ok"] == "1;;;0"
    assert perfdata["vms"] == "2;;;0" and perfdata["uninspected"] == "0;;;0"
    assert details[0].startswith("[OK] good-vm (") and details[1].startswith("[CRITICAL] bad-vm (")
    ok = check("--format", "nagios", str(good.qmp_path))
    assert ok.returncode == 0
    assert ok.stdout.startswith("QMPGUARD OK - 1 VM, 1 vfio device, no findings | ")
    gone = check("--format", "nagios", str(good.qmp_path), str(tmp_path / "gone.qmp"))
    assert gone.returncode == 3
    assert gone.stdout.startswith("QMPGUARD UNKNOWN - 1 of 2 VMs not inspected (")

    textfile = tmp_path / "collector" / "qmpguard.prom"
    textfile.parent.mkdir()
    prom = check("--format", "prometheus", "--output", str(textfile), *targets)
    assert prom.returncode == 2 and prom.stdout == "", prom.stderr
    assert sorted(p.name for p in textfile.parent.iterdir()) == ["qmpguard.prom"]  # no temp
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644  # node_exporter reads it
    text = textfile.read_text()
    promtool_check_metrics(text)
    bad_vm = f"unix:{bad.qmp_path}"
    assert samples(text, "qmpguard_findings") == {
        f'{{code="QG001",severity="critical",vm="{bad_vm}"}}': 1.0
    }
    assert samples(text, "qmpguard_vfio_devices")[f'{{verdict="misbound",vm="{bad_vm}"}}'] == 1
    info = samples(text, "qmpguard_vm_info")
    assert f'{{label="bad-vm",name="bad-vm",uuid="",vm="{bad_vm}",vmid=""}}' in info
    assert set(samples(text, "qmpguard_vm_up").values()) == {1.0}
