"""Batched requests through the real server over TLS: `dms` (envelopes for many devices in one
request, one result each) and `claim_prekeys` for many users at once."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from securechat import identity, protocol
from securechat.client import RequestError, dm
from securechat.client.events import DeviceWarning, Parted
from securechat.errors import ProtocolError, StorageError
from securechat.framing import MAX_FRAME_DEFAULT
from securechat.protocol import DM, DMS_MAX, ClaimPrekeys, DMs
from securechat.server import Server, requests

from .conftest import Connect, close_and_see_it_part, wait_for
from .raw import RawTLS
from .test_rooms_e2e import enter, said

NOBODY_DEVICE = "AAAAAAAAAAAAAAAA"
SENDER_DEVICE = "SENDERSENDERSEND"
DATA = base64.b64encode(b"\x02opaque olm envelope").decode()


@pytest.fixture
def raw(
    server: Server, certs_dir: Path, make_identity: Callable[[str], identity.Identity]
) -> Iterator[Callable[[str], RawTLS]]:
    """`raw("alice")`: a raw TLS connection logged in as alice's device SENDER_DEVICE."""
    opened: list[RawTLS] = []

    def login(user: str) -> RawTLS:
        conn = RawTLS(server.address, certs_dir / "ca.pem")
        opened.append(conn)
        conn.login(user, make_identity(user), SENDER_DEVICE)
        return conn

    try:
        yield login
    finally:
        for conn in opened:
            conn.close()


def item(user: str, device: str, msg_id: str, to: str | None = None, data: str = DATA) -> dict:
    return {"to": to or user, "user": user, "device": device, "msg_id": msg_id, "data": data}


def queued_rows(server: Server, sender: str) -> list[tuple[str, str, str]]:
    """What the server's sqlite file holds from `sender`, read through a connection of its own."""
    db = sqlite3.connect(server.config.data_dir / "securechat.db")
    try:
        return db.execute(
            "SELECT recipient, recipient_device, msg_id FROM device_queue WHERE sender = ?"
            " ORDER BY seq",
            (sender,),
        ).fetchall()
    finally:
        db.close()


def ask(conn: RawTLS, request_id: int, ftype: str, **fields: Any) -> dict[str, Any]:
    conn.send_frame({"type": ftype, "id": request_id, **fields})
    return conn.reply_to(request_id)


def test_dms_answers_each_envelope_in_order_and_stores_them_before_the_reply(
    device: Connect, server: Server, raw: Callable[[str], RawTLS]
) -> None:
    bob, carol_laptop, carol_phone = (
        device("bob", "one"),
        device("carol", "l"),
        device("carol", "p"),
    )
    dave = device("dave", "one")
    close_and_see_it_part(dave, bob)
    carol_laptop.revoke_device(carol_phone.device_id)
    alice = raw("alice")
    messages = [
        item("bob", bob.device_id, "m-online"),
        item("dave", dave.device_id, "m-offline"),
        item("bob", NOBODY_DEVICE, "m-unknown"),
        item("carol", carol_phone.device_id, "m-revoked"),
        item("nobody", NOBODY_DEVICE, "m-nobody"),
        item("carol", carol_laptop.device_id, "m-astray", to="bob"),
        item("carol", carol_laptop.device_id, "m-carol-1"),
    ]
    reply = ask(alice, 7, "dms", messages=messages)
    # Read at once, by another connection: the reply comes only after the commit.
    rows = queued_rows(server, "alice")
    assert isinstance(reply.pop("ts"), int)
    assert reply == {
        "type": "ok",
        "id": 7,
        "results": [
            {"msg_id": "m-online", "status": "delivered"},
            {"msg_id": "m-offline", "status": "queued"},
            {
                "msg_id": "m-unknown",
                "status": "error",
                "code": "no_such_device",
                "message": f"bob has no device {NOBODY_DEVICE}",
            },
            {
                "msg_id": "m-revoked",
                "status": "error",
                "code": "device_revoked",
                "message": f"carol's device {carol_phone.device_id} was revoked",
            },
            {
                "msg_id": "m-nobody",
                "status": "error",
                "code": "no_such_user",
                "message": "nobody is called nobody",
            },
            {
                "msg_id": "m-astray",
                "status": "error",
                "code": "bad_field",
                "message": 'field "user" must be "to" or yourself (a copy for your other devices)',
            },
            {"msg_id": "m-carol-1", "status": "delivered"},
        ],
    }
    assert rows == [
        ("bob", bob.device_id, "m-online"),
        ("dave", dave.device_id, "m-offline"),
        ("carol", carol_laptop.device_id, "m-carol-1"),
    ]


