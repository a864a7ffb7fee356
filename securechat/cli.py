"""The `securechat` command line: click commands that parse options and call the library.

Every option can also come from an environment variable (SECURECHAT_<COMMAND>_<OPTION> is not
used; the names are listed explicitly so that --help shows them). The server's options and the
clients' connection options are made from their declarations in securechat/settings.py. Errors of
our own family become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from securechat import settings
from securechat.errors import SecureChatError
from securechat.settings import Setting

F = TypeVar("F", bound=Callable[..., Any])


def _env(name: str) -> dict[str, Any]:
    return {"envvar": f"SECURECHAT_{name}", "show_envvar": True}


class _Group(click.Group):
    """Turns our own errors into one clear line and exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SecureChatError as exc:
            click.echo(f"securechat: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="securechat")
def main() -> None:
    """securechat: self-hosted encrypted chat over TLS 1.3."""


@main.command("gen-certs")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default="certs",
    show_default=True,
    help="Folder to write the certificates and keys to.",
    **_env("CERTS_OUT"),
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME",
    help="Extra DNS name or IP address for the server certificate (repeatable).",
    **_env("CERTS_HOST"),
)
@click.option(
    "--client",
    "clients",
    multiple=True,
    metavar="NAME",
    help="Also issue a client certificate NAME.pem for mutual TLS (repeatable).",
    **_env("CERTS_CLIENT"),
)
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=825,
    show_default=True,
    help="Validity of the server and client certificates, in days.",
    **_env("CERTS_DAYS"),
)
@click.option(
    "--reuse-ca",
    is_flag=True,
    help="Sign with the existing ca.pem/ca.key in --out instead of making a new CA "
    "(renewing or adding certificates).",
    **_env("CERTS_REUSE_CA"),
)
@click.option("--force", is_flag=True, help="Overwrite existing files.", **_env("CERTS_FORCE"))
@click.option(
    "--if-missing",
    is_flag=True,
    help="Do nothing if --out already holds a CA and server certificate (and any --client).",
    **_env("CERTS_IF_MISSING"),
)
def gen_certs(
    out_dir: Path,
    hosts: tuple[str, ...],
    clients: tuple[str, ...],
    days: int,
    reuse_ca: bool,
    force: bool,
    if_missing: bool,
) -> None:
    """Make a local certificate authority and the server (and client) certificates."""
    from securechat import certs

    if if_missing and force:
        raise click.UsageError("--if-missing and --force contradict each other; pass one")
    existing = certs.complete_set(out_dir, clients) if if_missing else None
    if existing is not None:
        fingerprint = certs.load_cert_fingerprint(out_dir / certs.CA_CERT)
        click.echo(f"{out_dir} already holds {', '.join(existing)}; nothing to do")
        click.echo(f"CA fingerprint (SHA-256): {fingerprint}")
        return
    report = certs.generate(
        out_dir, hosts=hosts, clients=clients, days=days, reuse_ca=reuse_ca, force=force
    )
    for line in report.summary_lines():
        click.echo(line)


@main.command()
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Identity key file.",
    **_env("KEY"),
)
def fingerprint(key_path: Path) -> None:
    """Print the fingerprint of an identity key (asks for its passphrase)."""
    from securechat import identity
    from securechat.terminal import passphrase

    ident = identity.load(key_path, passphrase.from_env_or_prompt(key_path, new=False))
    click.echo(ident.fingerprint)


def _options(table: tuple[Setting, ...]) -> Callable[[F], F]:
    """Apply one click option per setting of the table, in the table's order."""

    def apply(command: F) -> F:
        for setting in reversed(table):
            command = click.option(setting.flag, setting.name, **_click_kwargs(setting))(command)
        return command

    return apply


def _click_kwargs(setting: Setting) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "help": setting.help,
        "envvar": setting.env,
        "show_envvar": True,
        "default": setting.default,
        "show_default": setting.default is not None and setting.kind is not bool,
    }
    low, high = setting.minimum, setting.maximum
    ranged = low is not None or high is not None
    if setting.kind is bool:
        kwargs["is_flag"] = True
    elif setting.choices:
        kwargs["type"] = click.Choice(setting.choices)
    elif setting.kind is int:
        int_low = None if low is None else int(low)
        int_high = None if high is None else int(high)
        kwargs["type"] = click.IntRange(int_low, int_high) if ranged else int
    elif setting.kind is float:
        kwargs["type"] = click.FloatRange(low, high) if ranged else float
    elif setting.kind is Path:
        kwargs["type"] = click.Path(path_type=Path)
    return kwargs


@main.command()
@_options(settings.SERVER)
def server(**values: Any) -> None:
    """Run the chat server (TLS 1.3 only) until SIGINT or SIGTERM."""
    from securechat.server.app import ServerConfig
    from securechat.server.run import serve

    fields = {
        s.name: s.to_field(values[s.name]) for s in settings.SERVER if values[s.name] is not None
    }
    config = ServerConfig(**fields)
    serve(config, config.log_level)


def _key_option(*, required: bool, help: str) -> Callable[[F], F]:
    return click.option(
        "--key",
        "key_path",
        type=click.Path(path_type=Path),
        required=required,
        default=None,
        help=help,
        **_env("KEY"),
    )


# Where to connect and as whom: the same options for the terminal client and the GUI.
_chat_options = _options(settings.CHAT)


@main.command()
@_key_option(required=True, help="Identity key file (created on first use).")
@_chat_options
@click.option(
    "--cert",
    type=click.Path(path_type=Path),
    default=None,
    help="Client certificate for mutual TLS.",
    **_env("CERT"),
)
@click.option(
    "--cert-key",
    type=click.Path(path_type=Path),
    default=None,
    help="Private key of --cert.",
    **_env("CERT_KEY"),
)
def client(
    key_path: Path,
    user: str | None,
    host: str,
    port: int,
    ca: Path,
    no_history: bool,
    cert: Path | None,
    cert_key: Path | None,
) -> None:
    """Chat: interactive on a terminal, line mode when stdin is not a terminal."""
    from securechat.client.chat_session import ChatOptions
    from securechat.terminal.frontend import run

    code = run(
        ChatOptions(
            key_path=key_path,
            user=user,
            host=host,
            port=port,
            ca=ca,
            cert=cert,
            cert_key=cert_key,
            history=not no_history,
        )
    )
    sys.exit(code)


@main.command()
@_key_option(required=False, help="Identity key file (asked for in the window if not given).")
@_chat_options
def gui(
    key_path: Path | None, user: str | None, host: str, port: int, ca: Path, no_history: bool
) -> None:
    """Chat in a desktop window (Tk): a connect dialog asks for whatever is not given."""
    from securechat.gui.app import GuiOptions, run
    from securechat.terminal.passphrase import PASSPHRASE_ENV

    secret = os.environ.get(PASSPHRASE_ENV, "")  # pre-fills the dialog's masked field
    opts = GuiOptions(key_path, user, host, port, ca, history=not no_history, passphrase=secret)
    sys.exit(run(opts))
