"""Shared fixtures: real QEMU processes, each stopped at teardown."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmpguard.demo.qemu_process import QemuProcess, qemu_binary

QEMU_X86 = qemu_binary("qemu-system-x86_64")
QEMU_ARM = "qemu-system-aarch64"

requires_qemu = pytest.mark.skipif(
    shutil.which(QEMU_X86) is None and not Path(QEMU_X86).exists(),
    reason=f"{QEMU_X86} not installed",
)

VmFactory = Callable[..., QemuProcess]


@pytest.fixture
def qemu_vm(tmp_path: Path) -> Iterator[VmFactory]:
    """Start real QEMU VMs: `qemu_vm(*args, name="vm", binary=None, env=None,
    setup_monitor=False)`.

    Every VM listens on `<tmp>/<name>.qmp` (and `<tmp>/<name>.setup.qmp` with
    setup_monitor, for the test's own commands) before QEMU starts; stopped at teardown.
    """
    started: list[QemuProcess] = []

    def start(*args: str, name: str = "vm", binary: str | None = None,
              env: dict[str, str] | None = None, setup_monitor: bool = False) -> QemuProcess:
        vm = QemuProcess(
            args=list(args), qmp_path=tmp_path / f"{name}.qmp",
            binary=binary or QEMU_X86, env=env, stderr_path=tmp_path / f"{name}.stderr",
            setup_qmp_path=tmp_path / f"{name}.setup.qmp" if setup_monitor else None,
        )
        started.append(vm)
        return vm.start()

    try:
        yield start
    finally:
        for vm in started:
            vm.stop()