def test_a_dms_item_too_large_to_relay_is_refused_alone(
    device: Connect, server: Server, raw: Callable[[str], RawTLS]
) -> None:
    bob = device("bob", "one")
    alice = raw("alice")
    big = "A" * 65_028  # over the 65,024 bytes a relayed envelope may hold; the frame fits
    reply = ask(
        alice,
        1,
        "dms",
        messages=[
            item("bob", bob.device_id, "m-big-one", data=big),
            item("bob", bob.device_id, "m-ok-this"),
        ],
    )
    assert reply["results"] == [
        {
            "msg_id": "m-big-one",
            "status": "error",
            "code": "too_large",
            "message": "this direct message is too large to relay; split it",
        },
        {"msg_id": "m-ok-this", "status": "delivered"},
    ]


@pytest.mark.server_config(dm_quota_count=2, dm_sender_share=100)
def test_the_envelopes_of_one_dms_count_towards_each_others_quota(
    device: Connect, server: Server, raw: Callable[[str], RawTLS]
) -> None:
    bob, dave = device("bob", "one"), device("dave", "one")
    close_and_see_it_part(dave, bob)
    alice = raw("alice")
    messages = [item("dave", dave.device_id, f"m-quota-{i}") for i in range(3)]
    results = ask(alice, 1, "dms", messages=messages)["results"]
    assert [r["status"] for r in results] == ["queued", "queued", "error"]
    assert results[2]["code"] == "quota_exceeded"
    assert results[2]["message"].startswith(
        f"dave's queue of waiting messages for device {dave.device_id} is full (2 messages"
    )
    assert [r[2] for r in queued_rows(server, "alice")] == ["m-quota-0", "m-quota-1"]


@pytest.mark.server_config(rate=0.001, burst=1, dm_sender_share=100)
def test_a_dms_of_many_envelopes_costs_one_request_of_the_rate(
    device: Connect, server: Server, raw: Callable[[str], RawTLS]
) -> None:
    bob = device("bob", "one")
    alice = raw("alice")
    messages = [item("bob", bob.device_id, f"m-rate-{i:03}") for i in range(50)]
    reply = ask(alice, 1, "dms", messages=messages)
    assert [r["status"] for r in reply["results"]] == ["delivered"] * 50
    refused = ask(alice, 2, "dms", messages=messages[:1])
    assert (refused["type"], refused["code"]) == ("error", "rate_limited")


BAD_DMS = [
    ([], 'field "messages" must be a list of 1 to 256 messages'),
    ([item("bob", NOBODY_DEVICE, f"m-many-{i:03}") for i in range(257)],
     'field "messages" must be a list of 1 to 256 messages'),
    (["x"], 'field "messages[0]" must be an object'),
    ([item("bob", NOBODY_DEVICE, "m-ok-one"), {"to": "bob", "user": "bob", "device": NOBODY_DEVICE,
      "msg_id": "m-no-data"}], 'field "messages[1].data" is missing'),
    ([item("bob", "phone", "m-bad-dev")],
     'field "messages[0].device" must be a device id: 16 characters of A-Z and 2-7'),
    ([item("bob", NOBODY_DEVICE, "m-twice-1"), item("bob", NOBODY_DEVICE, "m-twice-1")],
     'field "messages[1]" repeats the user, device and msg_id of an earlier message'),
]  # fmt: skip


