"""Record the snapshots in tests/data from real QEMU (the suite's own recorder).

    .venv/bin/python -m tests.record_snapshots [QEMU_BINARY]

Each scenario of tests/scenarios.py is started, snapshotted with qmpguard's own
collector, and written to tests/data/<scenario>-<qemu version>.json. The unit tests
analyse these files without QEMU.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from qmpguard.demo.qemu_process import QemuProcess, qemu_binary
from qmpguard.inspect import snapshot_target
from qmpguard.snapshot import write_json_atomically
from qmpguard.targets import parse_target
from tests import scenarios

DATA = Path(__file__).parent / "data"
RECORDED = {
    "q35-intel-topology": scenarios.Q35_INTEL_TOPOLOGY,
    "i440fx-pci-bridge": scenarios.I440FX_PCI_BRIDGE,
}


def main() -> None:
    binary = sys.argv[1] if len(sys.argv) > 1 else qemu_binary()
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in RECORDED.items():
            with QemuProcess(list(args), Path(tmp) / f"{name}.qmp", binary=binary) as vm:
                snap = asyncio.run(snapshot_target(parse_target(str(vm.qmp_path))))
            # Paths and pids of this machine are noise in a checked-in file.
            snap.target = f"unix:/run/qemu/{name}.qmp"
            snap.pid = 4242
            out = DATA / f"{name}-{snap.qemu_version}.json"
            write_json_atomically(out, snap.to_json())
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
