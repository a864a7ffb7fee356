"""One declaration per setting: the `securechat server` options, ServerConfig and README's table
are all made from securechat/settings.py, and each refuses what the others refuse."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from securechat import cli, framing, settings
from securechat.client import Client
from securechat.errors import ConfigError, ProtocolError
from securechat.server import run
from securechat.server.app import ServerConfig
from securechat.settings import Setting

from .cli_helpers import ServerProcess
from .conftest import REPO

NUMERIC = [s for s in settings.SERVER if s.kind in (int, float)]


def _help(command: str) -> str:
    wide = {"terminal_width": 400, "max_content_width": 400}
    result = CliRunner().invoke(cli.main, [command, "--help"], **wide)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    return result.output


def _option_text(output: str, flag: str) -> str:
    """One option's entry in --help, on one line (a long option puts its help on the next)."""
    lines = output.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.split()[:1] == [flag]]
    end = start + 1
    while end < len(lines) and not lines[end].lstrip().startswith("-"):
        end += 1
    return " ".join(" ".join(lines[start:end]).split())


def _range_text(s: Setting) -> str:
    """How click writes the range of an IntRange or FloatRange in --help."""
    low, high = s.minimum, s.maximum
    if low is not None and high is not None:
        return f"{low}<=x<={high}"
    return f"x>={low}" if low is not None else ""


@pytest.mark.parametrize(
    ("command", "table"),
    [("server", settings.SERVER), ("client", settings.CHAT), ("gui", settings.CHAT)],
)
def test_help_shows_each_declared_setting_with_its_variable_default_and_range(
    command: str, table: tuple[Setting, ...]
) -> None:
    output = _help(command)
    for s in table:
        line = _option_text(output, s.flag)
        assert f"{s.help} [env var: {s.env}" in line, line
        if s.default is not None and s.kind is not bool:
            assert f"default: {s.default}" in line, line
        else:
            assert "; default:" not in line, line
        if s.kind in (int, float) and not s.choices:
            assert line.endswith(f"{_range_text(s)}]"), line
        if s.choices:
            assert f"[{'|'.join(s.choices)}]" in line, line


def test_the_server_takes_exactly_the_declared_options() -> None:
    params = [p for p in cli.main.commands["server"].params if p.name != "help"]
    assert [p.opts for p in params] == [[s.flag] for s in settings.SERVER]
    for param, s in zip(params, settings.SERVER, strict=True):
        assert isinstance(param, click.Option)
        assert (param.name, param.envvar, param.default) == (s.name, s.env, s.default)
        if isinstance(param.type, click.types._NumberRangeBase):
            assert (param.type.min, param.type.max) == (s.minimum, s.maximum)
        else:
            assert s.minimum is None and s.maximum is None, s.flag


def _in_range(s: Setting) -> Any:
    """A value other than the default that the flag accepts, as the flag takes it."""
    if s.kind is bool:
        return True
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if s.kind is Path:
        return Path(f"/srv/{s.name}")
    if s.kind is str:
        return "192.0.2.7"
    low = s.minimum if s.minimum is not None else 0
    value = low + 3 if s.maximum is None or low + 3 <= s.maximum else s.maximum
    return value + 0.5 if s.kind is float else value