@pytest.mark.parametrize(("messages", "why"), BAD_DMS)
def test_a_malformed_dms_is_refused_whole_with_a_clear_error(
    server: Server, raw: Callable[[str], RawTLS], messages: list, why: str
) -> None:
    alice = raw("alice")
    assert ask(alice, 3, "dms", messages=messages) == {
        "type": "error",
        "code": "bad_field",
        "message": why,
        "id": 3,
    }
    assert queued_rows(server, "alice") == []


# -- claim_prekeys for many users ------------------------------------------------------------------


def test_claim_prekeys_for_many_users_in_one_request(
    device: Connect, server: Server, raw: Callable[[str], RawTLS]
) -> None:
    bob_one, bob_two, carol = device("bob", "one"), device("bob", "two"), device("carol", "one")
    alice = raw("alice")
    users = {"bob": None, "carol": [carol.device_id], "nobody": None}
    reply = ask(alice, 4, "claim_prekeys", users=users)
    assert (reply["type"], reply["id"], sorted(reply["users"])) == (
        "ok",
        4,
        ["bob", "carol", "nobody"],
    )
    keys = reply["users"]
    assert sorted(keys["bob"]) == sorted([bob_one.device_id, bob_two.device_id])
    assert list(keys["carol"]) == [carol.device_id]
    assert keys["nobody"] == {}
    for user, found in keys.items():
        for device_id, prekey in found.items():
            assert (prekey["user"], prekey["device_id"], prekey["fallback"]) == (
                user,
                device_id,
                False,
            )
    again = ask(alice, 5, "claim_prekeys", users={"carol": None})["users"]["carol"]
    assert again[carol.device_id]["key_id"] != keys["carol"][carol.device_id]["key_id"]
    single = ask(alice, 6, "claim_prekeys", user="carol")
    assert (sorted(single), single["user"], list(single["keys"])) == (
        ["id", "keys", "type", "user"],
        "carol",
        [carol.device_id],
    )


def test_a_claim_for_too_many_devices_is_refused_and_takes_no_key(
    device: Connect, server: Server, raw: Callable[[str], RawTLS], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "CLAIM_DEVICES_MAX", 2)
    device("bob", "one"), device("bob", "two")
    carol = device("carol", "one")
    count = server._worker.submit  # the store belongs to its worker thread
    before = count(server.store.prekey_count, "carol", carol.device_id).result(5)
    alice = raw("alice")
    reply = ask(alice, 8, "claim_prekeys", users={"bob": None, "carol": None})
    assert reply == {
        "type": "error",
        "code": "too_large",
        "message": "this claim is for 3 devices; one request may claim prekeys for at most 2 "
        "(split it)",
        "id": 8,
    }
    assert count(server.store.prekey_count, "carol", carol.device_id).result(5) == before
    assert len(ask(alice, 9, "claim_prekeys", users={"carol": None})["users"]["carol"]) == 1


BAD_CLAIMS = [
    ({"user": "bob", "users": {"bob": None}}, "bad_frame",
     'claim_prekeys takes either "user" or "users" (not both)'),
    ({}, "bad_frame", 'claim_prekeys takes either "user" or "users" (one is missing)'),
    ({"users": {"bob": None}, "devices": [NOBODY_DEVICE]}, "bad_frame",
     "\"devices\" goes with \"user\"; with \"users\", list each user's devices there"),
    ({"users": {}}, "bad_field", 'field "users" must be an object of 1 to 64 user names'),
    ({"users": {f"u{i}": None for i in range(65)}}, "bad_field",
     'field "users" must be an object of 1 to 64 user names'),
    ({"users": {"Bob": None}}, "bad_name",
     "user name may hold only a-z, 0-9 and _ . - and must start with a letter or digit"),
    ({"users": {"bob": []}}, "bad_field",
     'field "users.bob" must be a list of 1 to 64 device ids'),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "code", "why"), BAD_CLAIMS)
def test_a_malformed_claim_is_refused_with_a_clear_error(
    server: Server, raw: Callable[[str], RawTLS], fields: dict, code: str, why: str
) -> None:
    alice = raw("alice")
    assert ask(alice, 2, "claim_prekeys", **fields) == {
        "type": "error",
        "code": code,
        "message": why,
        "id": 2,
    }


