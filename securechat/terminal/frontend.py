"""`securechat client`: resolve the name and identity, connect, and run a front end.

Interactive on a terminal, line mode when stdin is not one. Errors of our own family (cannot
connect, certificate refused, name taken, wrong passphrase) propagate to the CLI, which prints one
line and exits 1.
"""

from __future__ import annotations

import sys

from securechat import identity
from securechat.client.chat_session import ChatOptions, ChatSession, resolve_user
from securechat.terminal import passphrase


def run(opts: ChatOptions, interactive: bool | None = None) -> int:
    """Chat; returns the exit status (see linemode for what line mode returns). `interactive`:
    None decides by whether stdin is a terminal."""
    user = resolve_user(opts.key_path, opts.user)
    me, created = identity.load_or_create(opts.key_path, passphrase.source(opts.key_path))
    if created:
        print(
            f"created identity key {opts.key_path} (fingerprint {me.fingerprint})", file=sys.stderr
        )
    session = ChatSession.connect(opts, me, user)
    try:
        if sys.stdin.isatty() if interactive is None else interactive:
            from securechat.terminal import console

            return console.run(session, f"{opts.host}:{opts.port}")
        from securechat.terminal import linemode

        return linemode.run(session)
    finally:
        session.close()
