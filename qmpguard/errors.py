"""Why an inspection failed, as values: pure, so results and renderers need no I/O module.

ErrorReason's values are the `reason` label of `qmpguard_inspection_errors_total` and the
report's `error_reason`: the enum is that contract.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorReason(StrEnum):
    """Why a target could not be inspected. The values are the `reason` label of
    `qmpguard_inspection_errors_total` and the report's `error_reason`: a contract."""

    BUSY = "busy"  # no greeting in time, or the listen backlog stayed full
    TIMEOUT = "timeout"  # greeted, then a reply or the whole inspection took too long
    DISCONNECTED = "disconnected"  # the peer closed the connection
    NOT_QMP = "not-qmp"  # the peer answered, but not as a QMP server
    NOT_A_SOCKET = "not-a-socket"  # the path is a file, directory or device
    NO_SOCKET = "no-socket"  # nothing at the path
    PERMISSION_DENIED = "permission-denied"
    REFUSED = "refused"  # a socket nobody listens on (stale: QEMU gone)
    UNREACHABLE = "unreachable"  # name resolution, routing, TCP connect timeout
    UNSUPPORTED = "unsupported"  # the target kind needs what is not installed
    LIBVIRT_SOCKET = "libvirt-socket"  # a libvirt-held monitor: refused on purpose
    LIBVIRT = "libvirt"  # libvirt reported an error
    NO_DOMAIN = "no-domain"
    NOT_RUNNING = "not-running"
    BAD_REPLY = "bad-reply"  # a reply of the wrong shape
    BAD_SNAPSHOT = "bad-snapshot"  # a snapshot file that cannot be read or is corrupted
    UNSUPPORTED_SNAPSHOT = "unsupported-snapshot"  # a snapshot schema version unknown here
    INTERNAL = "internal"  # a qmpguard bug (e.g. a command outside the allow-list)


class InspectionError(Exception):
    """A target could not be inspected: an ErrorReason and a one-line message.

    A string reason must be one of ErrorReason's values (ValueError otherwise).
    """

    def __init__(self, reason: ErrorReason | str, message: str) -> None:
        super().__init__(message)
        self.reason = ErrorReason(reason)
        self.message = message


class CommandFailed(Exception):
    """QEMU answered a command with an error reply (kept in the snapshot, not fatal)."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc
