"""`securechat client`: resolve the name and identity, connect, and run a front end.

Interactive on a terminal, line mode when stdin is not one. Errors of our own family (cannot
connect, certificate refused, name taken, wrong passphrase) propagate to the CLI, which prints one
line and exits 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from securechat import identity
from securechat.client.api import Client
from securechat.client.history import LocalHistory
from securechat.errors import ConfigError
from securechat.protocol import valid_name
from securechat.terminal import passphrase


@dataclass(frozen=True)
class ClientOptions:
    key_path: Path
    user: str | None
    host: str
    port: int
    ca: Path
    cert: Path | None = None
    cert_key: Path | None = None
    interactive: bool | None = None  # None: decide by whether stdin is a terminal
    history: bool = True  # keep the encrypted local history beside the key file


def resolve_user(opts: ClientOptions) -> str:
    user = opts.user or identity.peek_user(opts.key_path)
    if not user:
        raise ConfigError(f"no user name yet for {opts.key_path}; pass --user NAME the first time")
    user = user.lower()
    why = valid_name(user)
    if why:
        raise ConfigError(f"user name {user!r} {why}")
    return user


def run(opts: ClientOptions) -> int:
    """Chat; returns the exit status (see linemode for what line mode returns)."""
    user = resolve_user(opts)
    me, created = identity.load_or_create(opts.key_path, passphrase.source(opts.key_path))
    if created:
        print(
            f"created identity key {opts.key_path} (fingerprint {me.fingerprint})", file=sys.stderr
        )

    history = LocalHistory.beside(me) if opts.history else None

    def connect() -> Client:
        return Client.connect(
            opts.host,
            opts.port,
            me,
            user,
            opts.ca,
            cert=opts.cert,
            cert_key=opts.cert_key,
            history=history,
        )

    try:
        client = connect()
        if me.user != user:
            identity.remember_user(me, user)
        interactive = sys.stdin.isatty() if opts.interactive is None else opts.interactive
        if interactive:
            from securechat.terminal import console

            return console.run(client, f"{opts.host}:{opts.port}", reconnect=connect)
        from securechat.terminal import linemode

        return linemode.run(client)
    finally:
        if history is not None:
            history.close()
