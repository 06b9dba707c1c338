"""The preflight contract on every live VM the suite starts (issue 16).

`qemu_vm` calls `compare_with_preflight` for each VM it started, before stopping it, so a
new scenario is checked both ways without touching any test.
"""

from __future__ import annotations

from qmpguard.demo.qemu_process import QemuProcess


def compare_with_preflight(vm: QemuProcess) -> None:
    """Hook point: preflight of the VM's argv against `check` of the running VM."""
