"""`qmpguard daemon`: argument parsing hook and entry point (filled in by the daemon work)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the `daemon` subcommand."""
    sub.add_parser("daemon", help="watch every VM on this host and serve results over HTTP")


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the exit code."""
    raise NotImplementedError