def test_every_variable_reaches_its_server_config_field(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing is served: serve() is replaced to catch the config the command built.
    started: list[tuple[ServerConfig, str]] = []
    monkeypatch.setattr(run, "serve", lambda config, level: started.append((config, level)))
    values = {s: _in_range(s) for s in settings.SERVER}
    env = {s.env: ("1" if s.kind is bool else str(v)) for s, v in values.items()}
    result = CliRunner().invoke(cli.main, ["server"], env=env)
    assert result.exit_code == 0, result.output
    ((config, level),) = started
    assert level == config.log_level == "debug"
    for s, value in values.items():
        assert getattr(config, s.name) == s.to_field(value), s.flag


def test_variables_reach_a_real_server_and_its_client_keeps_to_the_frame_limit(
    certs_dir: Path, tmp_path: Path, make_identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    for env, value in {
        "SECURECHAT_MAX_FRAME": str(framing.MIN_FRAME),
        "SECURECHAT_MAX_MESSAGE": "900",
        "SECURECHAT_RATE": "7.5",
        "SECURECHAT_BURST": "12",
        "SECURECHAT_IDLE_TIMEOUT": "99",
        "SECURECHAT_CERTS": str(certs_dir),
        "SECURECHAT_DATA": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(env, value)
    server = ServerProcess(cwd=tmp_path)
    try:
        assert server.address is not None, "".join(server.log)
        host, port = server.address
        with Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem") as c:
            announced = {k: c.welcome[k] for k in ("max_frame", "max_message", "rate", "burst")}
            assert announced == {"max_frame": 1024, "max_message": 900, "rate": 7.5, "burst": 12}
            assert c.welcome["idle_timeout"] == 99.0
            with pytest.raises(ProtocolError) as info:
                c.send("#lobby", "x" * 1000)  # within --max-message, but not within the frame
            assert info.value.message.endswith(" bytes exceeds the 1024-byte limit")
    finally:
        assert server.stop() == 0


def test_server_config_defaults_are_the_declared_ones() -> None:
    config = ServerConfig()
    assert config.dm_ttl_ms == 7 * 24 * 3600 * 1000  # --dm-ttl takes hours: 168
    for s in settings.SERVER:
        assert getattr(config, s.name) == s.field_default, s.name
    undeclared = {f.name for f in dataclasses.fields(ServerConfig)} - {
        s.name for s in settings.SERVER
    }
    assert undeclared == {"backlog"}  # the one field with no flag


def test_the_clients_share_their_connection_defaults() -> None:
    pytest.importorskip("tkinter", reason="the GUI needs Tk (python3-tk)")
    from securechat.gui.app import GuiOptions

    declared = {s.name: s.default for s in settings.CHAT}
    gui = GuiOptions()
    assert (gui.host, gui.port, gui.ca) == (declared["host"], declared["port"], declared["ca"])


def _beyond(s: Setting) -> list[float]:
    out = []
    if s.minimum is not None:
        out.append(s.minimum - (1 if s.kind is int else s.minimum / 10 or 0.5))
    if s.maximum is not None:
        out.append(s.maximum + 1)
    return out


@pytest.mark.parametrize("setting", NUMERIC, ids=lambda s: s.flag)
def test_out_of_range_values_are_refused_by_flag_and_in_code(setting: Setting) -> None:
    for value in _beyond(setting):
        shown = str(int(value)) if setting.kind is int else str(value)
        result = CliRunner().invoke(cli.main, ["server", setting.flag, shown])
        assert result.exit_code == 2
        assert f"Invalid value for '{setting.flag}' (env var: '{setting.env}'): " in result.output
        assert "is not in the range" in result.output
        with pytest.raises(ConfigError, match=rf"^{setting.name}=\S+ \({setting.flag}"):
            ServerConfig(**{setting.name: setting.to_field(value)})


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"max_frame": framing.MIN_FRAME - 1},
         "max_frame=1023 (--max-frame) is below the minimum, 1024 bytes"),
        ({"max_frame": framing.MAX_FRAME_CEILING + 1},
         "max_frame=16777217 (--max-frame) is above the maximum, 16777216 bytes"),
        ({"rate": 0.05}, "rate=0.05 (--rate) is below the minimum, 0.1/s"),
        ({"dm_ttl_ms": 1000},
         "dm_ttl_ms=1000 (--dm-ttl 0.000277778 hours) is below the minimum, 0.01 hours"),
        ({"burst": "30"}, "burst (--burst) must be an integer, not '30'"),
        ({"idle_timeout": True}, "idle_timeout (--idle-timeout) must be a number, not True"),
        ({"log_level": "loud"},
         "log_level (--log-level) must be one of debug, info, warning, error, not 'loud'"),
    ],
)  # fmt: skip
def test_a_server_built_in_code_refuses_what_its_flag_would(
    fields: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(**fields)
    assert str(info.value) == error


def test_a_server_built_in_code_takes_the_smallest_frame_limit() -> None:
    assert ServerConfig(max_frame=framing.MIN_FRAME).max_frame == framing.MIN_FRAME


def test_a_bad_variable_is_refused_by_name() -> None:
    result = CliRunner().invoke(cli.main, ["server"], env={"SECURECHAT_LOG_LEVEL": "loud"})
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "Error: Invalid value for '--log-level' (env var: 'SECURECHAT_LOG_LEVEL'): 'loud' is not "
        "one of 'debug', 'info', 'warning', 'error'."
    )


def test_readme_table_is_the_generated_one() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- server settings: begin -->\n", "<!-- server settings: end -->"
    assert readme.count(begin) == 1 and readme.count(end) == 1
    table = readme.split(begin)[1].split(end)[0]
    assert table == settings.markdown_table(), (
        "README.md's table of server settings is out of date: replace it with the output of "
        "`python -m securechat.settings --markdown`"
    )


def test_the_table_prints_from_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "securechat.settings", "--markdown"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout == settings.markdown_table()
    assert done.stdout.splitlines()[14] == (
        "| `--max-frame` | `SECURECHAT_MAX_FRAME` | 64 KiB | 1 KiB to 16 MiB | a larger frame "
        "header is refused before anything is read, and the connection closed; the server "
        "announces the limit, and our client keeps to it |"
    )
