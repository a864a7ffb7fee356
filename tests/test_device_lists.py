"""One `devices` request for many users: the server's exact replies, its limits and refusals, and
a client that joins a big encrypted room with a handful of requests, not one per member."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from securechat.client import Client
from securechat.client.connection import ClientConnection
from securechat.client.events import Message, RoomState
from securechat.e2e import records
from securechat.e2e.device import Device
from securechat.protocol import USERS_MAX
from securechat.server import Server

from .conftest import wait_for
from .raw import RawTLS
from .test_encrypted_rooms_server import error, join, request


def with_device(server: Server, certs_dir: Path, make_identity, user: str) -> RawTLS:
    """A raw client logged in as `user` on a device whose signed record it published."""
    ident, device = make_identity(user), Device.create()
    raw = RawTLS(server.address, certs_dir / "ca.pem")
    raw.login(user, ident, device.device_id)
    record = records.sign_device(ident, user, device).to_wire()
    assert request(raw, {"type": "publish_device", "id": 90, "record": record})["type"] == "ok"
    return raw


def one(raw: RawTLS, user: str, request_id: int = 7) -> dict[str, Any]:
    reply = request(raw, {"type": "devices", "id": request_id, "user": user})
    assert reply["type"] == "ok" and reply.pop("user") == user
    return {k: v for k, v in reply.items() if k not in ("type", "id")}


def many(raw: RawTLS, users: list[str], request_id: int = 8) -> dict[str, Any]:
    return request(raw, {"type": "devices", "id": request_id, "users": users})


def test_one_request_lists_many_users_as_one_request_each_would(
    server, certs_dir, make_identity
) -> None:
    ann, bob = (with_device(server, certs_dir, make_identity, u) for u in ("ann", "bob"))
    make_identity("cat")
    reply = many(ann, ["bob", "nobody", "ann"])
    assert reply == {
        "type": "ok",
        "id": 8,
        "users": {"bob": one(ann, "bob"), "ann": one(ann, "ann")},
        "unknown": ["nobody"],
        "more": [],
    }
    assert list(reply["users"]) == ["bob", "ann"]  # in the order asked
    assert len(reply["users"]["bob"]["devices"]) == 1
    bob.close()
    ann.close()


@pytest.mark.server_config(max_frame=4096)
def test_a_reply_stops_at_the_frame_and_names_the_rest_under_more(
    server, certs_dir, make_identity
) -> None:
    names = [f"user{i}" for i in range(8)]
    raws = [with_device(server, certs_dir, make_identity, u) for u in names]
    first = many(raws[0], names)
    answered = list(first["users"])
    assert answered == names[: len(answered)] and 1 <= len(answered) < len(names)
    assert first["more"] == names[len(answered) :] and first["unknown"] == []
    # Asked again for `more` until nothing is left, every name comes, each once, in order.
    listed, rest, request_id = answered, first["more"], 9
    while rest:
        reply = many(raws[0], rest, request_id)
        assert reply["users"], "each reply answers at least one name"
        listed, rest, request_id = listed + list(reply["users"]), reply["more"], request_id + 1
    assert listed == names
    for raw in raws:
        raw.close()


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({}, "bad_frame", 'devices takes either "user" or "users" (one is missing)'),
        (
            {"user": "ann", "users": ["ann"]},
            "bad_frame",
            'devices takes either "user" or "users" (not both)',
        ),
        (
            {"users": []},
            "bad_field",
            f'field "users" must be a list of 1 to {USERS_MAX} user names',
        ),
        (
            {"users": [f"u{i}" for i in range(USERS_MAX + 1)]},
            "bad_field",
            f'field "users" must be a list of 1 to {USERS_MAX} user names',
        ),
        (
            {"users": "ann"},
            "bad_field",
            f'field "users" must be a list of 1 to {USERS_MAX} user names',
        ),
        ({"users": ["ann", "ann"]}, "bad_field", 'field "users" must not name anyone twice'),
        (
            {"users": ["Ann!"]},
            "bad_name",
            "user name may hold only a-z, 0-9 and _ . - and must start with a letter or digit",
        ),
        ({"users": [3]}, "bad_field", 'field "users" must be a string'),
    ],
)
def test_a_malformed_devices_request_is_refused_with_its_reason(
    server, certs_dir, make_identity, fields, code, message
) -> None:
    raw = with_device(server, certs_dir, make_identity, "ann")
    reply = request(raw, {"type": "devices", "id": 5, **fields})
    assert reply == error(5, code, message)
    # The connection is still good.
    assert list(many(raw, ["ann"], 6)["users"]) == ["ann"]
    raw.close()


def test_joining_a_big_encrypted_room_fetches_its_members_in_a_handful_of_requests(
    server, certs_dir, make_identity, connect, monkeypatch
) -> None:
    names = [f"member{i:02d}" for i in range(60)]
    raws = [with_device(server, certs_dir, make_identity, u) for u in names]
    for i, raw in enumerate(raws):
        assert join(raw, "#big", 50 + i)["type"] == "ok"
    asked: Counter[str] = Counter()
    real = ClientConnection.request

    def counted(self: ClientConnection, ftype: str, **fields: Any) -> Any:
        asked[ftype] += 1
        return real(self, ftype, **fields)

    monkeypatch.setattr(ClientConnection, "request", counted)
    alice: Client = connect("alice")
    watcher: Client = connect("zed")
    asked.clear()
    alice.join("#big").result(10)
    # A line said in #lobby while the lists are fetched still arrives, in order.
    watcher.send("#lobby", "meanwhile").result(10)
    state = wait_for(alice, lambda e: isinstance(e, RoomState) and e.room == "#big")
    assert isinstance(state, RoomState)
    assert {m.user for m in state.members if m.gets_keys} == {*names, "alice"}
    assert asked["devices"] == 1, asked  # 61 names and their records fit in one reply
    got = wait_for(alice, lambda e: isinstance(e, Message) and e.text == "meanwhile")
    assert got.sender == "zed"
    for raw in raws:
        raw.close()
