"""Typed reads of snapshot replies: a reply of the wrong shape is a clear error, never a guess."""

from __future__ import annotations

from typing import Any

from qmpguard.snapshot import Snapshot


class ReplyShapeError(ValueError):
    """A QMP reply in the snapshot does not have the shape QEMU gives it."""


def qom_list(snap: Snapshot, path: str) -> list[tuple[str, str]]:
    """(name, type) pairs of a recorded qom-list; [] if the path was not read or failed."""
    reply = snap.get_or(None, "qom-list", path=path)
    if reply is None:
        return []
    if not isinstance(reply, list):
        raise ReplyShapeError(f"qom-list {path}: reply is not a list")
    out = []
    for item in reply:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("type"), str)
        ):
            raise ReplyShapeError(f"qom-list {path}: entry without name/type: {item!r:.80}")
        out.append((item["name"], item["type"]))
    return out


def qom_get(snap: Snapshot, path: str, prop: str, kind: type, default: Any = None) -> Any:
    """A recorded qom-get value of type `kind`, or `default` when absent or failed."""
    value = snap.get_or(None, "qom-get", path=path, property=prop)
    if value is None:
        return default
    if kind is int and isinstance(value, bool):
        raise ReplyShapeError(f"qom-get {path} {prop}: expected int, got bool")
    if not isinstance(value, kind):
        raise ReplyShapeError(
            f"qom-get {path} {prop}: expected {kind.__name__}, got {type(value).__name__}"
        )
    return value
