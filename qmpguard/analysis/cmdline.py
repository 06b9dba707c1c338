"""The QEMU command line as order evidence: every device option in realize order.

QEMU keeps two device lists (system/vl.c): `-device driver,key=val` options, `[device]`
sections of `-readconfig` files and `-drive if=virtio` all join the QemuOpts list in
command-line position; `-device {...}` (JSON, libvirt's form) joins a second list.
`qemu_create_cli_devices` realizes the whole first list, then the second: realize order
is not always command-line order. QEMU's JSON is relaxed (single-quoted strings, `\\'`),
see qemu_json_loads. See docs/design.md, "Command line".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


class DeviceSyntax(Enum):
    """How a device reached QEMU's device lists; decides which list realizes it."""

    KEYVAL = "key=val"
    JSON = "JSON"
    READCONFIG = "-readconfig"
    IMPLICIT = "implicit"  # created by another option (-drive if=virtio)

    @property
    def json_list(self) -> bool:
        """JSON devices are realized after every QemuOpts one."""
        return self is DeviceSyntax.JSON


@dataclass(frozen=True)
class CliDevice:
    """One device a command-line option creates."""

    argument: int  # index in argv of the option's value
    realize_rank: int  # order in which QEMU realizes it
    driver: str
    id: str | None
    syntax: DeviceSyntax
    source: str  # where it was written, for evidence: "argv[12]", 'FILE [device "x"]'
    #: Every other property as written (driver and id left out); JSON values as text:
    #: booleans on/off, numbers in decimal, anything nested as JSON.
    props: tuple[tuple[str, str], ...] = ()
    #: Properties given as JSON numbers: QEMU's pci-devfn property (`addr`) reads an
    #: integer as the devfn itself and a string as SLOT[.FN] in hexadecimal, so `"addr": 24`
    #: is 03.0 while `addr=24` is slot 0x24 (seen on 7.2, 10.0 and 11.1).
    numbers: frozenset[str] = frozenset()

    def prop(self, key: str) -> str | None:
        return next((v for k, v in self.props if k == key), None)


@dataclass(frozen=True)
class CliFacts:
    """What the command line says about devices and the machine."""

    devices: tuple[CliDevice, ...]
    machine_opts: dict[str, str]
    name: str | None = None
    #: Why devices may exist that the command line does not show (unreadable -readconfig,
    #: an option QEMU rejects that we cannot parse); empty when the list is complete.
    gaps: tuple[str, ...] = ()
    readconfig_files: tuple[str, ...] = field(default=())
    #: Why QEMU refuses to start with this command line, as far as the parser sees it
    #: (a -set naming no key=val device defined before it).
    refusals: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.gaps


