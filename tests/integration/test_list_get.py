"""Batched bus reads (qom-list-get, QEMU 10.1+): same analysis as one read each, fewer
commands, a failed batch falls back, and the read the allow-list refuses really aborts QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpguard.analysis.reads import LIST_GET
from qmpguard.collect import collect
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspection import analyse_snapshot
from qmpguard.qmp.allowlist import ForbiddenCommand, check_command
from qmpguard.qmp.transport import Session, open_session
from qmpguard.report.document import target_json
from qmpguard.snapshot import Snapshot
from qmpguard.targets import parse_target
from tests.conftest import QEMU_ARM_MATRIX, VmFactory, requires_qemu

pytestmark = [pytest.mark.integration, requires_qemu]

#: Named and anonymous endpoints behind root ports, a PCIe-to-PCI bridge and an expander:
#: every anonymous one is placed through its bus's child[N] links.
SHAPE = [
    "-S",
    "-M",
    "q35",
    "-m",
    "64",
    "-device",
    "intel-iommu,id=iommu,caching-mode=on",
    "-device",
    "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=2.0",
    "-device",
    "e1000e,bus=rp1",
    "-device",
    "pcie-root-port,id=rp2,chassis=2,bus=pcie.0,addr=3.0",
    "-device",
    "virtio-net-pci,id=net2,disable-legacy=on,bus=rp2",
    "-device",
    "pcie-pci-bridge,id=ppb,bus=pcie.0,addr=4.0",
    "-device",
    "e1000,bus=ppb,addr=1.0",
    "-device",
    "e1000,bus=ppb,addr=2.0",
    "-device",
    "pxb-pcie,id=pxb,bus_nr=100,bus=pcie.0,addr=5.0",
    "-device",
    "pcie-root-port,id=rp3,chassis=3,bus=pxb",
    "-device",
    "e1000e,bus=rp3",
]


def has_list_get(version: str | None) -> bool:
    """qom-list-get arrived in QEMU 10.1 (qapi/qom.json: Since 10.1)."""
    major, minor = (int(p) for p in (version or "0.0").split(".")[:2])
    return (major, minor) >= (10, 1)


class _BadBatch:
    """A session whose qom-list-get also names an object that does not exist, so QEMU
    fails the whole batch (as it does when a bus goes away between two rounds)."""

    def __init__(self, session: Session) -> None:
        self.inner = session
        self.target, self.peer = session.target, session.peer
        self.commands_sent = session.commands_sent

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        if command == LIST_GET and arguments is not None:
            arguments = {"paths": [*arguments["paths"], "/machine/peripheral/no-such-bus"]}
        try:
            return await self.inner.execute(command, arguments)
        finally:
            self.commands_sent = self.inner.commands_sent


async def _collect(path: Path, batch: bool, bad: bool = False) -> tuple[Snapshot, int]:
    async with open_session(parse_target(str(path))) as session:
        snap = await collect(_BadBatch(session) if bad else session, batch=batch)
    return snap, session.commands_sent


def _analysis(snap: Snapshot) -> dict[str, Any]:
    doc = target_json(analyse_snapshot("vm", snap))
    assert doc["status"] == "ok", doc["error"]
    return doc


def _batches(snap: Snapshot) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in snap.replies.items() if k.startswith(LIST_GET + " ")}


def test_batch_gives_the_same_analysis_with_fewer_commands(qemu_vm: VmFactory) -> None:
    vm = qemu_vm(*SHAPE)
    batched, batched_sent = asyncio.run(_collect(vm.qmp_path, batch=True))
    single, single_sent = asyncio.run(_collect(vm.qmp_path, batch=False))
    assert _analysis(batched) == _analysis(single)
    assert not _batches(single)
    if has_list_get(single.qemu_version):
        assert len(_batches(batched)) == 1
        assert all("return" in reply for reply in _batches(batched).values())
        assert batched_sent < single_sent - 4, (batched_sent, single_sent)
    else:
        assert not _batches(batched)
        assert batched_sent == single_sent + 1  # query-commands, to learn it has none


def test_failed_batch_falls_back_to_single_reads(qemu_vm: VmFactory) -> None:
    vm = qemu_vm(*SHAPE)
    single, _ = asyncio.run(_collect(vm.qmp_path, batch=False))
    if not has_list_get(single.qemu_version):
        pytest.skip(f"QEMU {single.qemu_version} has no qom-list-get")
    snap, _ = asyncio.run(_collect(vm.qmp_path, batch=True, bad=True))
    batches = _batches(snap)
    assert len(batches) == 1
    assert all(reply["error"]["class"] == "DeviceNotFound" for reply in batches.values())
    assert _analysis(snap) == _analysis(single)


@pytest.mark.parametrize("arm", list(QEMU_ARM_MATRIX), ids=lambda label: f"qemu-{label}")
def test_list_get_of_the_machine_aborts_arm_virt_with_virtio_iommu(
    arm: str, tmp_path: Path
) -> None:
    """Why the allow-list refuses qom-list-get of /machine: it calls the `iommu` getter,
    which asserts on ARM virt with a virtio-iommu-pci (QEMU ends; no VM is left running)."""
    with pytest.raises(ForbiddenCommand):
        check_command(LIST_GET, {"paths": ["/machine"]})
    vm = QemuProcess(
        ["-S", "-M", "virt", "-m", "64", "-device", "virtio-iommu-pci"],
        tmp_path / "arm.qmp",
        binary=QEMU_ARM_MATRIX[arm],
        stderr_path=tmp_path / "arm.stderr",
    )
    with vm:
        version = asyncio.run(_arm_version_then_list_get(vm.qmp_path))
        if not has_list_get(version):
            pytest.skip(f"QEMU {version} has no qom-list-get")
        assert vm.popen is not None
        assert vm.popen.wait(timeout=30) != 0
    assert "virt_get_iommu" in vm.stderr_text()


async def _arm_version_then_list_get(qmp: Path) -> str:
    """The QEMU version; on 10.1+ also the batch read of /machine (the test's own client,
    not qmpguard: qmpguard refuses to send it)."""
    client = QMPClient("test")
    await client.connect(str(qmp))
    try:
        reply: dict[str, Any] = await client.execute("query-version")  # type: ignore[assignment]
        v = reply["qemu"]
        version = f"{v['major']}.{v['minor']}"
        if has_list_get(version):
            with contextlib.suppress(Exception):
                await client.execute(LIST_GET, {"paths": ["/machine"]})
        return version
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
