"""Slash commands: one table, and a parser from an input line to a command or a message.

No I/O here, so the terminal, line mode and a GUI share it. The table is the single source for
/help and for tab completion.
"""

from __future__ import annotations

from dataclasses import dataclass

from securechat.errors import SecureChatError
from securechat.identity import FINGERPRINT_GROUPS


class CommandError(SecureChatError):
    """The line is not a command we can run; the message says how to write it."""


@dataclass(frozen=True)
class Spec:
    name: str
    usage: str  # arguments, as shown in /help
    help: str
    min_args: int = 0
    max_args: int = 0  # -1: the last argument takes the rest of the line
    room_arg: bool = False  # the first argument is a room: a missing "#" is added


COMMANDS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec(
            "join",
            "#room",
            "join a room (a new one is end-to-end encrypted) and make it current",
            1,
            1,
            True,
        ),
        Spec(
            "create",
            "#room [--plain]",
            "create an end-to-end encrypted room (--plain: TLS only, the server reads it)",
            1,
            2,
            True,
        ),
        Spec("part", "[#room]", "leave the current (or named) room", 0, 1, True),
        Spec("rooms", "", "list the rooms, how many are in each, and which are encrypted"),
        Spec(
            "who",
            "[#room]",
            "who is in the current (or named) room; in an encrypted room, each one's trust mark",
            0,
            1,
            True,
        ),
        Spec(
            "room",
            "[strict|normal]",
            "the current room's mode and key sharing; strict: keys only to verified members",
            0,
            1,
        ),
        Spec("me", "action", "say an action: /me waves", 1, -1),
        Spec(
            "history",
            "[#room|@user] [N]",
            "the last N messages of a room, or of your DMs with user (default 100)",
            0,
            2,
        ),
        Spec("search", "words", "find past messages holding all the words", 1, -1),
        Spec("msg", "user text", "send one end-to-end encrypted direct message", 2, -1),
        Spec("query", "[user]", "plain lines go to user as DMs; /query alone returns", 0, 1),
        Spec("whois", "user", "show a user's key fingerprint and its trust state", 1, 1),
        Spec(
            "verify",
            "user [emoji|accept|match|differ|cancel]",
            "show the safety number to compare with user; emoji: compare emoji with user's "
            "device while they are online (then match or differ)",
            1,
            2,
        ),
        Spec(
            "trust",
            "user [key]",
            "mark verified the key /verify showed (name a changed key: /trust bob 6937)",
            1,
            1 + FINGERPRINT_GROUPS,  # the key's fingerprint start may be typed in groups
        ),
        Spec(
            "devices", "[user]", "list your devices (or user's): ids, fingerprints, last seen", 0, 1
        ),
        Spec("revoke", "DEVICE", "revoke one of your devices: it gets no more DMs", 1, 1),
        Spec("help", "", "this list"),
        Spec("quit", "", "leave"),
    )
}


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Say:
    """Plain text for the current room or query."""

    text: str


def parse(line: str) -> Command | Say | None:
    """Parse one input line; None for a blank line. Raises CommandError for a bad command."""
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Say(line)
    if line.startswith("//"):
        return Say(line[1:])  # "//etc" says "/etc"
    name, _, rest = line[1:].partition(" ")
    spec = COMMANDS.get(name.lower())
    if spec is None:
        raise CommandError(f"unknown command /{name}; /help lists the commands")
    if spec.max_args == -1:
        # The last argument is free text: keep its inner spacing and line breaks.
        args = rest.strip().split(None, spec.min_args - 1) if rest.strip() else []
    else:
        args = rest.split()
    if len(args) < spec.min_args or (spec.max_args >= 0 and len(args) > spec.max_args):
        raise CommandError(f"usage: /{spec.name} {spec.usage}".rstrip())
    if spec.room_arg and args and not args[0].startswith("#"):
        args[0] = "#" + args[0]
    if (
        spec.name
        in ("join", "create", "part", "who", "query", "whois", "verify", "trust", "msg", "devices")
        and args
    ):
        args[0] = args[0].lower()
    return Command(spec.name, tuple(args))


def help_lines() -> list[str]:
    width = max(len(f"/{s.name} {s.usage}") for s in COMMANDS.values())
    lines = [f"  {f'/{s.name} {s.usage}':<{width}}  {s.help}" for s in COMMANDS.values()]
    return ["commands:", *lines, "  //text sends text that starts with a slash"]
