"""Daemon settings: TOML (stdlib tomllib) validated into one frozen dataclass.

Errors name the key and, when it can be found, its line: `config.toml:7: 'interval' ...`.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qmpguard.defaults import (
    COMMAND_TIMEOUT_S,
    GREETING_TIMEOUT_S,
    INSPECTIONS_AT_ONCE,
    TARGET_TIMEOUT_S,
)
from qmpguard.discovery.scan import SOURCES as DISCOVERY_SOURCES
from qmpguard.files import KIB, MIB, InputFileError, read_text_bounded
from qmpguard.targets import TargetError, parse_target

DEFAULT_WATCH = ("/run/qemu/*.qmp", "/var/run/qemu-server/*.qmp")
#: 10469: outside the Prometheus default-port allocation list's 9100-9999 block (full
#: since 2023) and unused by any exporter we could find; 9464 is OpenTelemetry's.
DEFAULT_PORT = 10469
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
MAX_CONFIG_BYTES = 1 * MIB
MAX_TOKEN_BYTES = 4 * KIB


@dataclass(frozen=True)
class Bounds:
    """The sane range of one numeric setting (inclusive)."""

    low: float
    high: float
    unit: str = " seconds"
    integer: bool = False


#: Intervals: below a second burns a core, above a day is never. Timeouts: below 50 ms
#: nothing answers, above an hour is a hang. Concurrency: one socket (fd) per inspection.
INTERVAL = Bounds(1.0, 86400.0)
TIMEOUT = Bounds(0.05, 3600.0)
CONCURRENCY = Bounds(1, 1024, unit="", integer=True)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def number_problem(value: Any, bounds: Bounds) -> str | None:
    """Why `value` is not a valid setting within `bounds` (None if it is)."""
    kind = "a positive integer" if bounds.integer else "a positive number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be {kind}, got {_show(value)}"
    if bounds.integer and not isinstance(value, int):
        return f"must be {kind}, got {_show(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {_show(value)}"
    if value <= 0:
        return f"must be {kind}, got {_show(value)}"
    if not bounds.low <= value <= bounds.high:
        return (
            f"must be between {bounds.low:g} and {bounds.high:g}{bounds.unit}, got {_show(value)}"
        )
    return None


def check_number(value: Any, key: str, bounds: Bounds) -> Any:
    """`value` if it is finite and within `bounds`; ValueError naming `key` otherwise."""
    problem = number_problem(value, bounds)
    if problem is not None:
        raise ValueError(f"'{key}' {problem}")
    return value


class ConfigError(ValueError):
    """An invalid configuration, with a one-line reason naming the key."""


@dataclass(frozen=True)
class StaticTarget:
    """A target listed in the config: always inspected, hold = keep the monitor open."""

    target: str
    hold: bool = False


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs to run."""

    watch: tuple[str, ...] = DEFAULT_WATCH
    targets: tuple[StaticTarget, ...] = ()
    libvirt_uris: tuple[str, ...] = ()
    discover: tuple[str, ...] = ()  # "proc": QEMU processes found in /proc
    hold_watched: bool = False
    listen: str = DEFAULT_LISTEN
    interval: float = 60.0
    rescan_interval: float = 2.0
    concurrency: int = INSPECTIONS_AT_ONCE
    greeting_timeout: float = GREETING_TIMEOUT_S
    command_timeout: float = COMMAND_TIMEOUT_S
    target_timeout: float = TARGET_TIMEOUT_S
    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    #: Serve beyond loopback without a token anyway (otherwise the daemon refuses).
    allow_unauthenticated: bool = False

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def _line_of(text: str, key: str) -> str:
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return f"{i}:"
    return ""


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"'{key}' must be a list of non-empty strings")
    return tuple(value)


def validate_listen(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(
        r"(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}", value
    ):
        raise ValueError(f"'listen' must be HOST:PORT, got {value!r}")
    if not 0 < int(value.rsplit(":", 1)[1]) < 65536:
        raise ValueError(f"'listen' port out of range: {value!r}")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"'{key}' must be true or false")
    return value


