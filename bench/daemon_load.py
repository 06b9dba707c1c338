"""Load benchmark: one daemon watching 200 targets, 20 of them misbehaving.

    .venv/bin/python -m bench.daemon_load [--targets 200] [--real 10] [--bad 20] [--cycles 3]

Real QEMU VMs (TCG, -S) where memory allows (--real); the rest are ReplayFakeQMPPeer
servers, clearly fake: they replay the QMP replies of a snapshot recorded from one real VM
(same commands, same answers). --bad of the fakes misbehave (stall mid-reply, never greet,
send garbage). The daemon runs as a real process with a short interval so that several
cycles fit in a couple of minutes; reported: daemon CPU per inspection cycle (and the
share of one core that means at the default 60 s interval) and p50/p99 inspection time of
the healthy VMs, taken from the daemon's own API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspection import snapshot_target
from qmpguard.snapshot import reply_key
from qmpguard.targets import parse_target
from tests.qmp_stream import QMPStreamReader

VM_ARGS = [
    "-S",
    "-M",
    "q35",
    "-m",
    "32",
    "-device",
    "intel-iommu,caching-mode=on",
    "-device",
    "pcie-root-port,id=rp1,chassis=1",
    "-device",
    "e1000e,id=nic1,bus=rp1",
    "-device",
    "virtio-net-pci,disable-legacy=on,iommu_platform=on",
]
GREETING = (
    b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, '
    b'"package": ""}, "capabilities": ["oob"]}}\r\n'
)


class ReplayFakeQMPPeer:
    """A fake QMP server replaying recorded replies (or misbehaving), many sockets, one loop."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def serve(self, path: Path, mode: str) -> None:
        async def start() -> None:
            await asyncio.start_unix_server(lambda r, w: self._client(r, w, mode), str(path))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str
    ) -> None:
        try:
            if mode == "no-greeting":
                await asyncio.Event().wait()
            if mode == "garbage":
                writer.write(os.urandom(4096))
                await writer.drain()
                return
            writer.write(GREETING)
            stream = QMPStreamReader(reader)
            while msg := await stream.next():
                cmd, args = msg.get("execute"), msg.get("arguments")
                if mode == "stall" and cmd != "qmp_capabilities":
                    writer.write(b'{"return": {"par')
                    await writer.drain()
                    await asyncio.Event().wait()
                reply = (
                    {"return": {}}
                    if cmd == "qmp_capabilities"
                    else self.replies.get(
                        reply_key(str(cmd), args),
                        {"error": {"class": "GenericError", "desc": "not recorded"}},
                    )
                )
                if "id" in msg:
                    reply = {**reply, "id": msg["id"]}
                writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=int, default=200)
    ap.add_argument("--real", type=int, default=10)
    ap.add_argument("--bad", type=int, default=20)
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--cycles", type=int, default=3)
    o = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        vms = [QemuProcess(list(VM_ARGS), d / f"real{i:03d}.qmp").start() for i in range(o.real)]
        try:
            snap = asyncio.run(snapshot_target(parse_target(str(vms[0].qmp_path))))
            peer = ReplayFakeQMPPeer(snap.replies)
            modes = ["stall", "no-greeting", "garbage"]
            for i in range(o.targets - o.real):
                bad = i < o.bad
                peer.serve(
                    d / f"{'bad' if bad else 'fake'}{i:03d}.qmp", modes[i % 3] if bad else "replay"
                )
            port = free_port()
            daemon = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qmpguard",
                    "daemon",
                    "--watch",
                    f"{d}/*.qmp",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--interval",
                    str(o.interval),
                    "--log-format",
                    "json",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 120
                while True:  # every target inspected at least once
                    try:
                        vms_seen = get(port, "/api/v1/vms")
                        if len(vms_seen) == o.targets and all(
                            v["status"] != "pending" for v in vms_seen
                        ):
                            break
                    except OSError:
                        pass
                    assert time.monotonic() < deadline, "daemon did not inspect every target"
                    time.sleep(0.2)
                cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
                time.sleep(o.interval * o.cycles)
                cpu1, t1 = cpu_seconds(daemon.pid), time.monotonic()
                summary = get(port, "/api/v1/vms")
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(30)
        finally:
            for vm in vms:
                vm.stop()
    for v in summary:
        if not v["up"] and not Path(v["name"]).name.startswith("bad"):
            print("unexpectedly down:", v["name"], v["error"], file=sys.stderr)
            break
    healthy = [v for v in summary if v["up"]]
    down = [v for v in summary if not v["up"]]
    durations = sorted(v["last_duration_seconds"] for v in healthy)
    p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))]
    per_cycle = (cpu1 - cpu0) / ((t1 - t0) / o.interval)
    print(
        f"| targets | real QEMU | replay fakes | misbehaving | healthy up | down |"
        f" CPU per cycle | share of one core at 60 s | p50 inspection | p99 inspection |\n"
        f"|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {o.targets} | {o.real} | {o.targets - o.real - o.bad} | {o.bad} | {len(healthy)} |"
        f" {len(down)} | {per_cycle:.2f} s | {100 * per_cycle / 60:.1f} % |"
        f" {statistics.median(durations) * 1000:.0f} ms | {p99 * 1000:.0f} ms |"
    )


if __name__ == "__main__":
    main()
