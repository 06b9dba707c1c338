"""`qmpguard preflight` and `qmpguard exec`: check a QEMU command line before the VM runs.

preflight reports like `check` (same codes, formats and exit codes) from a command line
alone: `-- QEMU ARGS...`, `--cmdline-file FILE` (NUL-separated as /proc/PID/cmdline, or
shell-quoted as `qm showcmd` prints it) or `--libvirt-xml FILE`. `--fix` prints the
corrected command line (or the libvirt / Proxmox VE change). `--gate` is for hooks:
exit 0 lets the VM start, 2 refuses it (reason and fix on stderr).

exec checks the command line the same way, then replaces itself with QEMU (os.execvp:
same PID, same environment and file descriptors), or refuses with exit 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from qmpguard.analysis.libvirt_xml import MAX_XML_BYTES, DomainXmlError, domain_argv
from qmpguard.analysis.preflight import (
    Preflight,
    QemuVersion,
    machine_binary,
    preflight,
    read_config_files,
)
from qmpguard.analysis.viommu_models import parse_version
from qmpguard.fix import fixes
from qmpguard.process import read_command_line_files, readconfig_paths
from qmpguard.report.document import EXIT_CRITICAL, EXIT_OK, EXIT_UNKNOWN, exit_code, report_json
from qmpguard.report.table import render_report
from qmpguard.report.tree import render_tree
from qmpguard.result import TargetResult

MAX_CMDLINE_BYTES = 1 << 20
EXIT_REFUSED = EXIT_CRITICAL

PREFLIGHT_EPILOG = """\
exit codes: as `check` (0 OK, 1 warning, 2 critical: a vfio device realized before its
vIOMMU, 3 unknown: the command line could not be read). With --fix: 0 a corrected
command line (or nothing to fix), 2 misbound and no automatic fix, 3 unreadable input.
With --gate: 0 start the VM, 2 refuse it.

examples:
  qmpguard preflight -- qemu-system-x86_64 -M q35 -device vfio-pci,host=01:00.0 ...
  qmpguard preflight --cmdline-file /proc/1234/cmdline
  qm showcmd 100 | qmpguard preflight --cmdline-file -
  virsh dumpxml vm1 | qmpguard preflight --libvirt-xml - --fix
"""


class InputError(Exception):
    """Input that cannot be read: one line for stderr."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["auto", "console", "json"], default="auto")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")


def _version_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qemu-version",
        metavar="X.Y",
        help="the version of the QEMU that will run the command line (default: ask the "
        "binary in argv[0] with --version; 'none' runs nothing, and rules that depend on "
        "the version then conclude nothing)",
    )


