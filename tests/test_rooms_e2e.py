"""End-to-end encrypted rooms over the real server: real TLS, real clients, real SQLite; and a
hostile server (frames rewritten in its hub, devices planted in its store) whose tricks the
clients refuse visibly."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from securechat.client import Client, RequestError
from securechat.client.events import (
    DeviceWarning,
    Event,
    FrameDropped,
    Joined,
    Message,
    Parted,
    RoomState,
    RoomUnreadable,
    RoomWarning,
)
from securechat.protocol import Devices, DMs, Join
from securechat.server import Server, requests
from securechat.server.hub import Hub

from .conftest import Connect, plant_device, rewrite_sent_frames, wait_for
from .test_dm import hook_server_dm

SECRET = "the vault code is 4711"


def said(room: str, sender: str, text: str) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, Message) and (e.room, e.sender, e.text) == (room, sender, text)


def joined(room: str, user: str) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, Joined) and (e.room, e.user) == (room, user)


def warned(kind: str) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, RoomWarning) and e.kind == kind


def quiet(client: Client, timeout: float = 1.0) -> list[Event]:
    """Every event before `timeout` seconds of silence."""
    got = []
    while (event := client.next_event(timeout=timeout)) is not None:
        got.append(event)
    return got


def enter(room: str, newcomer: Client, *members: Client) -> RoomState:
    """`newcomer` joins `room`; returns once it and every member shows the join."""
    newcomer.join(room).result(10)
    state = wait_for(newcomer, lambda e: isinstance(e, RoomState) and e.room == room)
    for member in members:
        wait_for(member, joined(room, newcomer.user))
    assert isinstance(state, RoomState)
    return state


def team(connect, *names: str) -> list[Client]:
    clients = [connect(name) for name in names]
    for i, client in enumerate(clients):
        enter("#team", client, *clients[:i])
    return clients


def test_a_message_in_an_encrypted_room_is_read_by_every_member(connect) -> None:
    alice, bob, carol = team(connect, "alice", "bob", "carol")
    assert alice.room_mode("#team") == "encrypted"
    alice.send("#team", "hello team").result(10)
    for reader in (bob, carol, alice):
        got = wait_for(reader, said("#team", "alice", "hello team"))
        assert isinstance(got, Message) and got.encrypted and got.device == alice.device_id
    carol.send("#team", "hi alice").result(10)
    assert wait_for(alice, said("#team", "carol", "hi alice")).encrypted


def test_a_me_line_in_an_encrypted_room_is_encrypted_and_shown_as_an_action(connect) -> None:
    alice, bob = team(connect, "alice", "bob")
    alice.send("#team", "waves", action=True).result(10)
    for reader in (bob, alice):
        got = wait_for(reader, said("#team", "alice", "waves"))
        assert isinstance(got, Message) and (got.action, got.encrypted) == (True, True)
    history = bob.history_events(bob.room_history("#team").result(10))
    assert [(e.text, e.action, e.history) for e in history if isinstance(e, Message)] == [
        ("waves", True, True)
    ]


def test_a_line_sent_straight_after_joining_is_encrypted_to_the_members_listed(connect) -> None:
    bob = connect("bob")
    enter("#team", bob)
    alice = connect("alice")
    joining = alice.join("#team")  # not waited for: the send waits until its answer is read
    alice.send("#team", "straight away").result(10)
    assert joining.done()
    assert wait_for(bob, said("#team", "alice", "straight away")).encrypted


def test_the_join_shows_the_lock_and_each_members_trust_mark(connect) -> None:
    alice = connect("alice")
    first = enter("#team", alice)
    assert (first.mode, first.label, first.strict) == ("encrypted", "end-to-end encrypted", False)
    bob = connect("bob")
    state = enter("#team", bob, alice)
    assert [(m.user, m.mark, m.gets_keys, m.ghost) for m in state.members] == [
        ("alice", "new", True, False),
        ("bob", "verified", True, False),
    ]
    plain = connect("carol")
    plain.create("#open", plain=True).result(10)
    shown = wait_for(plain, lambda e: isinstance(e, RoomState) and e.room == "#open")
    assert (shown.mode, shown.label, shown.members) == ("plain", "not end-to-end encrypted", ())


def test_the_servers_files_and_log_hold_no_room_plaintext(
    connect, server: Server, server_log: Path
) -> None:
    alice, bob = team(connect, "alice", "bob")
    alice.send("#team", SECRET).result(10)
    assert wait_for(bob, said("#team", "alice", SECRET)).encrypted
    server.stop()
    data = server.config.data_dir
    files = [p for p in data.rglob("*") if p.is_file()] + [server_log]
    assert any(p.name == "securechat.db" for p in files)
    assert "alice logged in" in server_log.read_text()
    for path in files:
        assert b"vault code" not in path.read_bytes(), path
    with sqlite3.connect(data / "securechat.db") as db:
        rows = db.execute("SELECT room, sender, session_id FROM room_history").fetchall()
    assert [(room, sender) for room, sender, _ in rows] == [("#team", "alice")]
    assert rows[0][2]  # kept as ciphertext with its Megolm session


def test_joins_cost_a_member_no_request_until_it_sends_then_one_for_all(
    connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    (alice,) = team(connect, "alice")
    newcomers = [connect(name) for name in ("bob", "carol", "dave", "erin")]
    asked: list[tuple[str, tuple[str, ...]]] = []
    original = requests.HANDLERS[Devices]

    def devices(conn, frame: Devices) -> None:  # type: ignore[no-untyped-def]
        if conn.user == "alice":
            asked.append((conn.user, frame.users or (frame.user,)))
        original(conn, frame)

    monkeypatch.setitem(requests.HANDLERS, Devices, devices)
    for newcomer in newcomers:  # one at a time, each seen by alice before the next
        enter("#team", newcomer, alice)
    assert asked == []
    shown = [(m.user, m.mark, m.gets_keys) for m in alice.room_members("#team")]
    assert shown == [("alice", "verified", True)] + [
        (n.user, "new", True) for n in newcomers
    ]  # first sight: pinned by the send that first encrypts to them
    alice.send("#team", "welcome, all four").result(10)
    for reader in newcomers:
        assert wait_for(reader, said("#team", "alice", "welcome, all four")).encrypted
    assert asked == [("alice", ("bob", "carol", "dave", "erin"))]
    # A device whose record alice holds already costs nothing when it joins again.
    bob = newcomers[0]
    bob.part("#team").result(10)
    enter("#team", bob, alice)
    alice.send("#team", "welcome back").result(10)
    assert wait_for(bob, said("#team", "alice", "welcome back")).encrypted
    assert asked == [("alice", ("bob", "carol", "dave", "erin"))]


def test_a_member_who_left_cannot_read_what_is_sent_after(connect) -> None:
    alice, bob = team(connect, "alice", "bob")
    alice.send("#team", "before bob left").result(10)
    assert wait_for(bob, said("#team", "alice", "before bob left"))
    bob.part("#team").result(10)
    wait_for(alice, lambda e: isinstance(e, Parted) and e.user == "bob")
    alice.send("#team", "after bob left").result(10)
    wait_for(alice, said("#team", "alice", "after bob left"))
    # Back in, bob gets the history: what he read before shows again, what came after does not.
    bob.join("#team").result(10)
    seen = quiet(bob)
    texts = [e.text for e in seen if isinstance(e, Message)]
    assert texts == ["before bob left"]
    [marker] = [e for e in seen if isinstance(e, RoomUnreadable)]
    assert (marker.count, marker.detail) == (1, "1 earlier message was sent before you joined")
    assert not any(isinstance(e, RoomWarning) and e.kind == "replayed" for e in seen)


def test_a_newcomer_is_told_how_many_earlier_messages_were_sent_before_they_joined(
    connect,
) -> None:
    alice, bob = team(connect, "alice", "bob")
    for n in range(3):
        alice.send("#team", f"early {n}").result(10)
        wait_for(bob, said("#team", "alice", f"early {n}"))
    carol = connect("carol")
    carol.join("#team").result(10)
    marker = wait_for(carol, lambda e: isinstance(e, RoomUnreadable))
    assert isinstance(marker, RoomUnreadable)
    assert (marker.room, marker.reason, marker.count, marker.history) == (
        "#team",
        "before_join",
        3,
        True,
    )
    assert marker.detail == "3 earlier messages were sent before you joined"
    wait_for(alice, joined("#team", "carol"))
    alice.send("#team", "welcome carol").result(10)
    assert wait_for(carol, said("#team", "alice", "welcome carol")).encrypted
    # /history reads what it can and sums up the rest.
    events = carol.history_events(carol.room_history("#team").result(10))
    assert [e.text for e in events if isinstance(e, Message)] == ["welcome carol"]
    assert [e.detail for e in events if isinstance(e, RoomUnreadable)] == [
        "3 earlier messages were sent before you joined"
    ]


def test_a_second_device_reads_the_history_through_key_forwarding(device: Connect) -> None:
    laptop, bob = device("alice", "laptop"), device("bob", "one")
    enter("#team", laptop)
    enter("#team", bob, laptop)
    bob.send("#team", "for alice's eyes").result(10)
    assert wait_for(laptop, said("#team", "bob", "for alice's eyes"))
    phone = device("alice", "phone")
    phone.join("#team").result(10)
    marker = wait_for(phone, lambda e: isinstance(e, RoomUnreadable))
    assert marker.detail == "1 earlier message was sent before you joined"
    asked = wait_for(phone, warned("keys"))
    assert asked.detail == f"asked your other devices ({laptop.device_id}) for the keys of #team"
    answered = wait_for(laptop, warned("keys"))
    assert answered.detail == f"sent 1 room keys for #team to your device {phone.device_id}"
    arrived = wait_for(phone, warned("keys"))
    assert arrived.detail == (
        f"your device {laptop.device_id} sent the keys of #team; /history #team shows the "
        "messages they open"
    )
    events = phone.history_events(phone.room_history("#team").result(10))
    [message] = [e for e in events if isinstance(e, Message)]
    assert (message.sender, message.text, message.history, message.encrypted) == (
        "bob",
        "for alice's eyes",
        True,
        True,
    )
    # bob saw the phone join (as alice): his next message reaches it live.
    wait_for(bob, joined("#team", "alice"))
    bob.send("#team", "to both of alice's devices").result(10)
    for reader in (phone, laptop):
        assert wait_for(reader, said("#team", "bob", "to both of alice's devices")).encrypted


def test_a_room_seen_encrypted_stays_encrypted_for_the_client(
    connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    (alice,) = team(connect, "alice")
    alice.close()
    # Now the server calls the room plain. The client remembers what it saw, across the restart.
    real_join = Hub.HANDLERS[Join]

    def plain_join(hub: Hub, conn: object, frame: Join) -> dict:
        hub._modes[frame.room] = "plain"
        return {**real_join(hub, conn, frame), "mode": "plain"}

    monkeypatch.setitem(Hub.HANDLERS, Join, plain_join)
    again = connect("alice")
    again.join("#team").result(10)
    refusal = wait_for(again, warned("downgrade"))
    assert refusal.detail == (
        "the server now says #team is not end-to-end encrypted, but you saw it encrypted; "
        "nothing will be sent there in plaintext and plaintext from it is not shown"
    )
    assert again.room_mode("#team") == "encrypted"
    with pytest.raises(RequestError, match="not end-to-end encrypted"):
        again.send("#team", "still secret").result(10)  # encrypted: the server refuses it
    with pytest.raises(RequestError, match="not end-to-end encrypted"):
        again.send("#team", "waves", action=True).result(10)  # a /me line too: encrypted
    # Someone who never saw it encrypted talks in clear there: refused, never shown.
    mallory = connect("mallory")
    mallory.join("#team").result(10)
    wait_for(again, joined("#team", "mallory"))
    mallory.send("#team", "in clear").result(10)
    refused = wait_for(again, warned("downgrade"))
    assert refused.detail == (
        "a message from mallory arriving in clear was refused: #team is end-to-end encrypted; "
        "a plaintext message there was refused"
    )
    assert not [e for e in quiet(again, 0.5) if isinstance(e, Message)]


# -- a hostile server ---------------------------------------------------------------------------


def test_a_ghost_the_server_adds_without_a_join_gets_no_keys_and_is_warned_about(
    connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = team(connect, "alice", "bob")
    # The server slips mallory in: nobody is sent her `joined` event.
    rewrite_sent_frames(
        monkeypatch,
        "joined",
        lambda f: [] if (f["user"], f["room"]) == ("mallory", "#team") else [f],
    )
    mallory = connect("mallory")
    mallory.join("#team").result(10)
    members = alice.who_members(alice.who("#team").result(10))
    assert [(m.user, m.gets_keys, m.ghost) for m in members] == [
        ("alice", True, False),
        ("bob", True, False),
        ("mallory", False, True),
    ]
    ghost = wait_for(alice, warned("ghost"))
    assert ghost.detail == (
        "the server lists mallory in #team, but you never saw mallory join; mallory gets no "
        "keys and cannot read what you send there"
    )
    alice.send("#team", SECRET).result(10)
    assert wait_for(bob, said("#team", "alice", SECRET)).encrypted
    seen = quiet(mallory)
    assert not [e for e in seen if isinstance(e, Message) and e.room == "#team"]
    [marker] = [e for e in seen if isinstance(e, RoomUnreadable)]
    assert (marker.sender, marker.reason) == ("alice", "no_key")


def test_a_device_the_server_signed_itself_gets_no_room_keys_and_is_warned_about(
    connect, server: Server, make_identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    forged = plant_device(server, monkeypatch, "bob", make_identity("mallory"))
    shares: list[str] = []
    alice, bob = team(connect, "alice", "bob")
    hook_server_dm(monkeypatch, lambda f: shares.append(f.device) or f)
    batched = requests.HANDLERS[DMs]  # room keys go out batched, a `dms` per message
    monkeypatch.setitem(
        requests.HANDLERS,
        DMs,
        lambda conn, f: shares.extend(m.device for m in f.messages) or batched(conn, f),
    )
    alice.send("#team", "not for the server").result(10)
    assert wait_for(bob, said("#team", "alice", "not for the server")).encrypted
    assert forged.device_id not in shares and bob.device_id in shares
    warnings = [e for e in quiet(alice, 0.5) if isinstance(e, DeviceWarning)]
    assert any(
        w.detail
        == (
            f"a device record for bob ({forged.device_id}) is signed by a key that is not the "
            "one you pinned for bob; it was refused. The server may be adding a device of its own"
        )
        for w in warnings
    ), warnings


def test_a_replayed_room_message_is_refused(connect, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = team(connect, "alice", "bob")
    rewrite_sent_frames(monkeypatch, "message_encrypted", lambda f: [f, f])
    alice.send("#team", "only once").result(10)
    seen = quiet(bob)
    assert [e.text for e in seen if isinstance(e, Message)] == ["only once"]
    [refused] = [e for e in seen if isinstance(e, RoomWarning)]
    assert (refused.room, refused.kind, refused.user) == ("#team", "replayed", "alice")
    assert refused.detail == (
        "a message from alice in #team was a copy of one already received; it was dropped. The "
        "server is replaying room messages"
    )


def test_a_room_message_stamped_with_another_sender_is_refused(
    connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob, _ = team(connect, "alice", "bob", "carol")
    rewrite_sent_frames(monkeypatch, "message_encrypted", lambda f: [{**f, "from": "carol"}])
    alice.send("#team", "from alice").result(10)
    seen = quiet(bob)
    assert not [e for e in seen if isinstance(e, Message)]
    [refused] = [e for e in seen if isinstance(e, RoomWarning)]
    assert (refused.kind, refused.user) == ("forged_sender", "carol")
    assert refused.detail.startswith(
        "a message in #team stamped as from carol was encrypted by alice's device "
    )
    assert refused.detail.endswith("; it was dropped. The server altered its sender")


def test_a_room_key_or_message_that_is_not_well_formed_is_dropped_visibly(
    connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = team(connect, "alice", "bob")
    rewrite_sent_frames(monkeypatch, "message_encrypted", lambda f: [{**f, "ciphertext": "%%%"}, f])
    alice.send("#team", "the good copy").result(10)
    seen = quiet(bob)
    assert [e.text for e in seen if isinstance(e, Message)] == ["the good copy"]
    [dropped] = [e for e in seen if isinstance(e, FrameDropped)]
    assert dropped.detail == (
        "the server sent an encrypted room message in #team from alice whose ciphertext is not "
        "base64; it was dropped"
    )


def test_room_messages_the_server_drops_show_as_missing(
    connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = team(connect, "alice", "bob")
    relayed = [0]

    def drop_two_of_three(frame: dict) -> list[dict]:
        relayed[0] += 1
        return [frame] if relayed[0] % 3 == 1 else []

    rewrite_sent_frames(monkeypatch, "message_encrypted", drop_two_of_three)
    for n in range(4):
        alice.send("#team", f"line {n}").result(10)
    seen = quiet(bob)
    assert [e.text for e in seen if isinstance(e, Message)] == ["line 0", "line 3"]
    [gap] = [e for e in seen if isinstance(e, RoomWarning)]
    assert (gap.kind, gap.user) == ("missing", "alice")
    assert gap.detail == "2 messages from alice in #team are missing"
