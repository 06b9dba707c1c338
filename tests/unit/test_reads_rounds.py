"""The collector's rounds, replayed from recorded snapshots: each read is sent once.

The placement asks for an unread bus listing once per device it cannot place yet; a
round that repeated it would cost QEMU the same listing several times (seen: 4-6x
`qom-list /machine/q35/pcie.0` in the first round of the recorded VMs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmpguard.analysis.reads import missing_reads
from qmpguard.snapshot import Snapshot, load_snapshot, reply_key

DATA = Path(__file__).resolve().parent.parent / "data"
NOT_RECORDED = {"error": {"class": "CommandNotFound", "desc": "not in the recording"}}
RECORDED = sorted(p for p in DATA.glob("*.json") if not p.name.endswith(".truth.json"))


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_every_round_sends_each_read_once(path: Path) -> None:
    recorded = load_snapshot(path)
    replay = Snapshot(target=recorded.target, transport=recorded.transport, collected_at="")
    replay.cmdline = recorded.cmdline
    rounds = 0
    while reads := missing_reads(replay, batch=False):
        keys = [json.dumps(read, sort_keys=True) for read in reads]
        assert len(keys) == len(set(keys)), f"round {rounds}: {len(keys) - len(set(keys))} repeats"
        for cmd, args in reads:
            # Reads added after the recording was made answer as an older QEMU would.
            replay.record(cmd, args, recorded.replies.get(reply_key(cmd, args), NOT_RECORDED))
        rounds += 1
        assert rounds < 10
    assert rounds >= 2  # the base reads, then at least one round the topology asked for