def split_keyval(text: str) -> list[str]:
    """Split a QemuOpts string on commas, honouring the ',,' escape."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def keyval(text: str, implied: str) -> dict[str, str]:
    """QemuOpts `a,b=c`: the first bare word is the implied key; later ones are flags."""
    out: dict[str, str] = {}
    for i, part in enumerate(split_keyval(text)):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
        elif i == 0 and part:
            out[implied] = part
        elif part:
            out[part] = "on"
    return out


_JSON_ESCAPES = {"'": "'", '"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n"}
_JSON_ESCAPES |= {"r": "\r", "t": "\t"}


def _read_string(text: str, start: int) -> tuple[str, int]:
    """A QEMU JSON string (either quote) starting at `start`; returns (value, next index)."""
    quote, i = text[start], start + 1
    out: list[str] = []
    while i < len(text):
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ord(ch) < 0x20:
            raise ValueError("control character in a string")
        if ch == "\\":
            esc = text[i + 1 : i + 2]
            if esc == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
                out.append(chr(int(text[i + 2 : i + 6], 16)))
                i += 6
                continue
            if esc not in _JSON_ESCAPES:
                raise ValueError(f"bad escape \\{esc}")
            out.append(_JSON_ESCAPES[esc])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise ValueError("unterminated string")


def qemu_json_loads(text: str) -> object:
    """Parse JSON as QEMU's parser does (qobject/json-lexer.c): single-quoted strings too.

    Strings are re-encoded as strict JSON and the rest is left to Python's parser, so
    numbers, literals and structure follow the standard.
    """
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            value, i = _read_string(text, i)
            out.append(json.dumps(value))
            continue
        if ch == "%":
            raise ValueError("interpolation is not allowed on the command line")
        out.append(ch)
        i += 1
    return json.loads("".join(out))


def _prop_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)


Props = tuple[tuple[str, str], ...]


@dataclass
class _Raw:
    """A device option while the command line is read (-set may still change it)."""

    arg: int
    driver: str
    id: str | None
    syntax: DeviceSyntax
    source: str
    props: Props
    numbers: frozenset[str] = frozenset()

    def set(self, key: str, value: str, where: str) -> None:
        """-set device.ID.KEY=VALUE: qemu_opt_set appends, and the last value wins."""
        if key == "driver":
            self.driver = value
        self.props = (*((k, v) for k, v in self.props if k != key), (key, value))
        self.numbers = self.numbers - {key}
        self.source = f"{self.source} with -set {where}"


def _json_device(value: str) -> _Raw | None:
    try:
        obj = qemu_json_loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("driver"), str):
        return None
    dev_id = obj.get("id")
    props = tuple((k, _prop_text(v)) for k, v in obj.items() if k not in ("driver", "id"))
    numbers = frozenset(
        k for k, v in obj.items() if isinstance(v, int | float) and not isinstance(v, bool)
    )
    return _Raw(
        0,
        obj["driver"],
        dev_id if isinstance(dev_id, str) else None,
        DeviceSyntax.JSON,
        "",
        props,
        numbers,
    )


def _other_props(opts: Mapping[str, str]) -> Props:
    return tuple((k, v) for k, v in opts.items() if k not in ("driver", "id"))


#: QEMU's own format (util/qemu-config.c, sscanf): `[group]` or `[group "id"]`, and
#: `key = "value"` with any whitespace (tabs too) around the parts.
_SECTION = re.compile(r'\[\s*(\w+)(?:\s+"([^"]*)")?\s*\]')
_ENTRY = re.compile(r'(\S+)\s+=\s*"([^"]*)"')


def readconfig_groups(text: str) -> list[tuple[str, str | None, dict[str, str]]]:
    """Sections of a QEMU config file: (group, id, options), in file order."""
    groups: list[tuple[str, str | None, dict[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _SECTION.fullmatch(line):
            groups.append((m.group(1), m.group(2), {}))
        elif (m := _ENTRY.fullmatch(line)) and groups:
            groups[-1][2][m.group(1)] = m.group(2)
        else:
            raise ValueError(f"unparsable line {line[:60]!r}")
    return groups


#: Options that take no argument, and options known to take one. An unknown option
#: followed by something that looks like an option is read as a flag, and noted as a gap:
#: misreading it could hide a -device.
_FLAGS = frozenset(
    [
        "-S",
        "-snapshot",
        "-nographic",
        "-no-reboot",
        "-no-shutdown",
        "-no-user-config",
        "-nodefaults",
        "-daemonize",
        "-enable-kvm",
        "-no-hpet",
        "-no-acpi",
        "-full-screen",
        "-only-migratable",
        "-no-fd-bootchk",
        "-s",
        "-nodefconfig",
        "-enable-fips",
        "-preconfig",
        "-no-quit",
        "-old-param",
        "-mem-prealloc",
        "-no-kvm",
        "-no-kvm-irqchip",
        "-no-kvm-pit",
        "-win2k-hack",
        "-rtc-td-hack",
        "-no-frame",
        "-usb",
    ]
)
_WITH_ARGUMENT = frozenset(
    [
        "-device",
        "-machine",
        "-M",
        "-name",
        "-readconfig",
        "-drive",
        "-m",
        "-smp",
        "-cpu",
        "-object",
        "-chardev",
        "-mon",
        "-qmp",
        "-qmp-pretty",
        "-serial",
        "-display",
        "-vga",
        "-netdev",
        "-nic",
        "-net",
        "-kernel",
        "-initrd",
        "-append",
        "-bios",
        "-L",
        "-global",
        "-boot",
        "-uuid",
        "-pidfile",
        "-trace",
        "-D",
        "-d",
        "-debugcon",
        "-monitor",
        "-qtest",
        "-accel",
        "-rtc",
        "-k",
        "-msg",
        "-overcommit",
        "-sandbox",
        "-runas",
        "-chroot",
        "-incoming",
        "-numa",
        "-fw_cfg",
        "-blockdev",
        "-smbios",
        "-vnc",
        "-spice",
        "-audiodev",
        "-parallel",
        "-usbdevice",
        "-loadvm",
        "-action",
        "-compat",
        "-run-with",
        "-cdrom",
        "-hda",
        "-hdb",
        "-hdc",
        "-hdd",
        "-fda",
        "-fdb",
        "-mem-path",
        "-pflash",
        "-set",
        "-writeconfig",
        "-icount",
        "-add-fd",
        "-semihosting-config",
        "-tpmdev",
        "-virtfs",
        "-id",
        "-watchdog-action",
        "-dtb",
        "-option-rom",
        "-acpitable",
        "-iscsi",
        "-plugin",
        "-qtest-log",
        "-xen-domid",
        "-mtdblock",
        "-sd",
    ]
)


@dataclass
class _Parse:
    raw: list[_Raw] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    gaps: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


def _add_readconfig(p: _Parse, arg_index: int, path: str, text: str | None) -> None:
    p.files.append(path)
    if text is None:
        p.gaps.append(f"-readconfig {path} could not be read")
        return
    try:
        groups = readconfig_groups(text)
    except ValueError as exc:
        p.gaps.append(f"-readconfig {path}: {exc}")
        return
    for group, gid, opts in groups:
        if group == "device" and "driver" in opts:
            where = f'{path} [device "{gid}"]' if gid else f"{path} [device]"
            syntax, props = DeviceSyntax.READCONFIG, _other_props(opts)
            p.raw.append(_Raw(arg_index, opts["driver"], gid, syntax, where, props))
        elif group == "machine":
            p.machine.update(opts)


def _add_option(p: _Parse, norm: str, i: int, val: str, files: Mapping[str, str]) -> None:
    """Record option `norm` (value `val` at argv[i]) if it bears on DMA binding: a device,
    its properties, the machine, the VM's name, a config file, or an implicit device."""
    handler = _OPTIONS.get(norm)
    if handler is not None:
        handler(p, i, val, files)