# -- the client: a room key to many devices --------------------------------------------------------


class Counted:
    """How many requests of each kind the server handled (counted in its request table)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[str] = []
        self.dms_sizes: list[int] = []
        for cls in (DM, DMs, ClaimPrekeys):
            monkeypatch.setitem(requests.HANDLERS, cls, self._count(requests.HANDLERS[cls]))

    def _count(self, handler: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        def counted(conn: Any, frame: Any) -> None:
            if conn.user == "alice":
                self.seen.append(frame.TYPE)
                if isinstance(frame, DMs):
                    self.dms_sizes.append(len(frame.messages))
            handler(conn, frame)

        return counted

    def take(self) -> list[str]:
        seen, self.seen = sorted(self.seen), []
        return seen


def test_a_rotation_to_many_devices_goes_out_in_one_request_and_every_member_reads_it(
    device: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = device("alice", "laptop")
    members = [device(name, "one") for name in ("bob", "carol", "dave", "erin", "frank", "gus")]
    bob_phone = device("bob", "phone")
    everyone = [alice, *members, bob_phone]
    for i, client in enumerate(everyone[:-1]):
        enter("#team", client, *everyone[:i])
    enter("#team", bob_phone, alice, *members[1:])  # bob's other device sees no join of his
    counted = Counted(monkeypatch)
    alice.send("#team", "first words").result(10)
    # One claim for the seven devices alice has no session with, one dms for their keys.
    assert counted.take() == ["claim_prekeys", "dms"] and counted.dms_sizes == [7]
    for reader in everyone[1:]:
        assert wait_for(reader, said("#team", "alice", "first words")).encrypted
    gus = members.pop()
    gus.part("#team").result(10)
    wait_for(alice, lambda e: isinstance(e, Parted) and e.user == "gus")
    alice.send("#team", "after gus left").result(10)
    # The new session's key: one request for the six devices left, no claim (sessions exist).
    assert counted.take() == ["dms"] and counted.dms_sizes == [7, 6]
    for reader in [*members, bob_phone]:
        assert wait_for(reader, said("#team", "alice", "after gus left")).encrypted


def test_a_device_revoked_since_alice_listed_it_costs_only_its_own_key(
    device: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's list of carol's devices predates the revocation of carol's phone: the server
    refuses that one key of the batch, alice is told, and everyone else reads the message."""
    alice, bob = device("alice", "laptop"), device("bob", "one")
    carol, phone, dave = device("carol", "laptop"), device("carol", "phone"), device("dave", "one")
    enter("#team", alice)
    enter("#team", bob, alice)
    enter("#team", carol, alice, bob)
    enter("#team", phone, alice, bob)
    enter("#team", dave, alice, bob, carol)
    alice.send("#team", "before").result(10)
    carol.revoke_device(phone.device_id)
    dave.part("#team").result(10)  # the next message starts a new session
    wait_for(alice, lambda e: isinstance(e, Parted) and e.user == "dave")
    counted = Counted(monkeypatch)
    alice.send("#team", "after the revocation").result(10)
    # bob's, carol's laptop's and the phone's keys in one request; only the phone's refused.
    assert counted.take() == ["dms"] and counted.dms_sizes == [3]
    lost = wait_for(alice, lambda e: isinstance(e, DeviceWarning))
    assert lost == DeviceWarning(
        "carol",
        f"a room key for carol's device {phone.device_id} was lost: carol's device "
        f"{phone.device_id} was revoked",
    )
    for reader in (bob, carol):
        assert wait_for(reader, said("#team", "alice", "after the revocation")).encrypted


# -- packing: how the client splits what it sends --------------------------------------------


def room_key_item(i: int) -> dict[str, Any]:
    """The `dms` item of one room key as the client makes it: 1,596 bytes of base64 envelope."""
    return item(f"user{i:03}", NOBODY_DEVICE, f"room-key-{i:03}", data="A" * 1596)


