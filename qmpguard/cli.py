"""Command line: argument parsing and exit codes only; the work happens elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from qmpguard import __version__
from qmpguard.daemon import command as daemon_command
from qmpguard.daemon.settings import CONCURRENCY, TIMEOUT, Bounds, number_problem
from qmpguard.defaults import (
    COMMAND_TIMEOUT_S,
    GREETING_TIMEOUT_S,
    INSPECTIONS_AT_ONCE,
    TARGET_TIMEOUT_S,
)
from qmpguard.discovery import command as discover_command
from qmpguard.errors import ErrorReason, InspectionError
from qmpguard.inspection import analyse_snapshot, inspect_many, snapshot_target
from qmpguard.logs import configure_logging
from qmpguard.preflight_command import add_parsers as add_preflight_parsers
from qmpguard.preflight_command import run_exec, run_preflight
from qmpguard.qmp.guard import Timeouts
from qmpguard.qmp.libvirt import running_domains
from qmpguard.report.document import EXIT_UNKNOWN, exit_code, report_json
from qmpguard.report.exposition import render_prometheus, write_text_atomically
from qmpguard.report.nagios import render_nagios
from qmpguard.report.table import render_report
from qmpguard.report.tree import render_tree
from qmpguard.result import TargetResult
from qmpguard.snapshot import (
    SnapshotError,
    UnsupportedSnapshot,
    load_snapshot,
    write_json_atomically,
)
from qmpguard.targets import Target, TargetError, parse_target

EPILOG = """\
exit codes (monitoring-plugin convention):
  0  OK        nothing above info
  1  WARNING   the worst finding is a warning
  2  CRITICAL  a critical finding (e.g. QG001: vfio device bypasses the vIOMMU)
  3  UNKNOWN   some target could not be inspected and nothing is critical;
               also usage errors and unreadable input

targets: /path/to/qmp.sock, unix:PATH, tcp:HOST:PORT, libvirt:DOMAIN[@URI]
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 3 (UNKNOWN), not argparse's 2 (which would read as CRITICAL)."""

    def error(self, message: str) -> NoReturn:
        print(f"qmpguard: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_UNKNOWN)


def bounded(bounds: Bounds) -> Callable[[str], float | int]:
    """An argparse type: a finite number within `bounds` (argparse names the option)."""

    def parse(text: str) -> float | int:
        try:
            value: float | int = int(text) if bounds.integer else float(text)
        except ValueError:
            kind = "an integer" if bounds.integer else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text[:40]!r}") from None
        problem = number_problem(value, bounds)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "console", "json"], default="auto")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    p.add_argument(
        "--greeting-timeout",
        type=bounded(TIMEOUT),
        default=GREETING_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the QMP greeting (default 2)",
    )
    p.add_argument(
        "--command-timeout",
        type=bounded(TIMEOUT),
        default=COMMAND_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for each reply (default 5)",
    )
    p.add_argument(
        "--timeout",
        type=bounded(TIMEOUT),
        default=TARGET_TIMEOUT_S,
        metavar="S",
        help="seconds for one whole target (default 20)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qmpguard",
        description=__doc__
        and "qmpguard: find vfio devices "
        "whose DMA bypasses the guest's vIOMMU (read-only QMP inspection)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qmpguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = sub.add_parser(
        "check",
        help="inspect VMs and report",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("targets", nargs="*", metavar="TARGET")
    check.add_argument(
        "--snapshot",
        action="append",
        default=[],
        metavar="FILE",
        help="analyse a saved snapshot instead of a live VM (repeatable)",
    )
    check.add_argument(
        "--format",
        choices=list(RENDERERS),
        default="table",
        help="table (default), json (qmpguard.report/1), tree (the PCI "
        "topology with DMA spaces; colour on a TTY unless NO_COLOR is set), nagios "
        "(status line and perfdata first: a Nagios/Icinga check) or prometheus (text "
        "exposition with the daemon's metric names, for node_exporter's textfile collector)",
    )
    check.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the report to FILE atomically (write, then rename) instead of stdout",
    )
    check.add_argument(
        "--concurrency",
        type=bounded(CONCURRENCY),
        default=INSPECTIONS_AT_ONCE,
        metavar="N",
        help="targets inspected at once, 1 to 1024 (default 16)",
    )
    check.add_argument(
        "--libvirt-all", action="store_true", help="also check every running libvirt domain"
    )
    check.add_argument(
        "--libvirt-uri",
        default="qemu:///system",
        metavar="URI",
        help="libvirt connection for --libvirt-all (default qemu:///system)",
    )
    _common(check)

    snap = sub.add_parser("snapshot", help="save the raw facts of one VM as JSON")
    snap.add_argument("target", metavar="TARGET")
    snap.add_argument("-o", "--output", required=True, metavar="FILE")
    _common(snap)

    daemon_command.add_parser(sub)
    discover_command.add_parser(sub, bounded(TIMEOUT))
    add_preflight_parsers(sub)

    demo = sub.add_parser("demo", help="start demo VMs with emulated vfio-pci and check them")
    demo.add_argument("--format", choices=["table", "json"], default="table")
    demo.add_argument("--keep", action="store_true", help="leave the VMs running until Ctrl-C")
    demo.add_argument("--log-format", choices=["auto", "console", "json"], default="auto")
    demo.add_argument("-v", "--verbose", action="store_true")
    return parser