def add_parsers(sub: Any) -> None:
    """The `preflight` and `exec` subcommands."""
    p: argparse.ArgumentParser = sub.add_parser(
        "preflight",
        help="check a QEMU command line before the VM starts (no QEMU needed)",
        description="Apply check's rules to a QEMU command line: realize order, buses, "
        "vIOMMUs, bypass. No QEMU process is needed or started.",
        epilog=PREFLIGHT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--cmdline-file",
        metavar="FILE",
        help="a command line: NUL-separated (/proc/PID/cmdline) or shell-quoted "
        "(qm showcmd); - for stdin",
    )
    source.add_argument(
        "--libvirt-xml", metavar="FILE", help="a libvirt domain XML (virsh dumpxml); - for stdin"
    )
    p.add_argument("--format", choices=["table", "json", "tree"], default="table")
    p.add_argument(
        "--cwd",
        metavar="DIR",
        help="where relative -readconfig paths are read from (default: the current "
        "directory; for --cmdline-file /proc/PID/cmdline, that process's)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--fix", action="store_true", help="print the corrected command line (or XML/config change)"
    )
    mode.add_argument(
        "--gate",
        action="store_true",
        help="for hooks: exit 0 to let the VM start, 2 to refuse it (reason on stderr)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="with --gate: also refuse a command line qmpguard cannot verify",
    )
    _version_option(p)
    _common(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- QEMU ARGS")

    e: argparse.ArgumentParser = sub.add_parser(
        "exec",
        help="check a QEMU command line, then become QEMU (or refuse, exit 2)",
        description="Check the command line as `preflight --gate` does, then replace this "
        "process with QEMU (same PID, environment and file descriptors). Usable as "
        "libvirt's <emulator> through a one-line wrapper script and in any launcher.",
    )
    e.add_argument(
        "--strict",
        action="store_true",
        help="also refuse a command line qmpguard cannot verify (default: start with a warning)",
    )
    _version_option(e)
    _common(e)
    e.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- QEMU ARGS")


# ------------------------------------------------------------------ reading the input


def _read_bounded(path: str, limit: int, what: str) -> bytes:
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        import stat

        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            # /proc/PID/cmdline is a regular file of size 0: read it all the same
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{what} {path} is not a regular file")
            chunks, total = [], 0
            while total <= limit:
                chunk = os.read(fd, min(1 << 16, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            data = b"".join(chunks)
        except OSError as exc:
            raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
    if len(data) > limit:
        raise InputError(f"{what} {path} is larger than {limit} bytes")
    return data


def parse_cmdline_text(data: bytes) -> list[str]:
    """A command line as /proc/PID/cmdline (NUL-separated) or a shell prints it."""
    if b"\0" in data:
        return [a.decode("utf-8", "surrogateescape") for a in data.rstrip(b"\0").split(b"\0")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("the command line is not UTF-8 text") from None
    try:
        return shlex.split(text.replace("\\\n", " "))
    except ValueError as exc:
        raise InputError(f"the command line is not shell-quoted text: {exc}") from None


def _proc_pid(path: str | None) -> int | None:
    m = re.fullmatch(r"/proc/(\d+)/cmdline", path or "")
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Loaded:
    pf: Preflight
    notes: tuple[str, ...]


def load(args: argparse.Namespace) -> Loaded:
    """The preflight of whatever the arguments name (InputError if unreadable)."""
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if argv and (getattr(args, "libvirt_xml", None) or getattr(args, "cmdline_file", None)):
        raise InputError(
            "give the command line once: -- QEMU ARGS, --cmdline-file or --libvirt-xml"
        )
    if getattr(args, "libvirt_xml", None):
        raw = _read_bounded(args.libvirt_xml, MAX_XML_BYTES, "domain XML")
        try:
            dom = domain_argv(raw.decode("utf-8"))
        except (DomainXmlError, UnicodeDecodeError) as exc:
            raise InputError(f"domain XML {args.libvirt_xml}: {exc}") from None
        argv = list(dom.argv)
        target, notes = f"libvirt-xml:{dom.name}", dom.notes
    elif getattr(args, "cmdline_file", None):
        argv = parse_cmdline_text(_read_bounded(args.cmdline_file, MAX_CMDLINE_BYTES, "file"))
        target, notes = None, ()
    else:
        target, notes = None, ()
    if not argv:
        raise InputError("no command line: give -- QEMU ARGS, --cmdline-file or --libvirt-xml")
    pid = _proc_pid(getattr(args, "cmdline_file", None))
    if pid is not None and not getattr(args, "cwd", None):
        # a running QEMU's files, as it sees them (its root and working directory)
        files = read_command_line_files(pid, argv)
        unreadable = {
            p: f"-readconfig {p} could not be read through /proc/{pid}"
            for p in readconfig_paths(argv)
            if p not in files
        }
    else:
        files, unreadable = read_config_files(argv, getattr(args, "cwd", None))
    version = qemu_version(argv[0], pid, getattr(args, "qemu_version", None))
    pf = preflight(argv, files, unreadable, target, version)
    return Loaded(pf, (*notes, *pf.notes))


# ------------------------------------------------------------------ the QEMU version

VERSION_TIMEOUT = 10.0


def qemu_version(argv0: str, pid: int | None, given: str | None) -> QemuVersion:
    """The version of the QEMU that will run the command line: `given` (--qemu-version),
    else what the binary says to --version: the running process's own (/proc/PID/exe)
    for /proc/PID/cmdline, else argv[0] as QEMU would be found. Only a binary named like
    QEMU is run (qemu-system-*, kvm, qemu-kvm); whatever fails says why, never a guess."""
    if given is not None:
        if given.lower() == "none":
            return QemuVersion(None, "--qemu-version none")
        if parse_version(given) is None:
            raise InputError(f"--qemu-version {given}: not a version like 10.0 or 11.1.3")
        return QemuVersion(given, "")
    if not machine_binary(argv0):
        return QemuVersion(
            None, f"argv[0] {argv0!r} is not a QEMU binary name: give --qemu-version"
        )
    binary = _process_binary(pid) if pid is not None else shutil.which(argv0)
    if binary is None:
        return QemuVersion(None, f"{argv0} is not found here: give --qemu-version")
    try:
        st = os.stat(binary)
    except OSError as exc:
        return QemuVersion(None, f"{binary}: {exc.strerror}: give --qemu-version")
    return _version_of(binary, st.st_mtime_ns, st.st_size)


def _process_binary(pid: int) -> str:
    """The running process's own binary: its path while that still names the same file
    (so the cached answer is keyed by a file, not by a reusable PID), else /proc/PID/exe."""
    exe = f"/proc/{pid}/exe"
    try:
        target = os.readlink(exe)
        if os.path.samefile(target, exe):
            return target
    except OSError:
        pass
    return exe


@functools.lru_cache(maxsize=16)
def _version_of(binary: str, mtime_ns: int = 0, size: int = 0) -> QemuVersion:
    """`BINARY --version` (a process, never a VM): its first line's version (cached per
    file: path, modification time and size)."""
    try:
        done = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return QemuVersion(None, f"{binary} --version failed ({exc}): give --qemu-version")
    first = done.stdout.decode("utf-8", "replace").strip().splitlines()[:1]
    m = re.search(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)", first[0] if first else "")
    if done.returncode != 0 or m is None:
        return QemuVersion(None, f"{binary} --version printed no QEMU version: give --qemu-version")
    return QemuVersion(m.group(1), "")


# ------------------------------------------------------------------ the gate


@dataclass(frozen=True)
class Decision:
    allow: bool
    headline: str
    details: tuple[str, ...]

    def say(self) -> None:
        """On stderr: where libvirt, Proxmox VE and launchers show it."""
        if self.headline:
            print(f"qmpguard: {self.headline}", file=sys.stderr)
        for line in self.details:
            print(f"  {line}", file=sys.stderr)


def decide(pf: Preflight, strict: bool) -> Decision:
    """Start or refuse: refuse a vfio device realized before its vIOMMU; with `strict`,
    also a vfio device qmpguard cannot verify, and devices it cannot see."""
    vm = pf.analysis()
    details: list[str] = []
    misbound = unverified = False
    for f in vm.findings:
        misbound |= f.code == "QG001"
        unverified |= f.code == "QG002"
        details.append(f"{f.code} {f.severity}: {f.message}")
        if f.code in ("QG001", "QG002"):
            details += [f"  - {e}" for e in f.evidence[:-1]]
    details += [f"cannot verify: {h}" for h in pf.hidden]
    details += [f"note: {r}" for r in pf.refusals]  # QEMU itself refuses: it says why
    doubt = unverified or bool(pf.hidden)
    name = pf.target
    if misbound:
        headline = f"refused to start {name}: a vfio device would be realized before its vIOMMU"
        return Decision(False, headline, tuple(details))
    if doubt and strict:
        return Decision(
            False, f"refused to start {name}: it cannot be verified (--strict)", tuple(details)
        )
    if doubt:
        headline = f"starting {name} unverified (--strict would refuse it)"
        return Decision(True, headline, tuple(details))
    return Decision(True, "", tuple(details))


def _say(prefix: str, lines: tuple[str, ...] | list[str]) -> None:
    for line in lines:
        print(f"{prefix}{line}", file=sys.stderr)


# ------------------------------------------------------------------ subcommands


def run_preflight(args: argparse.Namespace) -> int:
    from qmpguard.cli import write_stdout

    try:
        loaded = load(args)
    except InputError as exc:
        print(f"qmpguard: error: {exc}", file=sys.stderr)
        if args.gate:
            verdict = "refused to start it (--strict)" if args.strict else "starting it unchecked"
            print(f"qmpguard: cannot check this VM: {verdict}", file=sys.stderr)
            return EXIT_REFUSED if args.strict else EXIT_OK
        return EXIT_UNKNOWN
    pf = loaded.pf
    if args.gate:
        decision = decide(pf, args.strict)
        decision.say()
        return EXIT_OK if decision.allow else EXIT_REFUSED
    _say("qmpguard: note: ", loaded.notes)
    if args.fix:
        return _print_fix(pf, write_stdout)
    vm = pf.analysis()
    result = TargetResult(pf.target, vm.snapshot, vm, None)  # the snapshot: the version
    results = [result]
    if args.format == "json":
        report = json.dumps(report_json(results), indent=2) + "\n"
    elif args.format == "tree":
        report = render_tree(results)
    else:
        report = render_report(results)
    return exit_code(results) if write_stdout(report) else EXIT_UNKNOWN


def _print_fix(pf: Preflight, write: Any) -> int:
    """Apply fixes until no vfio device is realized before its vIOMMU (one round per
    vIOMMU), then print the corrected command line; for a libvirt domain or a Proxmox VE
    VM, the change to make in their terms; or say why there is no fix."""
    current = pf
    done: list[str] = []
    for _ in range(4):
        found = fixes(current.analysis())
        if not found:
            break
        fix = found[0]
        if fix.language in ("libvirt", "proxmox"):
            _say("qmpguard: ", done)
            ok = write(fix.text + "\n")
            return (EXIT_OK if fix.argv is not None else EXIT_CRITICAL) if ok else EXIT_UNKNOWN
        if fix.argv is None:
            print(f"qmpguard: no corrected command line: {fix.text}", file=sys.stderr)
            return EXIT_CRITICAL
        done.append(fix.how)
        current = preflight(
            list(fix.argv), current.files, target=current.target, version=current.version
        )
    else:
        print("qmpguard: the fixes do not converge", file=sys.stderr)
        return EXIT_CRITICAL
    if not done:
        print(
            "qmpguard: nothing to fix: no vfio device is realized before its vIOMMU",
            file=sys.stderr,
        )
    _say("qmpguard: fix: ", done)
    return EXIT_OK if write(shlex.join(current.argv) + "\n") else EXIT_UNKNOWN


def run_exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("qmpguard: error: give -- QEMU ARGS", file=sys.stderr)
        return EXIT_UNKNOWN
    args.argv = argv
    try:
        decision = decide(load(args).pf, args.strict)
    except Exception as exc:  # never keep a VM from starting only because qmpguard failed
        verdict = "refused to start it (--strict)" if args.strict else "starting it unchecked"
        decision = Decision(
            not args.strict, f"cannot check this command line: {exc}; {verdict}", ()
        )
    decision.say()
    if not decision.allow:
        return EXIT_REFUSED
    sys.stdout.flush()
    sys.stderr.flush()
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec: give QEMU defaults
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"qmpguard: cannot execute {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    raise AssertionError("unreachable")  # pragma: no cover
