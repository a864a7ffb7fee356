"""The server side of end-to-end encrypted rooms, over real TLS: room modes chosen at creation
(#lobby plain), `say` refused where messages must be encrypted and `say_encrypted` where they must
not, message_encrypted stamped by the server and fanned out like a message, history that is
ciphertext only (in memory and in the store file), modes that outlive a restart, and malformed
frames that cost at most the connection."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import vodozemac

from securechat.megolm.envelope import MAX_CIPHERTEXT
from securechat.server import Server
from securechat.server.store import MIGRATIONS, HistoryRow, SQLiteStore

from .conftest import start_server
from .raw import RawTLS

SESSION = "sEsSiOn+/=_-0123456789"  # every character a session id may hold
TOO_MANY_ERRORS = "too many protocol errors"


def ciphertext(tag: str = "x") -> str:
    return base64.b64encode(f"megolm message {tag}".encode()).decode()


def logged_in(server: Server, certs_dir: Path, make_identity, user: str) -> tuple[RawTLS, str]:
    """A raw client logged in as `user`, in #lobby, and the device id it logged in as."""
    raw = RawTLS(server.address, certs_dir / "ca.pem")
    device = raw.login(user, make_identity(user))["device"]
    assert raw.frame_of("joined")["room"] == "#lobby"
    assert raw.frame_of("queue_end") == {"type": "queue_end", "count": 0}  # the end of the login
    return raw, device


def raw_user(server: Server, certs_dir: Path, make_identity, user: str) -> RawTLS:
    return logged_in(server, certs_dir, make_identity, user)[0]


