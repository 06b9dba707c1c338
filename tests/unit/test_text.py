"""Ids are printed escaped: one line per device, no terminal control sequences."""

from __future__ import annotations

from qmpguard.report.text import printable


def test_newline_and_escape_are_escaped() -> None:
    assert printable("gpu\n0") == "gpu\\n0"
    assert printable("a\x1b[31mred") == "a\\x1b[31mred"


def test_plain_text_and_unicode_unchanged() -> None:
    assert printable('nvidia-a100 "gpu" é') == 'nvidia-a100 "gpu" é'
