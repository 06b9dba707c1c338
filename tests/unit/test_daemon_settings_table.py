"""The config's validation table: every rule's exact message, and which error wins.

Pinned byte for byte: operators grep for these lines, and the table-driven rewrite of
settings_from_toml (issue #13) had to keep each one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpguard.daemon.settings import ConfigError, Settings, StaticTarget, settings_from_toml


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hold_watched = 1", "c.toml:1: 'hold_watched' must be true or false"),
        (
            'discover = ["proc", "zz", "aa"]',
            "c.toml:1: 'discover' takes ['proc'], not ['aa', 'zz']",
        ),
        ("libvirt_uris = [1]", "c.toml:1: 'libvirt_uris' must be a list of non-empty strings"),
        ('listen = "h:0"', "c.toml:1: 'listen' port out of range: 'h:0'"),
        ('rescan_interval = "s"', "c.toml:1: 'rescan_interval' must be a positive number, got 's'"),
        ("timeouts = 5", "c.toml:1: 'timeouts' must be a table"),
        ("http = 5", "c.toml:1: 'http' must be a table"),
        ("target = 5", "c.toml:1: 'target' must be an array of tables ([[target]])"),
        ("[http]\ntls_key = ''", "c.toml: 'http.tls_key' must be a path"),
        ("[http]\ntoken_file = 3", "c.toml: 'http.token_file' must be a path"),
        (
            "[http]\nallow_unauthenticated = 1",
            "c.toml: 'http.allow_unauthenticated' must be true or false",
        ),
        (
            "[[target]]\naddress = 'unix:/x'\nextra = 1",
            "c.toml: [[target]] has unknown key(s) ['extra']",
        ),
        ("[[target]]\nhold = true", "c.toml: [[target]] needs 'address' (a target string)"),
        (
            "[[target]]\naddress = 'unix:/x'\nhold = 1",
            "c.toml: [[target]] 'hold' must be true or false",
        ),
    ],
)
def test_each_rule_says_exactly(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_toml(text, "c.toml")
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # an unknown top-level key is named even after a bad value, with its own line
        ('watch = ["/a/*.qmp"]\ninterval = 0\ncolour = "red"', "c.toml:3: unknown key 'colour'"),
        # otherwise the first bad value in the file is named
        (
            "interval = 0\nrescan_interval = 0",
            "c.toml:1: 'interval' must be a positive number, got 0",
        ),
        # inside a table, keys are checked in file order: bad value or unknown key, first wins
        (
            "[timeouts]\ngreeting = 0\nslow = 3",
            "c.toml: 'timeouts.greeting' must be a positive number, got 0",
        ),
        ("[http]\nbogus = 1\ntls_cert = 5", "c.toml: unknown key 'http.bogus'"),
        ("[http]\ntls_cert = 5\nbogus = 1", "c.toml: 'http.tls_cert' must be a path"),
    ],
)
def test_which_error_is_reported(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_toml(text, "c.toml")
    assert str(info.value) == message


def test_short_token_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("fifteen-chars!!\n")
    with pytest.raises(ConfigError) as info:
        settings_from_toml(f'[http]\ntoken_file = "{token}"\n', "c.toml")
    assert str(info.value) == "c.toml: 'http.token_file': token shorter than 16 characters"


def test_every_key_reaches_its_setting(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  sixteen-chars-ok  \n")
    s = settings_from_toml(f"""
watch = ["/a/*.qmp"]
libvirt_uris = ["qemu:///system"]
discover = ["proc"]
hold_watched = true
listen = "[::1]:8080"
interval = 30
rescan_interval = 5
concurrency = 3
[timeouts]
greeting = 1
command = 2
target = 3
[http]
token_file = "{token}"
tls_cert = "/c.pem"
tls_key = "/k.pem"
allow_unauthenticated = true
[[target]]
address = "unix:/run/vm.qmp"
hold = true
""")
    assert s == Settings(
        watch=("/a/*.qmp",),
        targets=(StaticTarget("unix:/run/vm.qmp", True),),
        libvirt_uris=("qemu:///system",),
        discover=("proc",),
        hold_watched=True,
        listen="[::1]:8080",
        interval=30.0,
        rescan_interval=5.0,
        concurrency=3,
        greeting_timeout=1.0,
        command_timeout=2.0,
        target_timeout=3.0,
        token="sixteen-chars-ok",
        tls_cert="/c.pem",
        tls_key="/k.pem",
        allow_unauthenticated=True,
    )
    # numbers become floats where the setting is a float, and stay int where it is not
    assert [type(v) for v in (s.interval, s.rescan_interval, s.greeting_timeout)] == [float] * 3
    assert type(s.concurrency) is int
