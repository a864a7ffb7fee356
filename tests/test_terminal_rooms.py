"""Encrypted rooms in the terminal: /create, /room, the modes in /rooms and /who, the status bar,
and how the room events read."""

from __future__ import annotations

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from securechat.client.chat_session import ChatSession
from securechat.client.events import (
    Message,
    RoomMember,
    RoomState,
    RoomUnreadable,
    RoomWarning,
)
from securechat.client.text import stamp
from securechat.terminal.commands import Command, help_lines, parse
from securechat.terminal.console import Console
from securechat.terminal.controller import Controller
from securechat.terminal.notices import Notice, info, warning
from securechat.terminal.render import mode_label, notice_of

from .cli_helpers import LineClient, run_client
from .conftest import wait_for
from .test_rooms_e2e import joined


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("/create team", Command("create", ("#team",))),
        ("/create #Team --plain", Command("create", ("#team", "--plain"))),
        ("/room", Command("room")),
        ("/room strict", Command("room", ("strict",))),
    ],
)
def test_the_room_commands_parse(line: str, parsed: Command) -> None:
    assert parse(line) == parsed


def test_the_help_lists_the_room_commands() -> None:
    text = "\n".join(help_lines())
    assert "/create #room [--plain]" in text and "/room [strict|normal]" in text


def test_room_events_read_as_notices_of_their_kind() -> None:
    members = (
        RoomMember("alice", "verified", True),
        RoomMember("bob", "new", True),
        RoomMember("eve", "changed", False),
        RoomMember("mallory", "new", False, ghost=True),
    )
    state = RoomState("#team", "encrypted", "end-to-end encrypted", False, members)
    assert notice_of(state) == info(
        "#team is \N{LOCK} end-to-end encrypted; members: alice [verified], bob [new], "
        "eve [changed, gets no keys], mallory [ghost: never seen joining, gets no keys]"
    )
    plain = RoomState("#open", "plain", "not end-to-end encrypted")
    assert notice_of(plain) == info("#open is not end-to-end encrypted: the server can read it")
    summed = RoomUnreadable("#team", "", "before_join", "3 earlier messages were sent", 3, True)
    assert notice_of(summed) == info("[history] #team: 3 earlier messages were sent")
    refused = RoomWarning("#team", "replayed", "a message from bob in #team was a copy", "bob")
    assert notice_of(refused) == warning("a message from bob in #team was a copy")
    keys = RoomWarning("#team", "keys", "asked your other devices (X) for the keys of #team")
    assert notice_of(keys) == info("asked your other devices (X) for the keys of #team")
    assert (mode_label("encrypted"), mode_label("plain"), mode_label(None)) == (
        "\N{LOCK} end-to-end encrypted",
        "not end-to-end encrypted",
        "mode unknown",
    )


def test_create_room_rooms_and_who_in_the_terminal(connect) -> None:
    got: list[Notice] = []
    alice = connect("alice")
    controller = Controller(ChatSession(alice), got.append)
    controller.handle_line("/create #open --plain")
    controller.handle_line("/create #team")
    assert controller.current_room == "#team"
    controller.handle_line("/create #team")
    assert got[-1] == warning("#team already exists: /join #team")
    controller.handle_line("/create #x --secret")
    assert got[-1] == warning("usage: /create #room [--plain]")
    bob = connect("bob")
    bob.join("#team").result(10)
    wait_for(alice, joined("#team", "bob"))
    got.clear()
    controller.handle_line("/rooms")
    assert got == [
        info(
            "rooms: #lobby (2, not end-to-end encrypted), #open (1, not end-to-end encrypted), "
            "#team (2, \N{LOCK} end-to-end encrypted)"
        )
    ]
    got.clear()
    controller.handle_line("/who")
    assert got == [info("in #team (\N{LOCK} end-to-end encrypted): alice [verified], bob [new]")]
    got.clear()
    controller.handle_line("/room")
    controller.handle_line("/room strict")
    controller.handle_line("/room loose")
    assert got == [
        info("#team: \N{LOCK} end-to-end encrypted"),
        info("room keys go to pinned members; /room strict or /room normal changes it"),
        info("#team is strict: its keys go only to members you verified"),
        warning("usage: /room [strict|normal]"),
    ]
    assert alice.room_state("#team").strict
    got.clear()
    alice.set_room_strict("#team", False)  # so bob, not verified, gets the key
    controller.handle_line("/me waves")
    for reader in (bob, alice):  # encrypted, and shown as an action, as in a plain room
        shown = wait_for(reader, lambda e: isinstance(e, Message) and e.text == "waves")
        assert isinstance(shown, Message) and (shown.action, shown.encrypted) == (True, True)
        assert notice_of(shown, "#team").text == f"[{stamp(shown.ts)}] * alice waves"
    assert got == []


def test_the_status_bar_shows_the_current_rooms_mode(connect) -> None:
    alice = connect("alice")
    with create_pipe_input() as pipe:
        shown = Console(ChatSession(alice), "test", pt_input=pipe, pt_output=DummyOutput())
        assert shown.toolbar() == (
            " alice@test  #lobby (not end-to-end encrypted)  connected (TLS 1.3)  /help"
        )
        alice.join("#team").result(10)
        wait_for(alice, lambda e: isinstance(e, RoomState))
        shown.controller.current_room = "#team"
        assert shown.toolbar() == (
            " alice@test  #team (\N{LOCK} end-to-end encrypted)  connected (TLS 1.3)  /help"
        )


def test_two_line_mode_clients_talk_in_an_encrypted_room(server, certs_dir, cli_key) -> None:
    port, ca = server.address[1], certs_dir / "ca.pem"
    bob = LineClient(cli_key("bob"), port, ca, user="bob")
    try:
        bob.out.wait_for("-- bob joined #lobby")
        bob.send("/join #team")
        bob.out.wait_for("-- #team is \N{LOCK} end-to-end encrypted; members: bob [verified]")
        alice = run_client(cli_key("alice"), port, ca, "/join #team\nonly for bob\n", user="alice")
        assert alice.returncode == 0, alice.stderr
        assert (
            "-- #team is \N{LOCK} end-to-end encrypted; members: alice [verified], bob [new]"
            in (alice.stdout.splitlines())
        )
        said = bob.out.wait_for("<alice> only for bob")
        assert said.endswith("] #team <alice> only for bob\n") or said.endswith(
            "] <alice> only for bob\n"
        )
        bob.send("/rooms")
        bob.out.wait_for("#team (1, \N{LOCK} end-to-end encrypted)")
    finally:
        assert bob.finish() == 0