def request(raw: RawTLS, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a request and return its reply (ok or error); the events before it stay to be read."""
    raw.send_frame(frame)
    return raw.reply_to(frame["id"])


def join(raw: RawTLS, room: str, request_id: int = 1, **flags: bool) -> dict[str, Any]:
    return request(raw, {"type": "join", "id": request_id, "room": room, **flags})


def say_encrypted(raw: RawTLS, room: str, text: str, request_id: int = 2) -> dict[str, Any]:
    frame = {"type": "say_encrypted", "id": request_id, "room": room}
    return request(raw, {**frame, "session_id": SESSION, "ciphertext": ciphertext(text)})


def error(request_id: int, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "id": request_id}


# -- modes ----------------------------------------------------------------------------------------


def test_a_new_room_is_encrypted_unless_made_plain_and_the_lobby_is_plain(
    server, certs_dir, make_identity
) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        assert join(alice, "#team") == {
            "type": "ok", "id": 1, "room": "#team", "mode": "encrypted",
            "members": ["alice"], "count": 1,
        }  # fmt: skip
        made = join(alice, "#open", 2, create=True, plain=True)
        assert (made["type"], made["mode"]) == ("ok", "plain")
        assert join(alice, "#new", 3, create=True)["mode"] == "encrypted"
        assert join(alice, "#lobby", 4)["mode"] == "plain"
        # Joining a room again tells its mode as it is.
        assert join(alice, "#team", 5)["mode"] == "encrypted"


def test_create_of_a_room_the_server_knows_is_refused(server, certs_dir, make_identity) -> None:
    with (
        raw_user(server, certs_dir, make_identity, "alice") as alice,
        raw_user(server, certs_dir, make_identity, "bob") as bob,
    ):
        join(alice, "#team")
        assert join(bob, "#team", 7, create=True) == error(
            7, "room_exists", "#team already exists: /join #team"
        )
        assert join(bob, "#team", 8, create=True, plain=True) == error(
            8, "room_exists", "#team already exists: /join #team"
        )
        assert join(bob, "#lobby", 9, create=True) == error(
            9, "room_exists", "#lobby already exists: /join #lobby"
        )
        # Refused, bob is not in it; a plain join still works and tells the room's own mode.
        assert request(bob, {"type": "who", "id": 10, "room": "#team"})["members"] == ["alice"]
        assert join(bob, "#team", 11)["mode"] == "encrypted"


def test_plain_without_create_is_a_bad_frame(server, certs_dir, make_identity) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        assert join(alice, "#team", 3, plain=True) == error(
            3, "bad_frame", '"plain" chooses the mode of a new room: send it with "create": true'
        )
        assert join(alice, "#team", 4, create="yes") == error(
            4, "bad_field", 'field "create" must be true or false'
        )
        # Nothing was made: the room is made encrypted by the next join.
        assert join(alice, "#team", 5)["mode"] == "encrypted"


def test_rooms_and_who_tell_each_rooms_mode(server, certs_dir, make_identity) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        join(alice, "#team")
        join(alice, "#open", 2, create=True, plain=True)
        assert request(alice, {"type": "rooms", "id": 3})["rooms"] == [
            {"name": "#lobby", "members": 1, "mode": "plain"},
            {"name": "#open", "members": 1, "mode": "plain"},
            {"name": "#team", "members": 1, "mode": "encrypted"},
        ]
        assert request(alice, {"type": "who", "id": 4, "room": "#team"}) == {
            "type": "ok", "id": 4, "room": "#team", "mode": "encrypted",
            "members": ["alice"], "count": 1,
        }  # fmt: skip
        assert request(alice, {"type": "who", "id": 5, "room": "#open"})["mode"] == "plain"


def test_an_empty_room_is_forgotten_unless_it_has_history(server, certs_dir, make_identity) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        join(alice, "#quiet")
        join(alice, "#kept", 2)
        assert say_encrypted(alice, "#kept", "kept", 3)["type"] == "ok"
        for i, room in enumerate(("#quiet", "#kept"), start=4):
            assert request(alice, {"type": "part", "id": i, "room": room})["type"] == "ok"
        # Nobody in it and nothing said: gone, so it may be made again, plain this time.
        assert join(alice, "#quiet", 6, create=True, plain=True)["mode"] == "plain"
        # Its encrypted history is kept: the room stays encrypted and known.
        assert join(alice, "#kept", 7, create=True, plain=True) == error(
            7, "room_exists", "#kept already exists: /join #kept"
        )
        assert join(alice, "#kept", 8)["mode"] == "encrypted"


# -- sending --------------------------------------------------------------------------------------


def test_say_in_an_encrypted_room_is_refused(server, certs_dir, make_identity) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        join(alice, "#team")
        said = request(alice, {"type": "say", "id": 2, "room": "#team", "text": "in clear"})
        assert said == error(
            2,
            "room_encrypted",
            "#team is end-to-end encrypted: messages there must be encrypted by the client "
            "(say_encrypted)",
        )
        # Refused, not a strike: the connection goes on.
        assert say_encrypted(alice, "#team", "sealed", 3)["type"] == "ok"


def test_say_encrypted_in_a_plain_room_or_outside_the_room_is_refused(
    server, certs_dir, make_identity
) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        assert say_encrypted(alice, "#lobby", "x", 1) == error(
            1, "room_plain", "#lobby is not end-to-end encrypted: send say"
        )
        join(alice, "#open", 2, create=True, plain=True)
        assert say_encrypted(alice, "#open", "x", 3) == error(
            3, "room_plain", "#open is not end-to-end encrypted: send say"
        )
        assert say_encrypted(alice, "#elsewhere", "x", 4) == error(
            4, "not_in_room", "you are not in #elsewhere"
        )
        # The plain room still takes plain messages.
        assert request(alice, {"type": "say", "id": 5, "room": "#open", "text": "hi"})["type"] == (
            "ok"
        )


def test_message_encrypted_reaches_every_member_stamped_by_the_server(
    server, certs_dir, make_identity
) -> None:
    alice, device = logged_in(server, certs_dir, make_identity, "alice")
    with (
        alice,
        raw_user(server, certs_dir, make_identity, "bob") as bob,
        raw_user(server, certs_dir, make_identity, "carol") as carol,
    ):
        for i, raw in enumerate((alice, bob), start=1):
            join(raw, "#team", i)
        forged = {
            "type": "say_encrypted", "id": 9, "room": "#team", "session_id": SESSION,
            "ciphertext": ciphertext("one"), "from": "bob", "device": "AAAAAAAAAAAAAAAA",
            "ts": 1,
        }  # fmt: skip
        reply = request(alice, forged)
        assert reply == {"type": "ok", "id": 9, "room": "#team", "ts": reply["ts"]}
        # Every member, the sender too (as with say), gets the same frame: the server's from,
        # device and ts, never the ones the client wrote.
        expected = {
            "type": "message_encrypted", "room": "#team", "from": "alice", "device": device,
            "session_id": SESSION, "ciphertext": ciphertext("one"), "ts": reply["ts"],
        }  # fmt: skip
        assert bob.frame_of("message_encrypted") == expected
        assert alice.frame_of("message_encrypted") == expected
        # carol is not in #team: the first message she gets is what follows in the lobby.
        request(alice, {"type": "say", "id": 10, "room": "#lobby", "text": "after"})
        got = carol.frame()
        while got["type"] not in ("message", "message_encrypted"):  # presence, queue_end
            got = carol.frame()
        assert (got["type"], got["text"]) == ("message", "after")


# -- history --------------------------------------------------------------------------------------


def kept(device: str, text: str, ts: int) -> dict[str, Any]:
    """A message_encrypted of alice's as history returns it."""
    return {
        "type": "message_encrypted", "room": "#team", "from": "alice", "device": device,
        "session_id": SESSION, "ciphertext": ciphertext(text), "ts": ts, "history": True,
    }  # fmt: skip


def test_history_on_join_and_the_history_request_return_the_ciphertext(
    server, certs_dir, make_identity
) -> None:
    alice, device = logged_in(server, certs_dir, make_identity, "alice")
    with alice, raw_user(server, certs_dir, make_identity, "bob") as bob:
        join(alice, "#team")
        sent = [say_encrypted(alice, "#team", text, i) for i, text in enumerate("ab", start=2)]
        history = [kept(device, text, ok["ts"]) for text, ok in zip("ab", sent, strict=True)]
        bob.send_frame({"type": "join", "id": 1, "room": "#team"})
        # Before the joined event and the reply: what was said, as it was relayed, marked history.
        assert [bob.frame(), bob.frame()] == history
        assert bob.frame()["type"] == "joined"
        assert bob.frame_of("ok")["mode"] == "encrypted"
        reply = request(bob, {"type": "history", "id": 2, "room": "#team"})
        assert reply == {"type": "ok", "id": 2, "room": "#team", "messages": history}
        one = request(bob, {"type": "history", "id": 3, "room": "#team", "limit": 1})
        assert one["messages"] == history[1:]


def test_the_store_holds_the_ciphertext_and_never_the_text(
    certs_dir, tmp_path, make_identity
) -> None:
    # A real Megolm message: the words inside must appear nowhere in the server's files.
    session = vodozemac.GroupSession()
    sealed = base64.b64encode(session.encrypt(b"marmalade zeppelin quokka").to_bytes()).decode()
    data = tmp_path / "data"
    server = start_server(certs_dir, data)
    try:
        alice, device = logged_in(server, certs_dir, make_identity, "alice")
        with alice:
            join(alice, "#team")
            frame = {"type": "say_encrypted", "id": 2, "room": "#team"}
            fields = {"session_id": session.session_id, "ciphertext": sealed}
            assert request(alice, {**frame, **fields})["type"] == "ok"
    finally:
        server.stop()
    with sqlite3.connect(data / "securechat.db") as db:
        rows = db.execute(
            "SELECT room, sender, text, device, session_id FROM room_history ORDER BY seq"
        ).fetchall()
        modes = db.execute("SELECT room, mode FROM room_modes").fetchall()
    assert rows == [("#team", "alice", sealed, device, session.session_id)]
    assert modes == [("#team", "encrypted")]
    files = b"".join(p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file())
    assert sealed.encode() in files
    for word in (b"marmalade", b"zeppelin", b"quokka"):
        assert word not in files


def test_modes_and_history_survive_a_restart_on_the_same_store(
    certs_dir, tmp_path, make_identity
) -> None:
    data = tmp_path / "data"
    server = start_server(certs_dir, data)
    try:
        with raw_user(server, certs_dir, make_identity, "alice") as alice:
            join(alice, "#team")
            said = say_encrypted(alice, "#team", "before the restart", 2)
            join(alice, "#open", 3, create=True, plain=True)
            request(alice, {"type": "say", "id": 4, "room": "#open", "text": "plain words"})
            join(alice, "#silent", 5)  # encrypted, nothing said: nothing to remember it by
    finally:
        server.stop()
    server = start_server(certs_dir, data)
    try:
        with raw_user(server, certs_dir, make_identity, "bob") as bob:
            assert join(bob, "#team", 1, create=True) == error(
                1, "room_exists", "#team already exists: /join #team"
            )
            bob.send_frame({"type": "join", "id": 2, "room": "#team"})
            again = bob.frame()
            assert (again["type"], again["ciphertext"], again["ts"], again["history"]) == (
                "message_encrypted",
                ciphertext("before the restart"),
                said["ts"],
                True,
            )
            assert bob.frame_of("ok")["mode"] == "encrypted"
            assert join(bob, "#open", 3)["mode"] == "plain"
            assert join(bob, "#silent", 4, create=True, plain=True)["mode"] == "plain"
            refused = request(bob, {"type": "say", "id": 5, "room": "#team", "text": "in clear"})
            assert refused["code"] == "room_encrypted"
    finally:
        server.stop()


def test_an_older_store_is_migrated_and_its_rooms_are_plain(
    certs_dir, tmp_path, make_identity, monkeypatch
) -> None:
    path = tmp_path / "data" / "securechat.db"
    with monkeypatch.context() as old_code:
        old_code.setattr("securechat.server.store.MIGRATIONS", MIGRATIONS[:4])
        old = SQLiteStore(path)
        assert old.schema_version == 4
        # History as version 4 wrote it: plaintext, since no room was encrypted then.
        old._db.execute(
            "INSERT INTO room_history (room, sender, text, ts, action) "
            "VALUES ('#old', 'alice', 'said in clear', 1000, 1)"
        )
        old.close()
    store = SQLiteStore(path)
    assert store.schema_version == len(MIGRATIONS) == 5
    assert store.room_modes() == {"#old": "plain"}
    assert store.room_history("#old", 10) == [
        HistoryRow("#old", "alice", "said in clear", 1000, True, "", "")
    ]
    store.close()
    server = start_server(certs_dir, path.parent)
    try:
        with raw_user(server, certs_dir, make_identity, "bob") as bob:
            bob.send_frame({"type": "join", "id": 1, "room": "#old"})
            assert bob.frame() == {
                "type": "message", "room": "#old", "from": "alice", "text": "said in clear",
                "ts": 1000, "action": True, "history": True,
            }  # fmt: skip
            assert bob.frame_of("ok")["mode"] == "plain"
            said = request(bob, {"type": "say", "id": 2, "room": "#old", "text": "hi"})
            assert said["type"] == "ok"
    finally:
        server.stop()


# -- limits and malformed frames ------------------------------------------------------------------


@pytest.mark.server_config(rate=0.001, burst=3)
def test_say_and_say_encrypted_spend_from_one_bucket(server, certs_dir, make_identity) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        join(alice, "#team")  # one token
        assert request(alice, {"type": "say", "id": 2, "room": "#lobby", "text": "hi"})["type"] == (
            "ok"
        )
        assert say_encrypted(alice, "#team", "x", 3)["type"] == "ok"
        refused = say_encrypted(alice, "#team", "y", 4)
        assert (refused["code"], refused["message"]) == (
            "rate_limited",
            "slow down: the limit is 0.001 requests a second, in bursts of at most 3; this one "
            "was not sent",
        )


@pytest.mark.server_config(max_frame=2048)
def test_a_ciphertext_too_large_to_relay_is_refused_as_too_large(
    server, certs_dir, make_identity
) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        join(alice, "#team")
        frame = {"type": "say_encrypted", "id": 2, "room": "#team", "session_id": SESSION}
        big = base64.b64encode(bytes(1200)).decode()  # 1,600 characters: fits a 2 KiB request
        assert request(alice, {**frame, "ciphertext": big}) == error(
            2,
            "too_large",
            "this encrypted message is too large to relay in one frame here; send a shorter one",
        )
        assert say_encrypted(alice, "#team", "short", 3)["type"] == "ok"


SESSION_RULE = 'field "session_id" must be 1 to 128 characters of A-Z a-z 0-9 + / = _ -'
TOO_BIG = base64.b64encode(bytes(MAX_CIPHERTEXT + 1)).decode()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ciphertext": "bm90IGJhc2U2NA"}, 'field "ciphertext" is not valid base64'),
        ({"ciphertext": "AB=="}, 'field "ciphertext" is not valid base64'),
        ({"ciphertext": "QUJD\n"}, 'field "ciphertext" is not valid base64'),
        ({"ciphertext": "QUJD-_=="}, 'field "ciphertext" is not valid base64'),
        ({"ciphertext": ""}, 'field "ciphertext" must not be empty'),
        ({"ciphertext": 5}, 'field "ciphertext" must be a base64 string'),
        ({"ciphertext": TOO_BIG}, f'field "ciphertext" must decode to at most {MAX_CIPHERTEXT} '
                                  "bytes"),
        ({"session_id": ""}, SESSION_RULE),
        ({"session_id": "a" * 129}, SESSION_RULE),
        ({"session_id": "not a session"}, SESSION_RULE),
        ({"session_id": None}, 'field "session_id" is missing'),
    ],
)  # fmt: skip
def test_a_malformed_say_encrypted_is_refused_and_costs_at_most_the_connection(
    server, certs_dir, make_identity, fields, message
) -> None:
    with raw_user(server, certs_dir, make_identity, "alice") as alice:
        join(alice, "#team")
        frame = {"type": "say_encrypted", "room": "#team", "session_id": SESSION,
                 "ciphertext": ciphertext(), **fields}  # fmt: skip
        frame = {k: v for k, v in frame.items() if v is not None}
        for i in range(1, 5):  # four strikes: refused each time, still connected
            assert request(alice, {**frame, "id": 100 + i}) == error(100 + i, "bad_field", message)
        assert say_encrypted(alice, "#team", "fine", 9)["type"] == "ok"
        alice.send_frame({**frame, "id": 200})  # the fifth strike closes it
        frames = alice.until_closed()
        assert [f for f in frames if f["type"] == "error"] == frames[-1:]
        assert frames[-1] == error(200, "bad_field", message)
    with raw_user(server, certs_dir, make_identity, "bob") as bob:  # the server is fine
        assert join(bob, "#team")["mode"] == "encrypted"
