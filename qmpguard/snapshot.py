"""The snapshot: every QMP reply collected from one VM, as a versioned JSON document.

Analysis reads snapshots only, so a live check and `check --snapshot` give the same
verdicts, and a user's bug report can be replayed offline.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmpguard.files import MIB, InputFileError, read_text_bounded

SCHEMA = "qmpguard.snapshot/1"
SCHEMA_NAME = "qmpguard.snapshot/"
#: The recorded test snapshots are 45-70 KiB; replies are capped at 16 MiB each.
MAX_SNAPSHOT_BYTES = 64 * MIB


class SnapshotError(ValueError):
    """A snapshot file that cannot be used (unreadable, corrupted, wrong schema)."""


class UnsupportedSnapshot(SnapshotError):
    """A snapshot written by a newer (or unknown) qmpguard: a schema version this one lacks."""


class MissingReply(LookupError):
    """The snapshot holds no reply for a command the analysis asked about."""


class ErrorReply(Exception):
    """QEMU answered the command with an error."""


def reply_key(command: str, arguments: dict[str, Any] | None) -> str:
    """Canonical key of one command with its arguments."""
    return command + " " + json.dumps(arguments or {}, sort_keys=True, separators=(",", ":"))


@dataclass
class Snapshot:
    """Raw facts about one VM, enough to analyse it without QEMU."""

    target: str
    transport: str
    collected_at: str
    qemu_version: str | None = None
    pid: int | None = None
    cmdline: list[str] | None = None
    cmdline_error: str | None = None
    #: Files the command line refers to (-readconfig), as QEMU's process saw them.
    files: dict[str, str] = field(default_factory=dict)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float | int] = field(default_factory=dict)

    def record(self, command: str, arguments: dict[str, Any] | None, reply: dict[str, Any]) -> None:
        """Store a reply: {"return": value} or {"error": {"class": ..., "desc": ...}}."""
        self.replies[reply_key(command, arguments)] = reply

    def get(self, command: str, **arguments: Any) -> Any:
        """The `return` of a recorded command; MissingReply or ErrorReply otherwise."""
        reply = self.replies.get(reply_key(command, arguments))
        if reply is None:
            raise MissingReply(reply_key(command, arguments))
        if "error" in reply:
            err = reply["error"]
            raise ErrorReply(f"{err.get('class')}: {err.get('desc')}")
        return reply["return"]

    def has(self, command: str, **arguments: Any) -> bool:
        """True once a reply (value or error) to this command is recorded."""
        return reply_key(command, arguments) in self.replies

    def get_or(self, default: Any, command: str, **arguments: Any) -> Any:
        """Like get(), but `default` when missing or answered with an error."""
        try:
            return self.get(command, **arguments)
        except (MissingReply, ErrorReply):
            return default

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "target": self.target,
            "transport": self.transport,
            "collected_at": self.collected_at,
            "qemu": {"version": self.qemu_version},
            "process": {
                "pid": self.pid,
                "cmdline": self.cmdline,
                "error": self.cmdline_error,
                "files": self.files,
            },
            "timings": self.timings,
            "replies": [
                {"execute": k.split(" ", 1)[0], "arguments": json.loads(k.split(" ", 1)[1]), **v}
                for k, v in self.replies.items()
            ],
        }

    def without_cmdline(self) -> Snapshot:
        """A copy with the process command line removed (to test other evidence alone)."""
        stripped: dict[str, Any] = {"cmdline": None, "cmdline_error": "stripped", "files": {}}
        return Snapshot(**{**self.__dict__, **stripped})


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise SnapshotError(f"corrupted snapshot: {what}")


def snapshot_from_json(doc: Any) -> Snapshot:
    """Validate and load a snapshot document; SnapshotError with a one-line reason."""
    _expect(isinstance(doc, dict), "top level is not an object")
    schema = doc.get("schema")
    if isinstance(schema, str) and schema != SCHEMA and schema.startswith(SCHEMA_NAME):
        raise UnsupportedSnapshot(
            f"unsupported snapshot schema version {schema!r}: this qmpguard reads {SCHEMA!r}"
        )
    _expect(schema == SCHEMA, f"schema is {schema!r}, expected {SCHEMA!r}")
    for key in ("target", "transport", "collected_at"):
        _expect(isinstance(doc.get(key), str), f"'{key}' is not a string")
    qemu = doc.get("qemu")
    _expect(isinstance(qemu, dict), "'qemu' is not an object")
    version = qemu.get("version")
    _expect(version is None or isinstance(version, str), "'qemu.version' is not a string")
    proc = doc.get("process")
    _expect(isinstance(proc, dict), "'process' is not an object")
    pid, cmdline, perr = proc.get("pid"), proc.get("cmdline"), proc.get("error")
    _expect(pid is None or (isinstance(pid, int) and not isinstance(pid, bool)), "bad pid")
    _expect(
        cmdline is None or (isinstance(cmdline, list) and all(isinstance(a, str) for a in cmdline)),
        "'process.cmdline' is not a list of strings",
    )
    _expect(perr is None or isinstance(perr, str), "'process.error' is not a string")
    files = proc.get("files", {})
    _expect(
        isinstance(files, dict) and all(isinstance(v, str) for v in files.values()),
        "'process.files' is not an object of strings",
    )
    timings = doc.get("timings", {})
    _expect(isinstance(timings, dict), "'timings' is not an object")
    replies_in = doc.get("replies")
    _expect(isinstance(replies_in, list), "'replies' is not a list")
    snap = Snapshot(
        target=doc["target"],
        transport=doc["transport"],
        collected_at=doc["collected_at"],
        qemu_version=version,
        pid=pid,
        cmdline=cmdline,
        cmdline_error=perr,
        files=files,
        timings=timings,
    )
    for i, item in enumerate(replies_in):
        _expect(isinstance(item, dict), f"reply {i} is not an object")
        cmd, args = item.get("execute"), item.get("arguments", {})
        _expect(isinstance(cmd, str), f"reply {i} has no command name")
        _expect(isinstance(args, dict), f"reply {i} arguments are not an object")
        if "error" in item:
            err = item["error"]
            _expect(isinstance(err, dict), f"reply {i} error is not an object")
            snap.record(cmd, args, {"error": err})
        else:
            _expect("return" in item, f"reply {i} has neither 'return' nor 'error'")
            snap.record(cmd, args, {"return": item["return"]})
    return snap


def load_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot file (a regular file of at most 64 MiB); SnapshotError on any problem."""
    try:
        text = read_text_bounded(path, MAX_SNAPSHOT_BYTES, "snapshot")
    except InputFileError as exc:
        raise SnapshotError(str(exc)) from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise SnapshotError(f"snapshot {path} is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise SnapshotError(f"snapshot {path} is not valid JSON: {exc}") from None
    except ValueError as exc:  # an integer past Python's int max str digits (4300)
        raise SnapshotError(
            f"snapshot {path} is not usable JSON: {str(exc).split(':')[0]}"
        ) from None
    return snapshot_from_json(doc)


def write_json_atomically(path: str | Path, doc: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename: never a partial file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
