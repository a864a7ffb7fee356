"""What the GUI shows, checked without a display: unread counts, mentions, history, members and
key trust, and encrypted rooms (modes, trust marks, ghosts, markers and refusals)."""

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
    RoomMember,
    RoomState,
    RoomUnreadable,
    RoomWarning,
)
from securechat.gui.model import ChatModel, Line, MemberRow, Trust, create_command
from securechat.megolm.inbound import before_join_note, missing_note
from securechat.terminal.commands import CommandError

TS = 1_795_000_000_000


def test_unread_counts_and_selection() -> None:
    model = ChatModel("alice")
    model.on_event(Joined("#dev", "alice", TS))
    model.on_event(Message("#dev", "bob", "build is green", TS))
    model.on_event(DirectMessage("carol", "alice", "psst", TS, "m" * 16, "new"))
    labels = [c.label for c in model.ordered()]
    # joins are not unread; #lobby is plain by the protocol's rule, #dev's mode is not known yet
    assert labels == ["#dev (1)", "#lobby (not end-to-end encrypted)", "@carol (1)"]
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
    model.on_event(Message("#team", "bob", "came late", TS, encrypted=True, late=True))
    assert model.conversations["#team"].lines == [
        Line("message", "came late", "bob", TS, False, late=True)
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


LOCK = "\N{LOCK}"
ENCRYPTED = "end-to-end encrypted"
PLAIN = "not end-to-end encrypted"


def test_each_room_shows_its_mode_in_the_list_the_header_and_the_status_line() -> None:
    model = ChatModel("alice")
    model.on_event(RoomState("#team", "encrypted", ENCRYPTED))
    model.on_event(RoomState("#open", "plain", PLAIN))
    model.open("#new")  # no RoomState yet
    assert [c.label for c in model.ordered()] == [
        "#lobby (not end-to-end encrypted)",
        "#new",
        "#open (not end-to-end encrypted)",
        f"#team {LOCK}",
    ]
    team, open_, new = (model.conversations[n] for n in ("#team", "#open", "#new"))
    assert team.header == (
        f"#team: {LOCK} end-to-end encrypted; keys go to pinned members",
        "encrypted",
    )
    assert open_.header == ("#open: not end-to-end encrypted: the server can read it", "plain")
    assert new.header == ("#new: mode unknown", "unknown")
    assert [team.where, open_.where, new.where] == [
        f"#team ({LOCK} end-to-end encrypted)",
        "#open (not end-to-end encrypted)",
        "#new (mode unknown)",
    ]
    model.on_event(RoomState("#team", "encrypted", ENCRYPTED, strict=True))
    assert team.strict
    assert team.header[0] == (
        f"#team: {LOCK} end-to-end encrypted; keys go to verified members only (strict)"
    )
    model.on_event(RoomState("#team", "encrypted", ENCRYPTED, strict=False))
    assert not team.strict


def test_the_member_list_marks_each_members_trust_and_warns_of_ghosts() -> None:
    model = ChatModel("alice")
    members = (
        RoomMember("alice", "verified", True),
        RoomMember("bob", "pinned", True),
        RoomMember("carol", "new", True),
        RoomMember("eve", "changed", False),
        RoomMember("mallory", "new", False, ghost=True),
    )
    model.on_event(RoomState("#team", "encrypted", ENCRYPTED, members=members))
    model.set_members("#team", ["alice", "bob", "carol", "eve"])
    team = model.conversations["#team"]
    # mallory is a ghost the RoomState names though the list we hold does not: shown all the same
    assert team.member_rows() == [
        MemberRow("alice", "alice [verified]", "verified"),
        MemberRow("bob", "bob [pinned]", "pinned"),
        MemberRow("carol", "carol [new]", "new"),
        MemberRow("eve", "eve [changed, gets no keys]", "changed"),
        MemberRow("mallory", "mallory [ghost: never seen joining, gets no keys]", "ghost"),
    ]
    assert team.header[0].endswith("; never seen joining, given no keys: mallory")
    # A who reply as the client reads it replaces the marks: mallory verified, joined since.
    model.set_members("#team", ["alice", "mallory"], [RoomMember("mallory", "verified", True)])
    assert team.member_rows() == [
        MemberRow("alice", "alice"),
        MemberRow("mallory", "mallory [verified]", "verified"),
    ]
    # In a plain room nobody is marked.
    model.set_members("#lobby", ["bob", "alice"], [])
    assert model.conversations["#lobby"].member_rows() == [
        MemberRow("alice", "alice"),
        MemberRow("bob", "bob"),
    ]


def test_markers_and_refusals_are_system_lines_in_their_room_never_chat_text() -> None:
    model = ChatModel("alice")
    model.on_event(RoomState("#team", "encrypted", ENCRYPTED))
    model.on_event(RoomState("#ops", "encrypted", ENCRYPTED))
    model.select("#ops")
    events = [
        RoomUnreadable("#team", "", "before_join", before_join_note(3), 3, True),
        RoomUnreadable(
            "#team",
            "bob",
            "no_key",
            "cannot decrypt a message from bob in #team: this device has no key for it yet",
        ),
        RoomWarning("#team", "missing", missing_note(2, "bob", "#team"), "bob"),
        RoomWarning("#team", "replayed", "a message from bob in #team was a replay", "bob"),
        RoomWarning(
            "#team",
            "downgrade",
            "a message from bob arriving in clear was refused: #team is end-to-end encrypted",
            "bob",
        ),
        RoomWarning("#team", "ghost", "mallory is listed in #team but never seen joining"),
        RoomWarning("#team", "keys", "asked your other devices (PHONE) for the keys of #team"),
    ]
    for event in events:
        model.on_event(event)
    assert [(line.kind, line.text, line.sender) for line in model.conversations["#team"].lines] == [
        ("system", "[history] 3 earlier messages were sent before you joined", ""),
        (
            "system",
            "cannot decrypt a message from bob in #team: this device has no key for it yet",
            "",
        ),
        ("warning", "2 messages from bob in #team are missing", ""),
        ("warning", "a message from bob in #team was a replay", ""),
        (
            "warning",
            "a message from bob arriving in clear was refused: #team is end-to-end encrypted",
            "",
        ),
        ("warning", "mallory is listed in #team but never seen joining", ""),
        ("system", "asked your other devices (PHONE) for the keys of #team", ""),
    ]
    assert model.conversations["#ops"].lines == []  # each in its own room
    assert model.conversations["#team"].unread == 4  # the warnings (system lines never are)
    assert model.conversations["#team"].mode == "encrypted"  # the refused downgrade changed nothing
    # A key refused before its room was known lands where the user is looking, as a warning.
    model.on_event(RoomWarning("", "key_refused", "a room key from bob was refused", "bob"))
    assert model.conversations["#ops"].lines == [Line("warning", "a room key from bob was refused")]
    # Text from others in a marker is escaped like any message.
    model.on_event(RoomWarning("#team", "tampered", "from \x1b[2Jbob", "bob"))
    assert model.conversations["#team"].lines[-1].text == "from \\x1b[2Jbob"


@pytest.mark.parametrize(
    ("name", "plain", "line"),
    [
        ("#team", False, "/create #team"),
        ("Team", False, "/create #team"),
        (" #open ", True, "/create #open --plain"),
    ],
)
def test_the_new_room_dialog_sends_what_create_sends(name: str, plain: bool, line: str) -> None:
    assert create_command(name, plain) == line


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "a room name is one word, like #team"),
        ("#my team", "a room name is one word, like #team"),
        (
            "#t\u00e9am",
            "#t\u00e9am: a room name must start with # and hold only a-z, 0-9 and _ . -",
        ),
        ("#", "#: a room name must be # and 1 to 31 characters"),
    ],
)
def test_the_new_room_dialog_refuses_a_bad_name(name: str, error: str) -> None:
    with pytest.raises(CommandError) as refused:
        create_command(name, False)
    assert str(refused.value) == error
