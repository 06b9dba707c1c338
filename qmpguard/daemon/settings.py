"""Daemon settings: TOML (stdlib tomllib) validated into one frozen dataclass.

Errors name the key and, when it can be found, its line: `config.toml:7: 'interval' ...`.
"""

from __future__ import annotations

import math
import re
import tomllib
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


def settings_from_toml(text: str, origin: str = "config") -> Settings:
    """Parse and validate a TOML document; ConfigError with key and line on any problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer past Python's int max str digits (4300)
        raise ConfigError(f"{origin}: not usable TOML: {str(exc).split(':')[0]}") from None
    key = ""
    try:
        out: dict[str, Any] = {}
        known = {
            "watch",
            "target",
            "libvirt_uris",
            "discover",
            "hold_watched",
            "listen",
            "interval",
            "rescan_interval",
            "concurrency",
            "timeouts",
            "http",
        }
        for key in doc:
            if key not in known:
                raise ValueError(f"unknown key '{key}'")
        for key, value in doc.items():
            if key == "watch":
                out["watch"] = _strings(value, key)
            elif key == "libvirt_uris":
                out["libvirt_uris"] = _strings(value, key)
            elif key == "discover":
                out["discover"] = _strings(value, key)
                unknown = sorted(set(out["discover"]) - DISCOVERY_SOURCES)
                if unknown:
                    raise ValueError(f"'discover' takes {sorted(DISCOVERY_SOURCES)}, not {unknown}")
            elif key == "hold_watched":
                if not isinstance(value, bool):
                    raise ValueError("'hold_watched' must be true or false")
                out["hold_watched"] = value
            elif key == "listen":
                out["listen"] = validate_listen(value)
            elif key in ("interval", "rescan_interval"):
                out[key] = float(check_number(value, key, INTERVAL))
            elif key == "concurrency":
                out[key] = check_number(value, key, CONCURRENCY)
            elif key == "target":
                out["targets"] = tuple(_static_target(t) for t in _table_list(value, key))
            elif key == "timeouts":
                out.update(_timeouts(value))
            elif key == "http":
                out.update(_http(value))
    except ValueError as exc:
        where = _line_of(text, key)
        raise ConfigError(f"{origin}:{where} {exc}") from None
    return Settings(**out)


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


def _timeouts(table: Any) -> dict[str, float]:
    if not isinstance(table, dict):
        raise ValueError("'timeouts' must be a table")
    names = {
        "greeting": "greeting_timeout",
        "command": "command_timeout",
        "target": "target_timeout",
    }
    out = {}
    for k, v in table.items():
        if k not in names:
            raise ValueError(f"unknown key 'timeouts.{k}'")
        out[names[k]] = float(check_number(v, f"timeouts.{k}", TIMEOUT))
    return out


def _http(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ValueError("'http' must be a table")
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k not in ("token_file", "tls_cert", "tls_key", "allow_unauthenticated"):
            raise ValueError(f"unknown key 'http.{k}'")
        if k == "allow_unauthenticated":
            if not isinstance(v, bool):
                raise ValueError("'http.allow_unauthenticated' must be true or false")
            out[k] = v
            continue
        if not isinstance(v, str) or not v:
            raise ValueError(f"'http.{k}' must be a path")
        if k == "token_file":
            try:
                token = read_text_bounded(v, MAX_TOKEN_BYTES, "token file").strip()
            except InputFileError as exc:
                raise ValueError(f"'http.token_file': {exc}") from None
            if len(token) < 16:
                raise ValueError("'http.token_file': token shorter than 16 characters")
            out["token"] = token
        else:
            out[k] = v
    if ("tls_cert" in out) != ("tls_key" in out):
        raise ValueError("'http.tls_cert' and 'http.tls_key' go together")
    return out


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
