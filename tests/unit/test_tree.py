"""The topology tree on recorded snapshots: nesting, aliasing groups, bypass, findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpguard.inspection import analyse_snapshot
from qmpguard.report.document import target_findings
from qmpguard.report.tree import render_tree_target, tree_rows
from qmpguard.snapshot import load_snapshot

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(params=sorted(DATA.glob("q35-intel-topology-*.json")), ids=lambda p: p.stem)
def result(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    snap = load_snapshot(request.param)
    return analyse_snapshot(snap.target, snap)


def test_rows_nest_and_group(result) -> None:  # type: ignore[no-untyped-def]
    assert result.analysis is not None
    all_rows = tree_rows(result.analysis, target_findings(result))
    bus = {r.label: r for r in all_rows if r.kind == "bus"}
    dev = {r.label: r for r in all_rows if r.kind == "device"}
    assert bus["pcie.0"].depth == 0
    assert dev["rp1"].depth == 1 and bus["rp1"].depth == 2 and dev["nic1"].depth == 3
    assert dev["deep"].depth == 5  # pcie.0 > ppb > [ppb] > pb > [pb] > deep
    assert {dev[n].space for n in ("legacy1", "legacy2", "pb", "deep")} == {"A"}
    assert dev["nic1"].space is None
    assert "bypasses the vIOMMU" in bus["pxb"].detail
    assert "conventional PCI" in bus["ppb"].detail
    assert dev["vnbypass"].memory and not dev["vnon"].memory
    assert [f.code for f in dev["vnoff"].findings] == ["QG005"]


def test_plain_text_without_colour(result) -> None:  # type: ignore[no-untyped-def]
    text = render_tree_target(result, colour=False)
    assert "\033[" not in text
    assert "[shared space A]" in text and "! QG005 warning" in text
    coloured = render_tree_target(result, colour=True)
    assert "\033[" in coloured
