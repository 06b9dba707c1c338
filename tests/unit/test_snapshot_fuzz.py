"""Fuzz the snapshot loader and the analysis with corrupted snapshots (hypothesis).

A corrupted snapshot must give a clear one-line error, never an exception escaping and
never a verdict built from a reply of the wrong shape.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpguard.inspection import analyse_snapshot
from qmpguard.snapshot import SnapshotError, snapshot_from_json

DATA = Path(__file__).resolve().parents[1] / "data"
BASE = json.loads(sorted(DATA.glob("q35-intel-topology-*.json"))[0].read_text())

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:40]):
            out += paths(v, (*prefix, i))
    return out


ALL_PATHS = [p for p in paths(BASE) if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), junk), min_size=1, max_size=4))
def test_corrupted_snapshot_never_escapes(mutations: list[tuple[tuple[Any, ...], Any]]) -> None:
    doc = copy.deepcopy(BASE)
    for path, value in mutations:
        node = doc
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        snap = snapshot_from_json(doc)
    except SnapshotError as exc:
        assert "\n" not in str(exc)
        return
    result = analyse_snapshot("fuzz", snap)
    if result.error is not None:
        assert result.error.reason == "bad-reply"
        assert "\n" not in result.error.message