def _timeouts(args: argparse.Namespace) -> Timeouts:
    return Timeouts(greeting=args.greeting_timeout, command=args.command_timeout)


#: `check --format`: how a list of results becomes the report text.
RENDERERS: dict[str, Callable[[list[TargetResult]], str]] = {
    "table": render_report,
    "json": lambda results: json.dumps(report_json(results), indent=2) + "\n",
    "tree": render_tree,
    "nagios": render_nagios,
    "prometheus": render_prometheus,
}


def _targets(args: argparse.Namespace) -> list[Target]:
    """The targets named on the command line plus, with --libvirt-all, every running
    domain (TargetError/InspectionError: a usage error, nothing is inspected)."""
    targets = [parse_target(t) for t in args.targets]
    if args.libvirt_all:
        targets += running_domains(args.libvirt_uri)
    return targets


def _snapshot_result(path: str) -> TargetResult:
    """One `--snapshot FILE` analysed; a file that cannot be read is an uninspected
    target in the report (not an abort), so the other targets are still reported."""
    try:
        snap = load_snapshot(path)
    except SnapshotError as exc:
        print(f"qmpguard: error: {exc}", file=sys.stderr)
        reason = (
            ErrorReason.UNSUPPORTED_SNAPSHOT
            if isinstance(exc, UnsupportedSnapshot)
            else ErrorReason.BAD_SNAPSHOT
        )
        return TargetResult(path, None, None, InspectionError(reason, str(exc)))
    return analyse_snapshot(snap.target, snap)


def cmd_check(args: argparse.Namespace) -> int:
    if not args.targets and not args.snapshot and not args.libvirt_all:
        print("qmpguard: error: give a TARGET, --snapshot FILE or --libvirt-all", file=sys.stderr)
        return EXIT_UNKNOWN
    try:
        targets = _targets(args)
    except (TargetError, InspectionError) as exc:
        print(f"qmpguard: error: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    results = [_snapshot_result(path) for path in args.snapshot]
    if targets:
        results += asyncio.run(
            inspect_many(targets, args.concurrency, _timeouts(args), args.timeout)
        )
    report = RENDERERS[args.format](results)
    verdict = exit_code(results)
    if args.output is not None:
        return verdict if write_report_file(args.output, report) else EXIT_UNKNOWN
    return verdict if write_stdout(report) else EXIT_UNKNOWN


def write_report_file(path: str, text: str) -> bool:
    """The report into `path`, atomically (a textfile collector never reads half a file);
    False (one line on stderr) if it cannot be written."""
    try:
        write_text_atomically(path, text)
    except OSError as exc:
        print(f"qmpguard: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


def _stdout_gone() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def write_stdout(text: str) -> bool:
    """Write the report and flush it. A reader that went away early (`| head`) is no
    error: True, the verdict stands. False (one line on stderr) if stdout is unwritable."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
    except OSError as exc:
        _stdout_gone()
        print(f"qmpguard: error: cannot write the report: {exc.strerror}", file=sys.stderr)
        return False
    return True


def cmd_snapshot(args: argparse.Namespace) -> int:
    try:
        target = parse_target(args.target)
        snap = asyncio.run(snapshot_target(target, _timeouts(args), args.timeout))
        write_json_atomically(args.output, snap.to_json())
    except (TargetError, InspectionError) as exc:
        print(f"qmpguard: error: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    except OSError as exc:
        print(f"qmpguard: error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return EXIT_UNKNOWN
    print(
        f"wrote {args.output} ({len(snap.replies)} replies, "
        f"{snap.timings.get('collect_s', 0):.3f}s)",
        file=sys.stderr,
    )
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    return 0 if write_stdout(discover_command.run(args)) else EXIT_UNKNOWN


def cmd_demo(args: argparse.Namespace) -> int:
    from qmpguard.demo.run import run_demo

    return run_demo(fmt=args.format, keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "daemon":
        return daemon_command.run(args)
    configure_logging(args.log_format, args.verbose)
    handlers = {
        "check": cmd_check,
        "snapshot": cmd_snapshot,
        "demo": cmd_demo,
        "discover": cmd_discover,
        "preflight": run_preflight,
        "exec": run_exec,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("qmpguard: interrupted", file=sys.stderr)
        return EXIT_UNKNOWN
    except BrokenPipeError:  # stdout closed early (`qmpguard demo | head`)
        _stdout_gone()
        return EXIT_UNKNOWN