def _device_option(p: _Parse, i: int, val: str, files: Mapping[str, str]) -> None:
    """-device: JSON (a JSON object, as libvirt writes it) or key=val, driver implied first."""
    if val.startswith("{"):
        _json_device_option(p, i, val)
    else:
        _keyval_device_option(p, i, val)


def _json_device_option(p: _Parse, i: int, val: str) -> None:
    where = f"argv[{i}]"
    parsed = _json_device(val)
    if parsed is None:
        p.gaps.append(f"{where}: a JSON -device qmpguard cannot parse")
        return
    parsed.arg, parsed.source = i, where
    p.raw.append(parsed)


def _keyval_device_option(p: _Parse, i: int, val: str) -> None:
    where = f"argv[{i}]"
    kv = keyval(val, "driver")
    if "driver" not in kv:
        p.gaps.append(f"{where}: a -device without a driver")
        return
    p.raw.append(_Raw(i, kv["driver"], kv.get("id"), DeviceSyntax.KEYVAL, where, _other_props(kv)))


def _set_property_option(p: _Parse, i: int, val: str, files: Mapping[str, str]) -> None:
    """-set device.ID.PROP=VALUE: a property of a device given elsewhere."""
    _set_option(p, f"argv[{i}]", val)


def _machine_option(p: _Parse, i: int, val: str, files: Mapping[str, str]) -> None:
    """-machine / -M: the machine type (implied first) and its properties, later ones win."""
    p.machine.update(keyval(val, "type"))


def _name_option(p: _Parse, i: int, val: str, files: Mapping[str, str]) -> None:
    """-name: the guest name (implied first)."""
    p.name = keyval(val, "guest").get("guest")


def _readconfig_option(p: _Parse, i: int, val: str, files: Mapping[str, str]) -> None:
    """-readconfig FILE: its [device] sections, from the file as QEMU's process saw it."""
    _add_readconfig(p, i, val, files.get(val))


