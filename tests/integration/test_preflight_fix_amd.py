"""`qmpguard preflight --fix` on vIOMMUs whose rules depend on the model and version,
proven on the VFIO emulation's DMA log (never on qmpguard's own reasoning).

amd-iommu (QEMU 11.1, dma-remap=on): a vfio device realized before the IOMMU keeps all
guest RAM mapped after the AMD-Vi guest (qmpguard/demo/amd_guest.S) enables translation.
`preflight --fix` moves the IOMMU before it; the corrected command line, run with the same
guest, maps nothing for the device (bound to the IOMMU's address space), and `check` of
that VM says ok.

arm-smmuv3 as a device (QEMU 11.1 aarch64): the misordered VM maps all guest RAM, and
QEMU refuses the reordered one (no MAP notifier). So preflight must give the refused-order
evidence and no reordered command line; the test runs that reorder to show QEMU refuses it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpguard.demo.fakevfio import (
    VfioDeviceSpec,
    build_amd_guest,
    build_emulation,
    create_sysfs_device,
    emulation_env,
    mapped_bytes,
)
from qmpguard.demo.qemu_process import QemuProcess
from qmpguard.inspection import inspect_target
from qmpguard.report.document import target_json
from qmpguard.targets import parse_target
from tests.conftest import QEMU_ARM_MATRIX, QEMU_MATRIX, VmFactory, requires_qemu

pytestmark = [pytest.mark.integration, requires_qemu]

QMPGUARD = [sys.executable, "-m", "qmpguard"]
RAM_MIB = 64
RAM = RAM_MIB << 20
AMD = "amd-iommu,id=viommu,dma-remap=on"
NIC = "e1000e,bus=pcie.0,addr=3.0"
SMMU = "arm-smmuv3,id=smmu0,primary-bus=pcie.0"
ROOT_PORT = "pcie-root-port,id=rp1,chassis=1"
GUEST_MARKER = "AMDVI"
MAP_NOTIFIER_REFUSAL = "requires iommu MAP notifier which is not currently supported"
# The VMs below name their own binary: the fixture's x86 matrix is pinned to one entry.
PINNED = pytest.mark.parametrize("qemu_vm", [next(iter(QEMU_MATRIX))], indirect=True, ids=["11.1"])


def version_of(binary: str) -> tuple[int, int]:
    """What the binary itself says (not qmpguard's reading of it)."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def binary_11(matrix: dict[str, str], since: tuple[int, int]) -> str:
    binary = matrix.get("11.1")
    if binary is None or (shutil.which(binary) is None and not Path(binary).exists()):
        pytest.skip("QEMU 11.1 is not unpacked (deploy/fetch-qemu-11.sh)")
    if version_of(binary) < since:
        pytest.skip(f"needs QEMU {since[0]}.{since[1]}+")
    return binary


@dataclass
class Built:
    so: Path
    guest: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    cache = tmp_path_factory.mktemp("fakevfio-preflight-amd")
    return Built(build_emulation(cache), build_amd_guest(cache))


def vfio(tmp_path: Path, where: str) -> str:
    sysfs = create_sysfs_device(tmp_path, VfioDeviceSpec("0000:01:00.0", 1))
    return f"vfio-pci,id=hostdev0,sysfsdev={sysfs},{where},rombar=0"


def devices(*options: str) -> list[str]:
    return [a for o in options for a in ("-device", o)]


def preflight_fix(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`qmpguard preflight --fix -- ARGV`, as a user runs it."""
    return subprocess.run(
        [*QMPGUARD, "preflight", "--fix", "--", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def preflight_json(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [*QMPGUARD, "preflight", "--format", "json", "--", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    doc: dict[str, Any] = json.loads(done.stdout)
    (target,) = doc["targets"]
    return target


def hostdev(doc: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in doc["devices"] if d["id"] == "hostdev0")


def codes(doc: dict[str, Any]) -> list[str]:
    return sorted(
        f["code"] for f in doc["findings"] if f["device"] == "/machine/peripheral/hostdev0"
    )


async def _greeted(proc: QemuProcess) -> None:
    client = QMPClient("ready")
    await client.connect(str(proc.qmp_path))
    await client.execute("query-status")
    await client.disconnect()


def guest_done(proc: QemuProcess, console: Path, timeout: float = 60) -> None:
    """QMP greeted (every device realized), then the guest printed that the IOMMU's
    command queue drained (bounded poll on its console, not a fixed wait)."""
    asyncio.run(_greeted(proc))
    deadline = time.monotonic() + timeout
    while not (console.exists() and GUEST_MARKER in console.read_text()):
        assert proc.popen is not None and proc.popen.poll() is None, proc.stderr_text()
        assert time.monotonic() < deadline, "the AMD-Vi guest did not finish"
        time.sleep(0.02)


def check(proc: QemuProcess) -> dict[str, Any]:
    live = asyncio.run(inspect_target(parse_target(str(proc.qmp_path))))
    assert live.ok, live.error and live.error.message
    return target_json(live)


def mapped(dma_log: Path) -> list[int]:
    return list(mapped_bytes(dma_log).values())


@PINNED
def test_amd_fix_binds_the_device_on_the_dma_log(
    qemu_vm: VmFactory, tmp_path: Path, built: Built
) -> None:
    binary = binary_11(QEMU_MATRIX, since=(10, 1))

    def vm_args(name: str, order: list[str]) -> list[str]:
        return [
            "-M",
            "q35",
            "-object",
            f"memory-backend-memfd,id=mem,size={RAM_MIB}M",
            "-machine",
            "memory-backend=mem",
            "-m",
            str(RAM_MIB),
            "-kernel",
            str(built.guest),
            "-debugcon",
            f"file:{tmp_path / name}.debugcon.txt",
            *devices(*order),
        ]

    before = vm_args("before", [vfio(tmp_path, "bus=pcie.0,addr=9.0"), AMD, NIC])
    # as the VM runs it: the fixture adds -nodefaults (and monitors, which do not matter)
    argv = [binary, "-nodefaults", *before]
    pre = preflight_json(argv)
    assert pre["qemu"]["version"].startswith("11.1"), pre["qemu"]
    assert hostdev(pre)["verdict"] == "misbound" and codes(pre) == ["QG001"]

    # ground truth of the misorder: all guest RAM stays mapped once the guest translates
    log = tmp_path / "before.dma.log"
    proc = qemu_vm(*before, env=emulation_env(built.so, log), name="before", binary=binary)
    guest_done(proc, tmp_path / "before.debugcon.txt")
    assert mapped(log) and all(v >= RAM for v in mapped(log)), mapped_bytes(log)
    proc.stop()

    done = preflight_fix(argv)
    assert done.returncode == 0, done.stderr
    assert "move -device amd-iommu" in done.stderr, done.stderr
    fixed = shlex.split(done.stdout)
    assert fixed[:2] == [binary, "-nodefaults"], fixed
    after = [a.replace("before.debugcon", "after.debugcon") for a in fixed[2:]]
    viommu_at, vfio_at = after.index(AMD), next(i for i, a in enumerate(after) if "hostdev0" in a)
    assert viommu_at < vfio_at  # and nothing else changed:
    assert sorted(after) == sorted(a.replace("before.debugcon", "after.debugcon") for a in before)

    log = tmp_path / "after.dma.log"
    proc = qemu_vm(*after, env=emulation_env(built.so, log), name="after", binary=binary)
    guest_done(proc, tmp_path / "after.debugcon.txt")
    assert mapped(log) and all(v == 0 for v in mapped(log)), mapped_bytes(log)
    doc = check(proc)
    assert hostdev(doc)["verdict"] == "ok", hostdev(doc)["order"]
    assert codes(doc) == []
    assert hostdev(preflight_json([binary, "-nodefaults", *after]))["verdict"] == "ok"


@PINNED
def test_arm_smmuv3_refused_order_and_no_reorder_fix(
    qemu_vm: VmFactory, tmp_path: Path, built: Built
) -> None:
    binary = binary_11(QEMU_ARM_MATRIX, since=(10, 2))
    machine = ["-S", "-M", "virt", "-m", str(RAM_MIB)]
    misordered = [*machine, *devices(ROOT_PORT, vfio(tmp_path, "bus=rp1"), SMMU)]
    argv = [binary, "-nodefaults", *misordered]

    pre = preflight_json(argv)
    dev = hostdev(pre)
    assert dev["verdict"] == "misbound"
    assert "refused-order" in [e["source"] for e in dev["order"]["evidence"]], dev["order"]
    qg001 = next(f for f in pre["findings"] if f["code"] == "QG001")
    assert "virtio-iommu" in qg001["message"].split("Fix:", 1)[1]

    done = preflight_fix(argv)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert "no corrected command line" in done.stderr and "virtio-iommu" in done.stderr

    # ground truth: the misordered VM maps all guest RAM ...
    log = tmp_path / "arm.dma.log"
    proc = qemu_vm(*misordered, env=emulation_env(built.so, log), name="arm", binary=binary)
    asyncio.run(_greeted(proc))
    assert mapped(log) and all(v >= RAM for v in mapped(log)), mapped_bytes(log)
    proc.stop()
    # ... and the reorder a fix would have offered makes QEMU refuse to start
    reordered = [*machine, *devices(SMMU, ROOT_PORT, vfio(tmp_path, "bus=rp1"))]
    proc = qemu_vm(
        *reordered, env=emulation_env(built.so, log), name="arm-reordered", binary=binary
    )
    assert proc.popen is not None and proc.popen.wait(timeout=60) != 0
    assert MAP_NOTIFIER_REFUSAL in proc.stderr_text(), proc.stderr_text()
