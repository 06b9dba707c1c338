"""When bus reads are batched into one qom-list-get, and how its reply is recorded."""

from __future__ import annotations

from typing import Any

import pytest

from qmpguard.analysis.reads import LIST_GET, batched, record_list_get
from qmpguard.analysis.shape import ReplyShapeError
from qmpguard.snapshot import Snapshot

BUS = "/machine/peripheral/ppb/ppb"
READS: list[tuple[str, dict[str, Any]]] = [
    ("qom-list", {"path": BUS}),
    ("qom-list", {"path": "/machine"}),
    ("qom-get", {"path": "/machine/q35/pcie.0", "property": "child[3]"}),
]


def snapshot(commands: list[str] | None) -> Snapshot:
    snap = Snapshot("vm", "qmp-unix", "2026-11-30T00:00:00+00:00")
    if commands is not None:
        snap.record("query-commands", None, {"return": [{"name": c} for c in commands]})
    return snap


def test_only_bus_listings_are_batched_and_never_the_machine() -> None:
    out = batched(snapshot(["qom-get", LIST_GET]), READS)
    assert out == [(LIST_GET, {"paths": [BUS]}), READS[1], READS[2]]


@pytest.mark.parametrize("commands", [None, ["qom-get", "qom-list"]])
def test_no_batch_without_the_command(commands: list[str] | None) -> None:
    assert batched(snapshot(commands), READS) == READS


def test_no_batch_after_a_failed_one() -> None:
    snap = snapshot([LIST_GET])
    snap.record(LIST_GET, {"paths": [BUS]}, {"error": {"class": "DeviceNotFound", "desc": "x"}})
    assert batched(snap, READS) == READS


def test_reply_becomes_the_listing_and_the_link_values() -> None:
    snap = snapshot([LIST_GET])
    props = [
        {"name": "type", "type": "string", "value": "PCI"},
        {"name": "child[0]", "type": "link<e1000>", "value": "/machine/peripheral-anon/device[2]"},
        {"name": "child[1]", "type": "link<e1000>"},  # getter failed: read it on its own
    ]
    record_list_get(snap, [BUS], [{"properties": props}])
    assert snap.get("qom-list", path=BUS) == [{"name": p["name"], "type": p["type"]} for p in props]
    assert snap.get("qom-get", path=BUS, property="child[0]") == props[1]["value"]
    assert not snap.has("qom-get", path=BUS, property="child[1]")
    assert not snap.has("qom-get", path=BUS, property="type")


@pytest.mark.parametrize("reply", [[], [{"properties": [{"name": "x"}]}], {"properties": []}])
def test_reply_of_another_shape_is_refused(reply: Any) -> None:
    with pytest.raises(ReplyShapeError):
        record_list_get(snapshot([LIST_GET]), [BUS], reply)