def _drive_option(p: _Parse, i: int, val: str, files: Mapping[str, str]) -> None:
    """-drive: if=virtio creates an anonymous virtio-blk-pci device, which no -device names."""
    if keyval(val, "file").get("if") == "virtio":
        p.gaps.append(f"argv[{i}]: -drive if=virtio creates an anonymous device implicitly")


def _virtfs_option(p: _Parse, i: int, val: str, files: Mapping[str, str]) -> None:
    """-virtfs: creates an anonymous virtio-9p-pci device, which no -device names."""
    p.gaps.append(f"argv[{i}]: -virtfs creates an anonymous device implicitly")


_OPTIONS: dict[str, Callable[[_Parse, int, str, Mapping[str, str]], None]] = {
    "-device": _device_option,
    "-set": _set_property_option,
    "-machine": _machine_option,
    "-M": _machine_option,
    "-name": _name_option,
    "-readconfig": _readconfig_option,
    "-drive": _drive_option,
    "-virtfs": _virtfs_option,
}


_SET = re.compile(r"([^.]{1,63})\.([^.]{1,63})\.([^=]{1,63})=(.*)", re.DOTALL)


def _set_option(p: _Parse, where: str, val: str) -> None:
    """`-set device.ID.KEY=VALUE` (qemu_set_option, applied where it stands): it changes
    the key=val or -readconfig device with that id defined before it; QEMU refuses to
    start if there is none (a JSON -device is not in that list). Seen on 7.2, 10.0, 11.1."""
    m = _SET.fullmatch(val)
    if m is None:
        p.refusals.append(f"{where}: -set {val}: QEMU cannot parse it")
        return
    group, dev_id, key, value = m.groups()
    if group != "device":
        return
    target = next((r for r in reversed(p.raw) if r.id == dev_id and not r.syntax.json_list), None)
    if target is None:
        p.refusals.append(
            f"{where}: -set {val}: there is no key=val or -readconfig device {dev_id!r} "
            "before it, so QEMU refuses to start"
        )
    elif key == "id":
        p.gaps.append(f"{where}: -set {val} renames a device, which qmpguard does not model")
    else:
        target.set(key, value, where)


@dataclass(frozen=True)
class Option:
    """One option of a QEMU argv: its normalised name, where it is, its value."""

    name: str  # "-device" for "-device" and "--device"
    index: int  # argv index of the option itself
    value: str | None  # None for a flag, or an unknown option read as one
    unknown_flag: bool = False  # unknown, followed by an option: read as a flag

    @property
    def value_index(self) -> int:
        return self.index + 1


def options(argv: Sequence[str]) -> Iterator[Option]:
    """Every option of `argv` in order, with QEMU's rules for which take a value: the one
    walk over a command line (parse_cmdline, preflight, process discovery all use it)."""
    i = 1
    while i < len(argv):
        opt = argv[i]
        if not opt.startswith("-"):
            i += 1  # a disk image given without -hda, say: no option
            continue
        norm = "-" + opt.lstrip("-")
        if norm in _FLAGS or i + 1 >= len(argv):
            yield Option(norm, i, None)
            i += 1
        elif norm not in _WITH_ARGUMENT and argv[i + 1].startswith("-"):
            yield Option(norm, i, None, unknown_flag=True)
            i += 1
        else:
            yield Option(norm, i, argv[i + 1])
            i += 2


def parse_cmdline(argv: list[str], files: Mapping[str, str] | None = None) -> CliFacts:
    """Parse a QEMU argv (as read from /proc/PID/cmdline); `files`: -readconfig contents."""
    p = _Parse()
    for o in options(argv):
        if o.unknown_flag:
            p.gaps.append(f"argv[{o.index}]: unknown option {argv[o.index]}")
        elif o.value is not None:
            _add_option(p, o.name, o.value_index, o.value, files or {})
    ordered = sorted(p.raw, key=lambda r: (r.syntax.json_list, r.arg))  # stable: QemuOpts first
    devices = tuple(
        CliDevice(r.arg, rank, r.driver, r.id, r.syntax, r.source, r.props, r.numbers)
        for rank, r in enumerate(ordered)
    )
    return CliFacts(devices, p.machine, p.name, tuple(p.gaps), tuple(p.files), tuple(p.refusals))
