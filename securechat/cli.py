"""The `securechat` command line: click commands that parse options and call the library.

Every option can also come from an environment variable (SECURECHAT_<COMMAND>_<OPTION> is not
used; the names are listed explicitly so that --help shows them). Errors of our own family become
one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from securechat.errors import SecureChatError

DEFAULT_PORT = 12345


def _env(name: str) -> dict:
    return {"envvar": f"SECURECHAT_{name}", "show_envvar": True}


class _Group(click.Group):
    """Turns our own errors into one clear line and exit status, never a traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
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


# The server's limits: (flag, ServerConfig field, type, default, help). Defaults are the
# ServerConfig defaults; SECURITY.md says what each one defends against.
_LIMITS: tuple[tuple[str, str, click.ParamType, float, str], ...] = (
    ("--max-frame", "max_frame", click.IntRange(4096, 16 * 1024 * 1024), 64 * 1024,
     "Largest frame a client may send, in bytes (checked before it is read)."),
    ("--handshake-timeout", "handshake_timeout", click.FloatRange(0.1, 600), 10.0,
     "Seconds a new connection has to finish its TLS handshake."),
    ("--login-timeout", "login_timeout", click.FloatRange(0.1, 600), 30.0,
     "Seconds after the handshake to finish logging in."),
    ("--idle-timeout", "idle_timeout", click.FloatRange(0), 300.0,
     "Seconds of silence before a client is closed; pinged at half of it (0: never)."),
    ("--max-connections", "max_connections", click.IntRange(0), 10_000,
     "Connections in total; more are refused with a reason (0: no cap)."),
    ("--max-per-address", "max_per_address", click.IntRange(0), 500,
     "Connections from one IP address (0: no cap)."),
    ("--rate", "rate", click.FloatRange(0.1), 10.0,
     "Requests (messages, joins, DMs...) a user may send per second, on average."),
    ("--burst", "burst", click.IntRange(1), 30,
     "Requests a user may send at once, before the rate limit applies."),
    ("--flood-refusals", "flood_refusals", click.IntRange(1), 20,
     "Rate-limited requests in a row after which the sender is disconnected."),
    ("--max-queue", "max_outbuf", click.IntRange(64 * 1024), 4 * 1024 * 1024,
     "Bytes queued for a client that does not read before it is dropped."),
    ("--max-message", "max_message", click.IntRange(1, 8000), 8000,
     "Characters in one room message."),
    ("--presence-limit", "presence_limit", click.IntRange(0), 1000,
     "Rooms with more members than this tell only the user of a join or part (0: always all)."),
)  # fmt: skip


def _limit_options(command):  # type: ignore[no-untyped-def]
    for flag, name, kind, default, text in reversed(_LIMITS):
        env = "SECURECHAT_" + flag[2:].upper().replace("-", "_")
        command = click.option(
            flag,
            name,
            type=kind,
            default=default,
            show_default=True,
            help=text,
            envvar=env,
            show_envvar=True,
        )(command)
    return command


@main.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on.", **_env("HOST")
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="TCP port to listen on (0 picks a free one).",
    **_env("PORT"),
)
@click.option(
    "--certs",
    "certs_dir",
    type=click.Path(path_type=Path),
    default="certs",
    show_default=True,
    help="Folder with server.pem, server.key and ca.pem.",
    **_env("CERTS"),
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default="data",
    show_default=True,
    help="Folder for the server's SQLite database.",
    **_env("DATA"),
)
@click.option(
    "--require-client-cert",
    is_flag=True,
    help="Mutual TLS: refuse clients without a certificate from our CA.",
    **_env("REQUIRE_CLIENT_CERT"),
)
@click.option(
    "--io-threads",
    type=click.IntRange(1, 64),
    default=None,
    help="I/O event-loop threads (default: one per two CPUs, at most 4).",
    **_env("IO_THREADS"),
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="How much to log (to stderr).",
    **_env("LOG_LEVEL"),
)
@click.option(
    "--history",
    type=click.IntRange(0, 100_000),
    default=100,
    show_default=True,
    help="Room messages kept per room and shown to whoever joins (0: none).",
    **_env("HISTORY"),
)
@click.option(
    "--dm-ttl",
    type=click.FloatRange(0.01, 24 * 365),
    default=168.0,
    show_default=True,
    help="Hours a DM waits for an offline recipient.",
    **_env("DM_TTL"),
)
@click.option(
    "--dm-quota-count",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Most DMs waiting for one recipient.",
    **_env("DM_QUOTA_COUNT"),
)
@click.option(
    "--dm-quota-bytes",
    type=click.IntRange(1024),
    default=10 * 1024 * 1024,
    show_default=True,
    help="Most bytes of DMs waiting for one recipient.",
    **_env("DM_QUOTA_BYTES"),
)
@click.option(
    "--dm-sender-share",
    type=click.IntRange(1, 100),
    default=10,
    show_default=True,
    help="Percent of each recipient's DM quota (count and bytes) one sender may fill.",
    **_env("DM_SENDER_SHARE"),
)
@_limit_options
def server(
    host: str,
    port: int,
    certs_dir: Path,
    data_dir: Path,
    require_client_cert: bool,
    io_threads: int | None,
    log_level: str,
    history: int,
    dm_ttl: float,
    dm_quota_count: int,
    dm_quota_bytes: int,
    dm_sender_share: int,
    **limits: float,
) -> None:
    """Run the chat server (TLS 1.3 only) until SIGINT or SIGTERM."""
    from securechat.server.app import ServerConfig
    from securechat.server.run import serve

    config = ServerConfig(
        host=host,
        port=port,
        certs_dir=certs_dir,
        data_dir=data_dir,
        require_client_cert=require_client_cert,
        history=history,
        dm_ttl_ms=int(dm_ttl * 3600 * 1000),
        dm_quota_count=dm_quota_count,
        dm_quota_bytes=dm_quota_bytes,
        dm_sender_share=dm_sender_share,
        **limits,  # type: ignore[arg-type]
    )
    if io_threads:
        config.io_threads = io_threads
    serve(config, log_level)


def _key_option(*, required: bool, help: str):  # type: ignore[no-untyped-def]
    return click.option(
        "--key",
        "key_path",
        type=click.Path(path_type=Path),
        required=required,
        default=None,
        help=help,
        **_env("KEY"),
    )


def _chat_options(command):  # type: ignore[no-untyped-def]
    """Where to connect and as whom: the same options for the terminal client and the GUI."""
    options = (
        click.option(
            "--user",
            default=None,
            help="User name (remembered in the key file after the first login).",
            **_env("USER_NAME"),
        ),
        click.option(
            "--host",
            default="127.0.0.1",
            show_default=True,
            help="Server host name.",
            **_env("SERVER_HOST"),
        ),
        click.option(
            "--port",
            type=click.IntRange(1, 65535),
            default=DEFAULT_PORT,
            show_default=True,
            help="Server port.",
            **_env("SERVER_PORT"),
        ),
        click.option(
            "--ca",
            type=click.Path(path_type=Path),
            default="certs/ca.pem",
            show_default=True,
            help="CA certificate that signed the server's.",
            **_env("CA"),
        ),
        click.option(
            "--no-history",
            is_flag=True,
            default=False,
            help="Keep no local history (by default an encrypted one lives beside the key file).",
            **_env("NO_HISTORY"),
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


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
