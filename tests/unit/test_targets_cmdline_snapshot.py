"""Target strings, QEMU command lines, snapshot loading and mtree parsing (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmpguard.analysis.as_order import observed_sequence
from qmpguard.analysis.cmdline import parse_cmdline, split_keyval
from qmpguard.analysis.mtree import parse_mtree_f
from qmpguard.analysis.viommu_models import MODELS
from qmpguard.snapshot import SnapshotError, load_snapshot
from qmpguard.targets import Target, TargetError, parse_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/run/qemu/vm1.qmp", Target("unix", "/run/qemu/vm1.qmp")),
        ("unix:/tmp/x", Target("unix", "/tmp/x")),
        ("tcp:127.0.0.1:4444", Target("tcp", "127.0.0.1:4444")),
        ("tcp:[::1]:4444", Target("tcp", "[::1]:4444")),
        ("libvirt:vm1", Target("libvirt", "vm1", "qemu:///system")),
        ("libvirt:vm1@qemu:///session", Target("libvirt", "vm1", "qemu:///session")),
    ],
)
def test_parse_target(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["", "tcp:host", "tcp:host:99999", "unix:", "vm1", "libvirt:"])
def test_bad_targets(text: str) -> None:
    with pytest.raises(TargetError):
        parse_target(text)


def test_keyval_escapes_commas() -> None:
    assert split_keyval("vfio-pci,sysfsdev=/a,,b,id=x") == ["vfio-pci", "sysfsdev=/a,b", "id=x"]


def test_cmdline_realize_order_puts_json_last() -> None:
    cli = parse_cmdline(
        [
            "qemu-system-x86_64",
            "-machine",
            "q35,iommu=smmuv3",
            "-device",
            '{"driver":"vfio-pci","id":"hostdev0"}',
            "--device",
            "intel-iommu,id=iommu0",
            "-device",
            "e1000e",
        ]
    )
    ranks = {(d.driver, d.id): (d.argument, d.realize_rank) for d in cli.devices}
    assert ranks == {
        ("vfio-pci", "hostdev0"): (4, 2),
        ("intel-iommu", "iommu0"): (6, 0),
        ("e1000e", None): (8, 1),
    }
    assert cli.machine_opts == {"type": "q35", "iommu": "smmuv3"}
    assert cli.complete


def test_mtree_parsing_and_vtd_spaces() -> None:
    text = (
        'FlatView #0\n AS "memory", root: system\n Root memory region: system\n\n'
        'FlatView #3\n AS "vtd-root", root: vtd-00.0\n AS "vtd-root", root: vtd-09.0\n'
        ' AS "vtd-root", root: vtd-1f.2\n'
    )
    entries = parse_mtree_f(text)
    assert entries is not None and len(entries) == 4
    naming = MODELS["intel"].naming
    assert naming is not None
    seq = observed_sequence(entries, naming)
    assert [s.devfn for s in seq.spaces] == [0, 0x48, 0xFA]
    assert not seq.global_rank
    assert parse_mtree_f("garbage") is None


def test_virtio_iommu_spaces_rank_by_counter() -> None:
    text = (
        'FlatView #1\n AS "virtio-iommu-device", root: virtio-iommu-memory-region-4-72\n'
        ' AS "virtio-iommu-device", root: virtio-iommu-memory-region-0-16\n'
    )
    entries = parse_mtree_f(text)
    assert entries is not None
    naming = MODELS["virtio"].naming
    assert naming is not None
    seq = observed_sequence(entries, naming)
    assert [(s.rank, s.devfn) for s in seq.spaces] == [(0, 16), (4, 72)]
    assert seq.global_rank


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b"[]", "top level is not an object"),
        (json.dumps({"schema": "other"}).encode(), "schema"),
        (
            json.dumps(
                {
                    "schema": "qmpguard.snapshot/1",
                    "target": "t",
                    "transport": "x",
                    "collected_at": "now",
                    "qemu": {},
                    "process": {},
                    "replies": [1],
                }
            ).encode(),
            "reply 0 is not an object",
        ),
        (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    ],
)
def test_corrupted_snapshots_give_one_line_errors(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)
