"""The one read-only allow-list: every command any transport sends passes `check_command`.

QMP is a fully privileged interface, so qmpguard refuses anything not listed here
before a single byte is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

#: Exact QMP commands allowed besides the `query-*` family. Deliberately absent:
#: `qom-list-types`, `qom-list-properties`, `device-list-properties`: they load every QOM
#: module into QEMU, which aborts a QEMU whose module directory no longer matches its
#: build (seen: 10.0.2 with another version's modules). Reading must never risk the VM.
ALLOWED_COMMANDS: frozenset[str] = frozenset(
    {"qmp_capabilities", "qom-list", "qom-get", "qom-list-get"}
)

#: HMP lines allowed through `human-monitor-command`, matched whole.
ALLOWED_HMP: tuple[re.Pattern[str], ...] = (
    re.compile(r"info mtree( -f| -o -D| -f -o -D)?"),
    re.compile(r"info qtree"),
    re.compile(r"info pci"),
    re.compile(r"info version"),
)

_QUERY_NAME = re.compile(r"query-[a-z0-9-]+")

#: qom-get reads that crash QEMU although they only read. The ARM `virt` machine's `iommu`
#: getter asserts unless the value is none or smmuv3: with a virtio-iommu-pci it aborts
#: the VM (seen on 7.2 and 11.1). The machine's own SMMU is recognised by where it lives.
FORBIDDEN_QOM_GETS: frozenset[tuple[str, str]] = frozenset({("/machine", "iommu")})

#: Objects `qom-list-get` must never be given: it calls the getter of *every* property of
#: each path (qom/qom-qmp-cmds.c), so a path with a forbidden getter aborts QEMU exactly
#: like the qom-get would (seen: `qom-list-get ["/machine"]` on 11.1 aarch64 virt with a
#: virtio-iommu-pci ends QEMU in virt_get_iommu's g_assert_not_reached).
FORBIDDEN_LIST_GET_PATHS: frozenset[str] = frozenset(path for path, _ in FORBIDDEN_QOM_GETS)


class ForbiddenCommand(Exception):
    """A command outside the allow-list was about to be sent."""


def check_command(command: str, arguments: Mapping[str, Any] | None = None) -> None:
    """Raise ForbiddenCommand unless `command` with `arguments` is read-only.

    A command is allowed by name (ALLOWED_COMMANDS, `query-*`, or an allowed HMP line);
    the commands that take a QOM path or an HMP line also have their arguments checked
    (ARGUMENT_CHECKS), since a read-only name can still reach a getter that aborts QEMU.
    """
    if not isinstance(command, str):
        raise ForbiddenCommand(f"command name is not a string: {command!r}")
    check_arguments = ARGUMENT_CHECKS.get(command)
    if check_arguments is not None:
        check_arguments(arguments or {})
    if command in ALLOWED_COMMANDS or command == "human-monitor-command":
        return
    if _QUERY_NAME.fullmatch(command):
        return
    raise ForbiddenCommand(f"QMP command not allowed (qmpguard is read-only): {command!r}")


def _check_hmp(arguments: Mapping[str, Any]) -> None:
    """Exactly one HMP line, and one of ALLOWED_HMP."""
    line = arguments.get("command-line")
    if not isinstance(line, str) or not any(p.fullmatch(line) for p in ALLOWED_HMP):
        raise ForbiddenCommand(f"HMP line not allowed: {line!r}")
    if set(arguments) - {"command-line"}:
        raise ForbiddenCommand("human-monitor-command with extra arguments")


def _check_qom_list(arguments: Mapping[str, Any]) -> None:
    _qom_path(arguments.get("path"))


def _check_qom_get(arguments: Mapping[str, Any]) -> None:
    """An absolute path, and not a property whose getter aborts QEMU."""
    path = _qom_path(arguments.get("path"))
    if (path, arguments.get("property")) in FORBIDDEN_QOM_GETS:
        raise ForbiddenCommand(f"qom-get known to abort QEMU: {dict(arguments)!r}")


def _qom_path(path: object) -> str:
    """`path` as QEMU resolves it, for absolute paths; ForbiddenCommand for anything else.

    Only absolute paths are allowed, so a forbidden object cannot be reached under another
    spelling: QEMU resolves a relative path by searching the whole tree ("machine" is
    /machine) and skips empty components ("/machine/" is /machine).
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ForbiddenCommand(f"QOM path is not absolute: {path!r}")
    return "/" + "/".join(part for part in path.split("/") if part)


def _check_list_get(arguments: Mapping[str, Any]) -> None:
    """qom-list-get reads every property of each path: refuse the objects with a getter
    known to abort QEMU, and any argument besides a non-empty list of absolute paths."""
    paths = arguments.get("paths")
    if set(arguments) != {"paths"} or not isinstance(paths, list) or not paths:
        raise ForbiddenCommand(f"qom-list-get needs exactly a list of paths: {dict(arguments)!r}")
    for path in paths:
        if _qom_path(path) in FORBIDDEN_LIST_GET_PATHS:
            raise ForbiddenCommand(f"qom-list-get of {path!r} would call a getter that aborts QEMU")


#: Per-command argument checks, run before the command name is judged.
ARGUMENT_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "human-monitor-command": _check_hmp,
    "qom-list": _check_qom_list,
    "qom-get": _check_qom_get,
    "qom-list-get": _check_list_get,
}
