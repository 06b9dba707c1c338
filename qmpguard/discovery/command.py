"""`qmpguard discover`: list every QEMU process and how each would be inspected."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from qmpguard.discovery.probe import PROBE_TIMEOUT_S
from qmpguard.discovery.render import discover_json, render_table
from qmpguard.discovery.scan import discover


def add_parser(sub: Any, timeout_type: Any = float) -> argparse.ArgumentParser:
    """Add the `discover` subcommand to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "discover",
        help="find QEMU processes and say how each would be inspected",
        description="Find QEMU processes from /proc (by executable), read their monitors "
        "from the command line, reach sockets in other mount namespaces through "
        "/proc/PID/root, and say how each VM would be inspected: its own QMP monitor, "
        "its libvirt daemon, or why not (busy, none, unreachable). Sends no QMP command.",
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="do not connect at all: decide from /proc alone (a held monitor is then "
        "seen only through the socket table)",
    )
    p.add_argument(
        "--probe-timeout",
        type=timeout_type,
        default=PROBE_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for a monitor's QMP greeting (default {PROBE_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--pid",
        type=int,
        action="append",
        metavar="PID",
        help="look at this process only (repeatable)",
    )
    p.add_argument("--log-format", choices=["auto", "console", "json"], default="auto")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace) -> str:
    """The report text for parsed `args`."""
    vms = asyncio.run(
        discover(probe_monitors=not args.no_probe, timeout=args.probe_timeout, only=args.pid)
    )
    if args.format == "json":
        return json.dumps(discover_json(vms), indent=2) + "\n"
    return render_table(vms)
