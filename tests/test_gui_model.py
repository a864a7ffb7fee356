"""What the GUI shows, checked without a display: unread counts, mentions, history, members and
key trust."""

from __future__ import annotations

from datetime import datetime

import pytest

from securechat.client.events import (
    Closed,
    DirectMessage,
    DMRejected,
    FrameDropped,
    Joined,
    Message,
    Parted,
)
from securechat.gui.model import ChatModel, Line, Trust

TS = 1_795_000_000_000


def test_unread_counts_and_selection() -> None:
    model = ChatModel("alice")
    model.on_event(Joined("#dev", "alice", TS))
    model.on_event(Message("#dev", "bob", "build is green", TS))
    model.on_event(DirectMessage("carol", "alice", "psst", TS, "m" * 16, "new"))
    labels = [c.label for c in model.ordered()]
    assert labels == ["#dev (1)", "#lobby", "@carol (1)"]  # joins are not unread
    assert [c.unread for c in model.ordered()] == [1, 0, 1]
    model.select("@carol")
    assert model.conversations["@carol"].unread == 0
    model.on_event(Message("#lobby", "alice", "my own line", TS))
    assert model.conversations["#lobby"].unread == 0  # what I said is not unread


def test_mentions_history_and_actions() -> None:
    model = ChatModel("alice")
    for text in ("Alice, look", "malice aforethought", "@alice ping", "hi alice."):
        model.on_event(Message("#lobby", "bob", text, TS))
    assert [line.mention for line in model.conversations["#lobby"].lines] == [
        True,
        False,
        True,
        True,
    ]
    model.on_event(Message("#lobby", "bob", "earlier", TS, history=True))
    model.on_event(Message("#lobby", "bob", "waves", TS, action=True))
    assert [line.kind for line in model.conversations["#lobby"].lines[-2:]] == [
        "history",
        "action",
    ]


def test_members_follow_joins_and_parts() -> None:
    model = ChatModel("alice")
    model.set_members("#lobby", ["alice", "bob"])
    model.on_event(Joined("#lobby", "carol", TS))
    model.on_event(Parted("#lobby", "bob", "connection lost", TS))
    assert model.conversations["#lobby"].members == {"alice", "carol"}
    assert model.conversations["#lobby"].lines[-1].text == "bob left (connection lost)"


def test_a_changed_key_blocks_the_conversation() -> None:
    model = ChatModel("alice")
    model.set_trust("bob", Trust("pinned", "aaaa"))
    assert not model.conversations["@bob"].blocked
    model.on_event(DMRejected("bob", "key_changed", "WARNING: the key for bob has changed."))
    conv = model.conversations["@bob"]
    assert conv.blocked and conv.label == "@bob (!) (1)"
    assert conv.trust.warning == "WARNING: the key for bob has changed."
    model.set_trust("bob", Trust("verified", "bbbb"))
    assert model.conversations["@bob"].label == "@bob \u2713 (1)"


def test_text_from_others_cannot_drive_the_display() -> None:
    model = ChatModel("alice")
    model.on_event(Message("#lobby", "bob", "\x1b[2Jcleared?\x07", TS))
    assert model.conversations["#lobby"].lines[-1].text == "\\x1b[2Jcleared?\\x07"


def test_closed_says_why() -> None:
    model = ChatModel("alice")
    model.on_event(Closed("server shutting down"))
    assert (model.connected, model.status) == (False, "disconnected: server shutting down")


def test_closing_the_last_conversation_leaves_something_to_show() -> None:
    model = ChatModel("alice")
    model.open("#dev")
    model.select("#dev")
    model.close("#dev")
    assert model.current == "#lobby"
    model.close("#lobby")
    assert model.current == "#lobby" and list(model.conversations) == ["#lobby"]


