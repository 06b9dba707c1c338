"""The one guarded path every command takes, whatever the transport (QMP socket, libvirt).

Allow-list, command count, per-command timeout and error mapping live here once; a
transport only says how to send a command and what its failures mean (`_send`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qmpguard.defaults import COMMAND_TIMEOUT_S, GREETING_TIMEOUT_S
from qmpguard.errors import ErrorReason, InspectionError
from qmpguard.qmp.allowlist import check_command


@dataclass(frozen=True)
class Timeouts:
    """Per-session time limits, in seconds."""

    greeting: float = GREETING_TIMEOUT_S
    command: float = COMMAND_TIMEOUT_S


class GuardedSession:
    """Mixin for session dataclasses with `timeouts` and `commands_sent` fields."""

    timeouts: Timeouts
    commands_sent: int
    #: How the transport is named in a timeout message (" through libvirt").
    via: str = ""

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Send one allow-listed command; return its `return` value.

        ForbiddenCommand before a byte is written if the allow-list refuses it;
        CommandFailed for QEMU's error reply; InspectionError when the session fails.
        """
        check_command(command, arguments)
        self.commands_sent += 1
        try:
            async with asyncio.timeout(self.timeouts.command):
                return await self._send(command, dict(arguments) if arguments else None)
        except TimeoutError:
            raise InspectionError(
                ErrorReason.TIMEOUT,
                f"{command} got no reply{self.via} within {self.timeouts.command:g}s",
            ) from None

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        raise NotImplementedError
