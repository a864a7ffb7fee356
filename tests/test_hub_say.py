"""The hub's say path, the one every room message takes: its "ok" (made from a template) is the
bytes a JSON encode would give, and what it keeps as history and hands the store."""

from __future__ import annotations

import json

import pytest

from securechat import framing
from securechat.errors import ProtocolError
from securechat.protocol import History, Join, Say, SayEncrypted
from securechat.server.hub import Hub
from tests.test_big_rooms import StubConn, crowd


def test_a_say_reply_is_the_bytes_json_would_give() -> None:
    hub = Hub()
    loop, (ann, _) = crowd(hub, ["ann", "bob"])
    reply = hub.say(ann, Say(id=41, room="#lobby", text="hi"))  # type: ignore[arg-type]
    heard = loop.frames["bob"][-1]
    assert heard == {"type": "message", "room": "#lobby", "from": "ann", "text": "hi",
                     "ts": heard["ts"]}  # fmt: skip
    ok = {"type": "ok", "id": 41, "room": "#lobby", "ts": heard["ts"]}
    assert reply == framing.encode(ok)
    # handle() answers the same request with the same fields (the path tests and tools use).
    again = hub.handle(ann, Say(id=42, room="#lobby", text="again"))  # type: ignore[arg-type]
    assert again == {**ok, "id": 42, "ts": loop.frames["bob"][-1]["ts"]}


def test_a_say_outside_the_room_is_refused_as_before() -> None:
    hub = Hub()
    _, (ann,) = crowd(hub, ["ann"])
    with pytest.raises(ProtocolError) as refused:
        hub.say(ann, Say(id=1, room="#elsewhere", text="hi"))  # type: ignore[arg-type]
    assert (refused.value.code, refused.value.message) == (
        "not_in_room",
        "you are not in #elsewhere",
    )


def test_history_keeps_the_message_as_sent_marked_history() -> None:
    rows: list[tuple[object, ...]] = []
    hub = Hub(history_sink=lambda row: rows.append(tuple(row)))
    loop, (ann, bob) = crowd(hub, ["ann", "bob"])
    hub.say(ann, Say(id=1, room="#lobby", text="one", action=True))  # type: ignore[arg-type]
    sent = loop.frames["bob"][-1]
    reply = hub.handle(bob, History(id=2, room="#lobby"))  # type: ignore[arg-type]
    assert reply["messages"] == [{**sent, "history": True}]
    assert rows == [("#lobby", "ann", "one", sent["ts"], True, "", "")]
    late = StubConn("cat", loop)
    hub.login(late)  # type: ignore[arg-type]
    assert loop.frames["cat"][0] == {**sent, "history": True}
    assert json.loads(framing.encode(reply)[4:])["messages"][0]["history"] is True


def test_an_encrypted_message_is_encoded_once_for_every_member(monkeypatch) -> None:
    rows: list[tuple[object, ...]] = []
    hub = Hub(history_sink=lambda row: rows.append(tuple(row)))
    loop, conns = crowd(hub, ["ann", "bob", "cat"])
    for conn in conns:
        hub.handle(conn, Join(id=1, room="#team"))  # type: ignore[arg-type]
    loop.frames.clear()
    real, encoded = framing.encode, []
    monkeypatch.setattr(
        framing, "encode", lambda frame, *a: encoded.append(frame) or real(frame, *a)
    )
    said = SayEncrypted(id=7, room="#team", session_id="s1", ciphertext="AAEC")
    reply = hub.say(conns[0], said)  # type: ignore[arg-type]
    heard = loop.frames["ann"][-1]
    assert heard == {
        "type": "message_encrypted", "room": "#team", "from": "ann", "device": "AAAAAAAAAAAAAAAA",
        "session_id": "s1", "ciphertext": "AAEC", "ts": heard["ts"],
    }  # fmt: skip
    assert [loop.frames[name] for name in ("bob", "cat")] == [[heard], [heard]]
    assert encoded == [heard]  # one encode for the room; the reply comes from the template
    assert reply == real({"type": "ok", "id": 7, "room": "#team", "ts": heard["ts"]})
    assert rows == [("#team", "ann", "AAEC", heard["ts"], False, "AAAAAAAAAAAAAAAA", "s1")]
    # A plain say there is refused, and so is an encrypted one in the plain lobby.
    with pytest.raises(ProtocolError) as refused:
        hub.say(conns[1], Say(id=8, room="#team", text="hi"))  # type: ignore[arg-type]
    assert refused.value.code == "room_encrypted"
    with pytest.raises(ProtocolError) as refused:
        hub.say(conns[1], SayEncrypted(8, "#lobby", "s1", "AAEC"))  # type: ignore[arg-type]
    assert (refused.value.code, refused.value.message) == (
        "room_plain",
        "#lobby is not end-to-end encrypted: send say",
    )
