"""A hostile server that dresses room frames up as something else: a room message "in @bob" is
an unsealed forgery of a DM from bob. The client drops every room frame that names no valid room
or user, says so, and keeps it out of bob's conversation, the local history and search."""

from __future__ import annotations

from pathlib import Path

import pytest

from securechat.client import Client
from securechat.client.chat_session import ChatSession
from securechat.client.events import DirectMessage, FrameDropped, Joined, Message
from securechat.client.history import LocalHistory
from securechat.gui.model import ChatModel
from securechat.protocol import History
from securechat.terminal.controller import Controller
from securechat.terminal.notices import as_text
from securechat.terminal.render import render

from .conftest import rewrite_sent_frames, wait_for

FORGED = "it is bob: send the vault code to this number"
WHY = (
    "; it was dropped. Only sealed messages are shown as direct messages: the server may be"
    " trying to pass one off as a DM"
)


def dial(server, certs_dir: Path, ident, user: str, history: LocalHistory | None) -> Client:
    host, port = server.address
    return Client.connect(host, port, ident, user, certs_dir / "ca.pem", history=history)


def shown(e) -> bool:
    return isinstance(e, Message | DirectMessage | FrameDropped)


@pytest.fixture
def alice_and_bob(server, certs_dir, make_identity):
    """alice (with a local history) and bob, both in the lobby; yields (alice, bob, history)."""
    alice_key = make_identity("alice")
    history = LocalHistory.beside(alice_key)
    alice = dial(server, certs_dir, alice_key, "alice", history)
    bob = dial(server, certs_dir, make_identity("bob"), "bob", None)
    try:
        wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "bob")
        yield alice, bob, history
    finally:
        bob.close()
        alice.close()
        history.close()


def nothing_filed_as_a_dm(alice: Client, history: LocalHistory, dropped: FrameDropped) -> None:
    """The forged line is in no @bob conversation: not the history, not search, not the GUI."""
    assert history.conversation("@bob") == []
    assert history.search("vault") == []
    out: list[str] = []
    controller = Controller(ChatSession(alice), lambda notice: out.append(as_text(notice)))
    for line in ("/history @bob", "/search vault"):
        controller.handle_line(line)
    assert out == [
        "-- 0 messages with bob in your local history",
        '-- 0 messages found for "vault"',
    ]
    model = ChatModel("alice")
    model.on_event(dropped)
    assert "@bob" not in model.conversations
    assert model.conversations["#lobby"].lines[-1].kind == "warning"
    assert model.conversations["#lobby"].lines[-1].text == dropped.detail


@pytest.mark.parametrize(
    ("rewrite", "detail"),
    [
        (
            lambda f: {**f, "room": "@bob"},
            'the server sent a room message for "@bob", which is not a room name' + WHY,
        ),
        (
            lambda f: {**f, "room": "bob"},
            'the server sent a room message for "bob", which is not a room name' + WHY,
        ),
        (
            lambda f: {k: v for k, v in f.items() if k != "room"},
            "the server sent a room message for no name, which is not a room name" + WHY,
        ),
        (
            lambda f: {**f, "from": "@bob"},
            'the server sent a room message in #lobby from "@bob", which is not a user name' + WHY,
        ),
    ],
    ids=["room-@bob", "room-without-#", "no-room", "sender-@bob"],
)
def test_a_room_message_that_is_not_for_a_room_is_dropped_with_a_warning(
    alice_and_bob, monkeypatch, rewrite, detail
) -> None:
    alice, bob, history = alice_and_bob
    # {"type": "message", "room": "@bob", "from": "bob", ...}: no seal, no key, only a name.
    rewrite_sent_frames(monkeypatch, "message", lambda f: [rewrite(f)])
    bob.send("#lobby", FORGED).result(5)
    dropped = wait_for(alice, shown)
    assert dropped == FrameDropped("message", detail)
    assert render(dropped) == f"!! {detail}"
    monkeypatch.undo()
    bob.send("#lobby", "an honest line").result(5)
    honest = wait_for(alice, shown)
    assert (type(honest), honest.room, honest.text) == (Message, "#lobby", "an honest line")
    nothing_filed_as_a_dm(alice, history, dropped)


def test_a_join_for_a_dm_name_is_dropped_with_a_warning(server, alice_and_bob, monkeypatch):
    alice, bob, _history = alice_and_bob
    alice.join("#dev").result(5)
    wait_for(alice, lambda e: isinstance(e, Joined) and e.room == "#dev")
    rewrite_sent_frames(monkeypatch, "joined", lambda f: [{**f, "room": "@bob"}])
    bob.join("#dev").result(5)
    monkeypatch.undo()
    dropped = wait_for(alice, lambda e: isinstance(e, FrameDropped | Joined))
    assert dropped == FrameDropped(
        "joined", 'the server sent a join for "@bob", which is not a room name' + WHY
    )
    assert alice.rooms == {"#lobby", "#dev"}


def test_a_room_history_entry_for_a_dm_name_is_dropped_with_a_warning(
    server, alice_and_bob, monkeypatch
) -> None:
    alice, _bob, history = alice_and_bob
    forged = {"type": "message", "room": "@bob", "from": "bob", "text": FORGED, "ts": 1}
    honest = {"type": "message", "room": "#lobby", "from": "bob", "text": "earlier", "ts": 2}
    monkeypatch.setitem(
        server.hub.HANDLERS,
        History,
        lambda hub, conn, frame: {"room": frame.room, "messages": [forged, honest, "junk"]},
    )
    out: list[str] = []
    Controller(ChatSession(alice), lambda notice: out.append(as_text(notice))).handle_line(
        "/history #lobby"
    )
    assert [line.split("] ", 1)[-1] for line in out] == [
        '!! the server sent a room message for "@bob", which is not a room name' + WHY,
        "[history] <bob> earlier",
        "!! the server sent a room history entry that is not a message; it was dropped",
        "-- 1 earlier messages of #lobby",
    ]
    assert history.conversation("@bob") == []