def _path(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{key}' must be a path")
    return value


def _listen(value: Any, _key: str) -> str:
    return validate_listen(value)


def _interval(value: Any, key: str) -> float:
    return float(check_number(value, key, INTERVAL))


def _timeout(value: Any, key: str) -> float:
    return float(check_number(value, key, TIMEOUT))


def _concurrency(value: Any, key: str) -> int:
    return int(check_number(value, key, CONCURRENCY))  # already an int: CONCURRENCY.integer


def _sources(value: Any, key: str) -> tuple[str, ...]:
    sources = _strings(value, key)
    unknown = sorted(set(sources) - DISCOVERY_SOURCES)
    if unknown:
        raise ValueError(f"'{key}' takes {sorted(DISCOVERY_SOURCES)}, not {unknown}")
    return sources


def _table_list(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"'{key}' must be an array of tables ([[{key}]])")
    return value


def _static_target(table: dict[str, Any]) -> StaticTarget:
    unknown = set(table) - {"address", "hold"}
    if unknown:
        raise ValueError(f"[[target]] has unknown key(s) {sorted(unknown)}")
    address, hold = table.get("address"), table.get("hold", False)
    if not isinstance(address, str):
        raise ValueError("[[target]] needs 'address' (a target string)")
    try:
        target = parse_target(address)
    except TargetError as exc:
        raise ValueError(f"[[target]] 'address': {exc}") from None
    if not isinstance(hold, bool):
        raise ValueError("[[target]] 'hold' must be true or false")
    if hold and target.kind == "libvirt":
        # libvirt keeps the monitor itself and has no event stream we could hold open
        raise ValueError(f"[[target]] {address}: 'hold' needs a QMP socket, not a libvirt: target")
    return StaticTarget(address, hold)


def _targets(value: Any, key: str) -> tuple[StaticTarget, ...]:
    return tuple(_static_target(t) for t in _table_list(value, key))


def _token(value: Any, key: str) -> str:
    """The token itself, read now: a missing or short token file fails at load, not
    at the first request."""
    path = _path(value, key)
    try:
        token = read_text_bounded(path, MAX_TOKEN_BYTES, "token file").strip()
    except InputFileError as exc:
        raise ValueError(f"'{key}': {exc}") from None
    if len(token) < 16:
        raise ValueError(f"'{key}': token shorter than 16 characters")
    return token


#: A check takes a TOML value and its dotted key (for the message); it returns the
#: value for Settings or raises ValueError naming the key.
Check = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Key:
    """One TOML key: the Settings field it fills and the check its value must pass."""

    field: str
    check: Check

    def apply(self, value: Any, key: str) -> dict[str, Any]:
        return {self.field: self.check(value, key)}


@dataclass(frozen=True)
class Section:
    """A [table] of keys, checked in file order (the first bad key is the one named);
    `together` then checks what the keys say between them."""

    keys: Mapping[str, Key]
    together: Callable[[dict[str, Any]], None] = lambda out: None

    def apply(self, table: Any, name: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise ValueError(f"'{name}' must be a table")
        out: dict[str, Any] = {}
        for k, v in table.items():
            if k not in self.keys:
                raise ValueError(f"unknown key '{name}.{k}'")
            out.update(self.keys[k].apply(v, f"{name}.{k}"))
        self.together(out)
        return out


def _tls_pair(out: dict[str, Any]) -> None:
    """A certificate without its key (or the reverse) cannot serve TLS."""
    if ("tls_cert" in out) != ("tls_key" in out):
        raise ValueError("'http.tls_cert' and 'http.tls_key' go together")


_TIMEOUTS = Section(
    {
        "greeting": Key("greeting_timeout", _timeout),
        "command": Key("command_timeout", _timeout),
        "target": Key("target_timeout", _timeout),
    }
)
_HTTP = Section(
    {
        "token_file": Key("token", _token),
        "tls_cert": Key("tls_cert", _path),
        "tls_key": Key("tls_key", _path),
        "allow_unauthenticated": Key("allow_unauthenticated", _flag),
    },
    together=_tls_pair,
)
#: Every top-level key of the config file: one table, so a new setting is one line here.
_TOP_LEVEL: dict[str, Key | Section] = {
    "watch": Key("watch", _strings),
    "target": Key("targets", _targets),
    "libvirt_uris": Key("libvirt_uris", _strings),
    "discover": Key("discover", _sources),
    "hold_watched": Key("hold_watched", _flag),
    "listen": Key("listen", _listen),
    "interval": Key("interval", _interval),
    "rescan_interval": Key("rescan_interval", _interval),
    "concurrency": Key("concurrency", _concurrency),
    "timeouts": _TIMEOUTS,
    "http": _HTTP,
}


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer past Python's int max str digits (4300)
        raise ConfigError(f"{origin}: not usable TOML: {str(exc).split(':')[0]}") from None


def settings_from_toml(text: str, origin: str = "config") -> Settings:
    """Parse and validate a TOML document; ConfigError with key and line on any problem.

    Every top-level key must be known before any value is checked, so a misspelt
    key is the one reported even after a bad value; the rules are the tables above.
    """
    doc = _parse(text, origin)
    key = ""  # the key being checked: its line goes in the message
    out: dict[str, Any] = {}
    try:
        for key in doc:
            if key not in _TOP_LEVEL:
                raise ValueError(f"unknown key '{key}'")
        for key, value in doc.items():
            out.update(_TOP_LEVEL[key].apply(value, key))
    except ValueError as exc:
        raise ConfigError(f"{origin}:{_line_of(text, key)} {exc}") from None
    return Settings(**out)


def load_settings(path: str | None, overrides: dict[str, Any]) -> Settings:
    """Settings from the file (if any), then command-line overrides on top.

    The file is read bounded (a regular file of at most 1 MiB: never a FIFO or a device);
    blocking file I/O, so the running daemon calls this off its event loop.
    """
    base = Settings()
    if path is not None:
        try:
            text = read_text_bounded(path, MAX_CONFIG_BYTES, "config")
        except InputFileError as exc:
            raise ConfigError(str(exc)) from None
        base = settings_from_toml(text, path)
    clean = {k: v for k, v in overrides.items() if v not in (None, [], ())}
    try:
        if "listen" in clean:
            validate_listen(clean["listen"])
        if "interval" in clean:
            problem = number_problem(clean["interval"], INTERVAL)
            if problem is not None:
                raise ValueError(f"--interval {problem}")
        for t in clean.get("targets", ()):
            parse_target(t.target)
    except (ValueError, TargetError) as exc:
        raise ConfigError(f"command line: {exc}") from None
    return replace(base, **clean)
