"""Every default limit, defined once: the CLI, the daemon's settings and the sessions
read them from here."""

from __future__ import annotations

GREETING_TIMEOUT_S = 2.0  # QMP greeting: a busy monitor never greets
COMMAND_TIMEOUT_S = 5.0  # one command's reply
TARGET_TIMEOUT_S = 20.0  # one whole inspection
INSPECTIONS_AT_ONCE = 16  # default concurrency