def test_a_rotation_to_500_devices_packs_into_14_frames_that_fit() -> None:
    items = [room_key_item(i) for i in range(500)]
    batches = dm._batches(items, MAX_FRAME_DEFAULT, DMS_MAX)
    assert [len(b) for b in batches] == [38] * 13 + [6]
    assert [m for b in batches for m in b] == items
    for batch in batches:
        frame = {"type": "dms", "id": 2**53 - 1, "messages": batch, "resume": True}
        assert len(json.dumps(frame)) <= MAX_FRAME_DEFAULT


def test_small_envelopes_are_packed_by_the_count_limit() -> None:
    items = [item(f"user{i:03}", NOBODY_DEVICE, f"small-{i:03}") for i in range(300)]
    assert [len(b) for b in dm._batches(items, MAX_FRAME_DEFAULT, DMS_MAX)] == [256, 44]


def target(user: str, n: int) -> Any:
    return SimpleNamespace(user=user, device_id=f"{n:016d}")


def test_prekey_claims_are_split_by_users_and_devices() -> None:
    one_each = [target(f"user{i:03}", 0) for i in range(150)]
    assert [len(c) for c in dm._claims(one_each, 128)] == [64, 64, 22]
    many = [target("bob", i) for i in range(200)]
    assert [len(c) for c in dm._claims(many, 128)] == [128, 72]
    assert dm._claims([], 128) == []


def test_a_claim_names_as_many_devices_as_the_frame_holds_prekeys_for() -> None:
    assert [protocol.claim_devices_max(f) for f in (1024, 4096, 16384, 65536, 1 << 24)] == [
        1,
        5,
        35,
        128,
        128,
    ]


def test_each_item_of_a_dms_hears_its_own_result() -> None:
    reply: Future[dict[str, Any]] = Future()
    items: list[Future[dict[str, Any]]] = [Future(), Future()]
    reply.set_result(
        {
            "results": [
                {"msg_id": "m-first1", "status": "queued"},
                {"msg_id": "m-second", "status": "error", "code": "no_such_device",
                 "message": "bob has no device AAAAAAAAAAAAAAAA"},
            ]
        }
    )  # fmt: skip
    dm._split(reply, items)
    assert items[0].result() == {"msg_id": "m-first1", "status": "queued"}
    refused = items[1].exception()
    assert isinstance(refused, RequestError)
    assert (refused.code, refused.message) == (
        "no_such_device",
        "bob has no device AAAAAAAAAAAAAAAA",
    )


def test_a_dms_answer_with_too_few_results_fails_every_item() -> None:
    reply: Future[dict[str, Any]] = Future()
    items: list[Future[dict[str, Any]]] = [Future(), Future()]
    reply.set_result({"results": [{"status": "delivered"}]})
    dm._split(reply, items)
    for future in items:
        exc = future.exception()
        assert isinstance(exc, ProtocolError)
        assert (exc.code, exc.message) == (
            "bad_frame",
            "the server's answer to a dms was malformed",
        )


def test_a_store_failure_amid_a_dms_stores_none_of_it_and_closes_the_connection(
    device: Connect, server: Server, raw: Callable[[str], RawTLS], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob, dave = device("bob", "one"), device("dave", "one")
    real = server.store.queue_envelope

    def failing_disk(env: Any, **limits: Any) -> None:
        # A disk that fails on demand cannot be made; the store raises what SQLite would give.
        if env.recipient == "dave":
            raise StorageError("server database error: disk I/O error")
        real(env, **limits)

    monkeypatch.setattr(server.store, "queue_envelope", failing_disk)
    alice = raw("alice")
    messages = [item("bob", bob.device_id, "m-stored1"), item("dave", dave.device_id, "m-failed")]
    assert ask(alice, 5, "dms", messages=messages) == {
        "type": "error",
        "code": "server_error",
        "message": "server storage error",
        "id": 5,
    }
    # Then the server closes; before the error came only its login frames, which wait unread.
    assert sorted(f["type"] for f in alice.until_closed()) == ["joined", "queue_end"]
    assert queued_rows(server, "alice") == []  # bob's envelope went with the failed transaction
