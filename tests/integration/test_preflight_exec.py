"""`qmpguard exec -- QEMU ARGS`: checked, then QEMU itself (same PID, environment, file
descriptors, default signal dispositions), or refused with exit 2 and the fix.

Each QEMU of the matrix is started the way a launcher would start it through the gate:
a one-line wrapper script (`exec qmpguard exec -- QEMU "$@"`, what libvirt's <emulator>
would point at) with the QMP socket already listening on fd 3 and the VFIO emulation in
the environment. QEMU answering on fd 3, the emulation's DMA log and /proc/PID prove
that what runs is QEMU in the launcher's process, with everything it was given.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    build_emulation,
    create_sysfs_device,
    emulation_env,
    mapped_bytes_by_group,
)
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspection import inspect_target
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.conftest import AUDIT, QEMU_MATRIX, audit_qmp_trace, requires_qemu

pytestmark = [pytest.mark.integration, requires_qemu]
#: Python ignores SIGXFSZ (and SIGPIPE, which QEMU ignores itself); ignored signals
#: survive exec, so exec restores the default
SIGXFSZ_BIT = 1 << (25 - 1)


@pytest.fixture(scope="module")
def so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_emulation(tmp_path_factory.mktemp("fakevfio"))


def gate_wrapper(tmp_path: Path, qemu: str, strict: bool = False) -> Path:
    wrapper = tmp_path / "qemu-guarded"
    flag = " --strict" if strict else ""
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m qmpguard exec{flag} -- {qemu} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def devices(tmp_path: Path, viommu_first: bool) -> list[str]:
    sysfs = create_sysfs_device(tmp_path / "sys", VfioDeviceSpec("0000:01:00.0", 1))
    vfio = f"vfio-pci,id=hostdev0,sysfsdev={sysfs},bus=pcie.0,addr=9.0,rombar=0"
    viommu = "virtio-iommu-pci,id=viommu,boot-bypass=false,bus=pcie.0,addr=2.0"
    order = [viommu, vfio] if viommu_first else [vfio, viommu]
    return ["-M", "q35", "-m", "64", "-S", *(a for d in order for a in ("-device", d))]


def start(tmp_path: Path, wrapper: Path, so: Path, args: list[str]) -> QemuProcess:
    trace = tmp_path / "trace.log"
    env = {**emulation_env(so, tmp_path / "dma.log"), "QMPGUARD_TEST_MARKER": "kept"}
    vm = QemuProcess(
        args=[*args, "-trace", f"handle_qmp_command,file={trace}"],
        qmp_path=tmp_path / "vm.qmp",
        binary=str(wrapper),
        env=env,
        stderr_path=tmp_path / "stderr",
    )
    return vm.start()


async def _greeting(path: Path) -> None:
    client = QMPClient("exec-test")
    await client.connect(str(path))
    await client.execute("query-status")
    await client.disconnect()


@pytest.mark.parametrize("label", list(QEMU_MATRIX), ids=lambda lb: f"qemu-{lb}")
def test_exec_becomes_qemu(label: str, tmp_path: Path, so: Path) -> None:
    wrapper = gate_wrapper(tmp_path, QEMU_MATRIX[label])
    vm = start(tmp_path, wrapper, so, devices(tmp_path, viommu_first=True))
    try:
        asyncio.run(_greeting(vm.qmp_path))  # QMP on the inherited fd 3
        pid = vm.pid
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        assert exe.startswith("qemu-system-x86_64"), exe  # the launcher's PID is QEMU now
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"QMPGUARD_TEST_MARKER=kept" in environ
        sigign = next(
            int(line.split()[1], 16)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("SigIgn:")
        )
        assert not sigign & SIGXFSZ_BIT
        # the emulation (LD_PRELOAD in the environment) reached QEMU: its DMA log has
        # the device's container, nothing mapped (boot-bypass=false, vIOMMU first)
        assert mapped_bytes_by_group(tmp_path / "dma.log") == {1: 0}
        result = asyncio.run(inspect_target(parse_target(str(vm.qmp_path))))
        doc = target_json(result)
        assert next(d for d in doc["devices"] if d["id"] == "hostdev0")["verdict"] == "ok"
        assert "qmpguard:" not in vm.stderr_text()  # nothing to say about this line
    finally:
        vm.stop()
        AUDIT["vms"] += 1
        assert not audit_qmp_trace(tmp_path / "trace.log")


@pytest.mark.parametrize("label", list(QEMU_MATRIX), ids=lambda lb: f"qemu-{lb}")
def test_exec_refuses_a_misbound_line(label: str, tmp_path: Path, so: Path) -> None:
    wrapper = gate_wrapper(tmp_path, QEMU_MATRIX[label])
    vm = start(tmp_path, wrapper, so, devices(tmp_path, viommu_first=False))
    try:
        assert vm.popen is not None
        assert vm.popen.wait(timeout=60) == 2
        err = vm.stderr_text()
        assert "refused to start" in err and "QG001" in err
        assert "Corrected command line:" in err
        assert not (tmp_path / "dma.log").exists()  # QEMU never ran
    finally:
        vm.stop()


def test_exec_strict_refuses_what_it_cannot_verify(tmp_path: Path, so: Path) -> None:
    """A -readconfig file preflight will not read (over 1 MiB) that QEMU reads fine."""
    cfg = tmp_path / "big.cfg"
    cfg.write_text("#" * (1 << 20) + "\n" + '[device]\n  driver = "pci-testdev"\n')
    args = ["-M", "q35", "-S", "-readconfig", str(cfg)]
    qemu = next(iter(QEMU_MATRIX.values()))
    strict = start(tmp_path, gate_wrapper(tmp_path, qemu, strict=True), so, args)
    try:
        assert strict.popen is not None and strict.popen.wait(timeout=60) == 2
        assert "cannot be verified (--strict)" in strict.stderr_text()
    finally:
        strict.stop()
    lenient_dir = tmp_path / "lenient"
    lenient_dir.mkdir()
    lenient = start(lenient_dir, gate_wrapper(lenient_dir, qemu), so, args)
    try:
        asyncio.run(_greeting(lenient.qmp_path))
        assert "unverified (--strict would refuse it)" in lenient.stderr_text()
    finally:
        lenient.stop()
        AUDIT["vms"] += 1
        assert not audit_qmp_trace(lenient_dir / "trace.log")
