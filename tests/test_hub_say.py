"""The hub's say path, the one every room message takes: its "ok" (made from a template) is the
bytes a JSON encode would give, and what it keeps as history and hands the store."""

from __future__ import annotations

import pytest

from securechat import framing
from securechat.errors import ProtocolError
from securechat.protocol import Say
from securechat.server.hub import Hub
from tests.test_big_rooms import crowd


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
