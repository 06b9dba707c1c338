"""A QEMU command line's monitors and name: pure functions over argv.

Options are walked as qmpguard's command-line evidence parser walks them (one table
of which options take an argument, so `-append "-qmp x"` is never read as a monitor),
and their values are split with the same QemuOpts helpers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from qmpguard.analysis.cmdline import keyval, parse_cmdline
from qmpguard.analysis.cmdline import options as cmdline_options
from qmpguard.discovery.model import MonitorProtocol, MonitorSpec, Transport

_TRUE = frozenset({"on", "yes", "true", "y"})
#: Options whose value is a legacy chardev spec (`unix:PATH,...`, `tcp:H:P,...`, `stdio`).
_LEGACY = {"-qmp": MonitorProtocol.QMP, "-qmp-pretty": MonitorProtocol.QMP}
_LEGACY |= {"-monitor": MonitorProtocol.HMP}


def options(argv: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    """(normalised option, argv index of its value, value) for each option with a value."""
    for o in cmdline_options(argv):
        if o.value is not None:
            yield o.name, o.value_index, o.value


def _flag(value: str | None, default: bool = False) -> bool:
    return default if value is None else value.lower() in _TRUE


def _port(text: str) -> int | None:
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


def _legacy(norm: str, index: int, value: str) -> MonitorSpec:
    """`-qmp unix:PATH,server=on`, `-qmp tcp:HOST:PORT,server`, `-monitor stdio`, ..."""
    protocol = _LEGACY[norm]
    if value.startswith("unix:"):
        kv = keyval(value[5:], "path")
        return MonitorSpec(
            protocol,
            norm,
            index,
            Transport.UNIX,
            path=kv.get("path"),
            server=_flag(kv.get("server")),
            detail="abstract" if _flag(kv.get("abstract")) else "",
        )
    if value.startswith(("tcp:", "telnet:")):
        scheme, _, rest = value.partition(":")
        hostport, _, opts = rest.partition(",")
        host, _, port = hostport.rpartition(":")
        kv = keyval(opts, "_") if opts else {}
        return MonitorSpec(
            protocol,
            norm,
            index,
            Transport.TCP,
            host=host,
            port=_port(port),
            server=_flag(kv.get("server")),
            detail=scheme if scheme == "telnet" else "",
        )
    return MonitorSpec(protocol, norm, index, Transport.OTHER, detail=value.split(",")[0])


def _from_chardev(
    norm: str, index: int, protocol: MonitorProtocol, cid: str, chardev: dict[str, str] | None
) -> MonitorSpec:
    """A `-mon chardev=ID` monitor, described by its `-chardev` (if there is one)."""
    if chardev is None:
        return MonitorSpec(
            protocol, norm, index, Transport.OTHER, chardev=cid, detail="no such -chardev"
        )
    backend = chardev.get("backend", "")
    if backend != "socket":
        return MonitorSpec(protocol, norm, index, Transport.OTHER, chardev=cid, detail=backend)
    server = _flag(chardev.get("server"))
    if "fd" in chardev:
        fd = int(chardev["fd"]) if chardev["fd"].isdigit() else None
        return MonitorSpec(protocol, norm, index, Transport.FD, chardev=cid, fd=fd, server=server)
    if "path" in chardev:
        return MonitorSpec(
            protocol,
            norm,
            index,
            Transport.UNIX,
            chardev=cid,
            path=chardev["path"],
            server=server,
            detail="abstract" if _flag(chardev.get("abstract")) else "",
        )
    if "port" in chardev:
        return MonitorSpec(
            protocol,
            norm,
            index,
            Transport.TCP,
            chardev=cid,
            host=chardev.get("host", ""),
            port=_port(chardev["port"]),
            server=server,
        )
    return MonitorSpec(protocol, norm, index, Transport.OTHER, chardev=cid, detail="socket")


def monitors(argv: Sequence[str]) -> tuple[MonitorSpec, ...]:
    """Every monitor the command line declares, QMP and HMP, in command-line order."""
    chardevs: dict[str, dict[str, str]] = {}
    mons: list[tuple[int, str]] = []
    out: list[tuple[int, MonitorSpec]] = []
    for norm, index, value in options(argv):
        if norm in _LEGACY and value != "none":
            out.append((index, _legacy(norm, index, value)))
        elif norm == "-chardev" and not value.startswith("{"):
            kv = keyval(value, "backend")
            if "id" in kv:
                chardevs[kv["id"]] = kv
        elif norm == "-mon":
            mons.append((index, value))
    for index, value in mons:
        kv = keyval(value, "chardev")
        protocol = MonitorProtocol.QMP if kv.get("mode") == "control" else MonitorProtocol.HMP
        cid = kv.get("chardev", "")
        out.append((index, _from_chardev("-mon", index, protocol, cid, chardevs.get(cid))))
    return tuple(spec for _, spec in sorted(out, key=lambda item: item[0]))


def guest_name(argv: Sequence[str]) -> str | None:
    """The `-name` of the VM (`guest=` or the bare form), as QEMU reads it."""
    return parse_cmdline(list(argv)).name