def test_dm_lines_and_room_lines_never_share_a_conversation() -> None:
    model = ChatModel("alice")
    model.on_event(DirectMessage("bob", "alice", "sealed hello", TS, "m" * 16, "pinned"))
    model.on_event(DirectMessage("alice", "bob", "to myself, via bob", TS, "n" * 16, "pinned"))
    assert [line.kind for line in model.conversations["@bob"].lines] == ["dm", "own_dm"]
    # A room event naming "@bob" (the Client drops those already) opens no DM conversation.
    for event in (
        Message("@bob", "bob", "unsealed", TS),
        Joined("@carol", "carol", TS),
        Parted("@carol", "carol", "left", TS),
    ):
        model.on_event(event)
    assert sorted(model.conversations) == ["#lobby", "@bob"]
    assert [line.text for line in model.conversations["@bob"].lines] == [
        "sealed hello",
        "to myself, via bob",
    ]
    assert [line.text for line in model.conversations["#lobby"].lines] == [
        "a room event for '@bob' was dropped",
        "a room event for '@carol' was dropped",
        "a room event for '@carol' was dropped",
    ]
    with pytest.raises(ValueError, match="a message line does not belong in @bob"):
        model.add("@bob", Line("message", "unsealed", "bob", TS))
    with pytest.raises(ValueError, match="a dm line does not belong in #lobby"):
        model.add("#lobby", Line("dm", "sealed", "bob", TS))


def test_a_dropped_frame_is_a_warning_where_the_user_is_looking() -> None:
    model = ChatModel("alice")
    model.select("@bob")
    model.on_event(FrameDropped("message", 'the server sent a room message for "@bob"'))
    [line] = model.conversations["@bob"].lines
    assert (line.kind, line.text) == ("warning", 'the server sent a room message for "@bob"')


def test_invisible_and_bidi_characters_are_shown_as_escapes() -> None:
    model = ChatModel("alice")
    model.on_event(Message("#lobby", "bob", "pay \u202eexe.txt\u2066 al\u200bice\u2028", TS))
    model.on_event(DirectMessage("bob", "alice", "\ufeffhi\u200d", TS, "m" * 16, "pinned"))
    assert model.conversations["#lobby"].lines[-1].text == (
        "pay \\u202eexe.txt\\u2066 al\\u200bice\\u2028"
    )
    assert model.conversations["@bob"].lines[-1].text == "\\ufeffhi\\u200d"


def test_times_before_today_show_the_date() -> None:
    old = Line("dm", "held back", "bob", TS)  # a day in November 2026, before today
    when = datetime.fromtimestamp(TS / 1000)
    assert old.clock == f"{when:%Y-%m-%d %H:%M}"
    assert Line("system", "no time").clock == ""


def test_emoji_steps_are_notes_in_the_peers_conversation_and_a_match_marks_it_verified() -> None:
    from securechat.client.events import EmojiVerification

    model = ChatModel("alice")
    dev = "ABCDEFGHIJKLMNOP"
    model.on_event(EmojiVerification("bob", dev, "requested", "bob wants to compare emoji"))
    model.on_event(
        EmojiVerification("bob", dev, "compare", "compare", "\U0001f436 Dog", "1234 5678 9012")
    )
    model.on_event(
        EmojiVerification("bob", dev, "verified", "the emoji matched", fingerprint="ab12 cd34")
    )
    lines = model.conversations["@bob"].lines
    assert [(line.kind, line.text) for line in lines] == [
        ("warning", "bob wants to compare emoji"),
        ("warning", "compare with bob: \U0001f436 Dog (or 1234 5678 9012)"),
        ("system", "the emoji matched"),
    ]
    assert model.conversations["@bob"].trust == Trust("verified", "ab12 cd34")
    assert model.emoji["bob"].stage == "verified"
    mismatch = EmojiVerification("carol", dev, "cancelled", "carol was NOT verified", mismatch=True)
    model.on_event(mismatch)
    assert model.conversations["@carol"].lines[-1].kind == "warning"
    assert model.conversations["@carol"].trust is None
