"""Text that is safe to print on a terminal: one line, no control sequences."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Escape control characters (an id may hold a newline or an escape sequence).

    QEMU accepts almost any string as a JSON device id; printed raw it would break the
    one-line-per-device layout or drive the terminal.
    """
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)
