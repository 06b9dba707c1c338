"""Daemon config validation: every error names the key (and line when it can)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpguard.daemon.settings import (
    ConfigError,
    Settings,
    StaticTarget,
    load_settings,
    settings_from_toml,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config.example.toml"


def test_defaults() -> None:
    s = Settings()
    assert s.listen == "127.0.0.1:10469" and s.interval == 60
    assert "/run/qemu/*.qmp" in s.watch and "/var/run/qemu-server/*.qmp" in s.watch


def test_example_config_is_valid() -> None:
    s = settings_from_toml(EXAMPLE.read_text(), "example")
    assert s.listen == "127.0.0.1:10469"


def test_full_config() -> None:
    s = settings_from_toml("""
watch = ["/run/qemu/*.qmp"]
interval = 30
concurrency = 4
libvirt_uris = ["qemu:///system"]
[timeouts]
greeting = 1
target = 10
[[target]]
address = "tcp:127.0.0.1:4444"
hold = true
""")
    assert s.watch == ("/run/qemu/*.qmp",) and s.interval == 30 and s.concurrency == 4
    assert s.targets == (StaticTarget("tcp:127.0.0.1:4444", True),)
    assert s.greeting_timeout == 1 and s.target_timeout == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("interval = 0", "c.toml:1: 'interval' must be a positive number, got 0"),
        ('\n\nlisten = "nowhere"', "c.toml:3: 'listen' must be HOST:PORT, got 'nowhere'"),
        ("watch = 5", "c.toml:1: 'watch' must be a list of non-empty strings"),
        ("colour = 'red'", "c.toml:1: unknown key 'colour'"),
        ("concurrency = true", "c.toml:1: 'concurrency' must be a positive integer, got True"),
        ("[[target]]\naddress = 'bogus'", "'address': cannot parse target 'bogus'"),
        ("[timeouts]\nslow = 3", "unknown key 'timeouts.slow'"),
        ("[http]\ntls_cert = '/x'", "'http.tls_cert' and 'http.tls_key' go together"),
        ("[http]\ntoken_file = '/nonexistent/token'", "'http.token_file': cannot read"),
        ("interval = ", "not valid TOML"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_toml(text, "c.toml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_command_line_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('interval = 30\nwatch = ["/a/*.qmp"]\n')
    s = load_settings(str(cfg), {"watch": ("/b/*.qmp",), "interval": None, "listen": None})
    assert s.watch == ("/b/*.qmp",) and s.interval == 30
    with pytest.raises(ConfigError, match="command line"):
        load_settings(None, {"listen": "bad"})


def test_hold_on_a_libvirt_target_is_refused() -> None:
    """hold = true needs qmpguard's own QMP session; libvirt holds the monitor itself."""
    with pytest.raises(ConfigError, match="'hold' needs a QMP socket"):
        settings_from_toml('[[target]]\naddress = "libvirt:vm1"\nhold = true\n', "c.toml")
