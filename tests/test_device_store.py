"""The server's store for version 2 DMs, on real SQLite files: devices with their signed records
and revocations, prekeys claimed once each (also by two connections at once), one offline queue
per device with its quotas, restarts, and the migration from a version 2 database."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from securechat import identity
from securechat.e2e import prekeys, records
from securechat.e2e.device import Device
from securechat.e2e.envelope import Envelope
from securechat.errors import StorageError
from securechat.server import store as store_module
from securechat.server.devicestore import (
    DeviceConflict,
    DeviceEntry,
    DeviceEnvelope,
    DeviceStatus,
    Prekey,
    PrekeyCount,
    PrekeyRefused,
    RevokedDevice,
    TooManyDevices,
    UnknownDevice,
)
from securechat.server.store import (
    MIGRATIONS,
    DMQuota,
    HistoryRow,
    QuotaExceeded,
    SenderShareExceeded,
    SQLiteStore,
)
from tests.olm_helpers import Party, PrekeyDirectory

MakeIdentity = Callable[[str], identity.Identity]
LIMITS: dict[str, Any] = {"ttl_ms": 60_000, "quota": DMQuota(100, 100_000, 100, 100_000)}


def canonical(wire: dict[str, Any]) -> str:
    return json.dumps(wire, sort_keys=True, separators=(",", ":"))


def new_device(who: identity.Identity, user: str) -> tuple[Device, DeviceEntry]:
    """A real device and the entry its client would publish (a record signed by `who`)."""
    device = Device.create(lambda: 1_000)
    record = records.sign_device(who, user, device)
    return device, DeviceEntry(
        user,
        device.device_id,
        canonical(record.to_wire()),
        record.curve25519,
        record.ed25519,
        1_000,
    )


def revocation(who: identity.Identity, user: str, device_id: str) -> str:
    return canonical(records.sign_revocation(who, user, device_id, 5_000).to_wire())


def keys(device_id: str, *ids: str, fallback: str | None = None) -> list[Prekey]:
    """Opaque prekeys as the store sees them: only the key id and fallback flag mean anything."""
    out = [Prekey(i, f'{{"device_id":"{device_id}","key_id":"{i}"}}', False) for i in ids]
    if fallback is not None:
        out.append(Prekey(fallback, f'{{"fallback":true,"key_id":"{fallback}"}}', True))
    return out


def envelope(msg_id: str, device: str, *, sender: str = "alice", size: int = 10) -> DeviceEnvelope:
    return DeviceEnvelope("bob", device, sender, "SENDERDEVICE2345", msg_id, b"\x02" * size, 1_000)


def pending(store: SQLiteStore, device: str, now_ms: int = 2_000) -> list[str]:
    return [e.msg_id for e in store.pending_envelopes("bob", device, now_ms)]


# -- devices ---------------------------------------------------------------------------------------


def test_devices_are_listed_in_order_with_revoked_ones_marked_across_a_restart(
    tmp_path: Path, make_identity: MakeIdentity
) -> None:
    bob = make_identity("bob")
    _, phone = new_device(bob, "bob")
    _, laptop = new_device(bob, "bob")
    path = tmp_path / "db.sqlite"
    store = SQLiteStore(path)
    assert store.put_device(phone, 2_000) is True
    assert store.put_device(laptop, 3_000) is True
    revoked = revocation(bob, "bob", phone.device_id)
    assert store.revoke_device("bob", phone.device_id, revoked, 4_000) == 0
    store.close()

    store = SQLiteStore(path)
    listed = store.list_devices("bob")
    assert [d.entry for d in listed] == [phone, laptop]
    assert [(d.revoked, d.revocation, d.revoked_ms) for d in listed] == [
        (True, revoked, 4_000),
        (False, None, None),
    ]
    assert [d.last_seen_ms for d in listed] == [2_000, 3_000]
    assert store.list_devices("carol") == []
    # What was stored is what a client verifies: the record and revocation, byte for byte.
    pinned = bob.verify_key_bytes
    stored = json.loads(listed[1].entry.record)
    assert records.verify_device(stored, "bob", pinned).device_id == laptop.device_id
    revocations = [json.loads(d.revocation) for d in listed if d.revocation]
    devices = records.verified_devices("bob", pinned, [stored], revocations)
    assert [d.device_id for d in devices.devices] == [laptop.device_id]
    assert devices.revoked == (phone.device_id,)


def test_a_device_is_published_once_and_never_changes_its_keys(
    tmp_path: Path, make_identity: MakeIdentity
) -> None:
    bob = make_identity("bob")
    store = SQLiteStore(tmp_path / "db.sqlite")
    _, phone = new_device(bob, "bob")
    _, other = new_device(bob, "bob")
    assert store.put_device(phone, 2_000) is True
    assert store.put_device(phone, 9_000) is False  # a client that publishes again at login
    assert store.device("bob", phone.device_id).last_seen_ms == 2_000  # type: ignore[union-attr]
    swapped = DeviceEntry(**{**other.__dict__, "device_id": phone.device_id})
    with pytest.raises(DeviceConflict) as info:
        store.put_device(swapped, 3_000)
    assert str(info.value) == (
        f"bob's device {phone.device_id} was published before with another record; a device's "
        "keys never change (make a new device instead)"
    )
    store.revoke_device("bob", phone.device_id, revocation(bob, "bob", phone.device_id), 4_000)
    with pytest.raises(RevokedDevice) as revoked:
        store.put_device(phone, 5_000)
    assert str(revoked.value) == (
        f"bob's device {phone.device_id} was revoked; a revoked device cannot be published again"
    )
    assert [d.entry for d in store.list_devices("bob")] == [phone]


def test_a_user_has_at_most_max_devices_that_are_not_revoked(
    tmp_path: Path, make_identity: MakeIdentity
) -> None:
    bob = make_identity("bob")
    store = SQLiteStore(tmp_path / "db.sqlite")
    first, second, third = (new_device(bob, "bob")[1] for _ in range(3))
    store.put_device(first, 1, max_devices=2)
    store.put_device(second, 1, max_devices=2)
    with pytest.raises(TooManyDevices) as info:
        store.put_device(third, 1, max_devices=2)
    assert str(info.value) == (
        "bob already has 2 devices, the most one person may have; revoke one first"
    )
    assert store.put_device(first, 1, max_devices=2) is False  # republishing a held one: fine
    store.put_device(new_device(make_identity("carol"), "carol")[1], 1, max_devices=2)  # per user
    store.revoke_device("bob", first.device_id, revocation(bob, "bob", first.device_id), 2)
    assert store.put_device(third, 3, max_devices=2) is True
    assert [d.entry.device_id for d in store.list_devices("bob")] == [
        first.device_id,
        second.device_id,
        third.device_id,
    ]


def test_login_touches_an_active_device_and_the_store_answers_revoked_or_unknown(
    tmp_path: Path, make_identity: MakeIdentity
) -> None:
    bob = make_identity("bob")
    store = SQLiteStore(tmp_path / "db.sqlite")
    _, phone = new_device(bob, "bob")
    store.put_device(phone, 2_000)
    assert store.touch_device("bob", phone.device_id, 7_000) is DeviceStatus.ACTIVE
    assert store.touch_device("bob", phone.device_id, 6_000) is DeviceStatus.ACTIVE  # clock skew
    assert store.device("bob", phone.device_id).last_seen_ms == 7_000  # type: ignore[union-attr]
    assert store.touch_device("bob", "AAAAAAAAAAAAAAAA", 7_000) is DeviceStatus.UNKNOWN
    assert store.touch_device("carol", phone.device_id, 7_000) is DeviceStatus.UNKNOWN
    store.revoke_device("bob", phone.device_id, revocation(bob, "bob", phone.device_id), 8_000)
    assert store.touch_device("bob", phone.device_id, 9_000) is DeviceStatus.REVOKED
    assert store.device("bob", phone.device_id).last_seen_ms == 7_000  # type: ignore[union-attr]
    with pytest.raises(UnknownDevice, match=r"^bob has no device AAAAAAAAAAAAAAAA$"):
        store.revoke_device("bob", "AAAAAAAAAAAAAAAA", "{}", 9_000)


def test_devices_are_found_by_either_of_their_keys(
    tmp_path: Path, make_identity: MakeIdentity
) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    _, phone = new_device(make_identity("bob"), "bob")
    _, laptop = new_device(make_identity("bob"), "bob")
    store.put_device(phone, 1)
    store.put_device(laptop, 1)
    assert [d.entry for d in store.devices_with_key(phone.curve25519)] == [phone]
    assert [d.entry for d in store.devices_with_key(laptop.ed25519)] == [laptop]
    assert store.devices_with_key("no such key") == []


# -- prekeys ---------------------------------------------------------------------------------------


@pytest.fixture
def bob_devices(tmp_path: Path, make_identity: MakeIdentity) -> tuple[SQLiteStore, list[str]]:
    """A store with three active devices of bob."""
    store = SQLiteStore(tmp_path / "db.sqlite")
    entries = [new_device(make_identity("bob"), "bob")[1] for _ in range(3)]
    for entry in entries:
        store.put_device(entry, 1_000)
    return store, [e.device_id for e in entries]


def test_each_one_time_key_is_claimed_once_then_the_fallback_key_each_time(
    bob_devices: tuple[SQLiteStore, list[str]],
) -> None:
    store, (phone, *_) = bob_devices
    published = keys(phone, "AAAAAQ", "AAAAAg", fallback="AAAAAw")
    assert store.publish_prekeys("bob", phone, published) == PrekeyCount(2, True)
    assert store.prekey_count("bob", phone) == PrekeyCount(2, True)
    claims = [store.claim_prekeys("bob", [phone])[phone] for _ in range(4)]
    assert claims == [published[0], published[1], published[2], published[2]]
    assert store.prekey_count("bob", phone) == PrekeyCount(0, True)
    # A new fallback key replaces the old one; new one-time keys come before it again.
    newer = keys(phone, "AAAABA", fallback="AAAABQ")
    assert store.publish_prekeys("bob", phone, newer) == PrekeyCount(1, True)
    assert [store.claim_prekeys("bob", [phone])[phone] for _ in range(3)] == [
        newer[0],
        newer[1],
        newer[1],
    ]


def test_a_batch_of_prekeys_with_a_key_id_already_held_is_refused_whole(
    bob_devices: tuple[SQLiteStore, list[str]],
) -> None:
    store, (phone, laptop, _) = bob_devices
    store.publish_prekeys("bob", phone, keys(phone, "AAAAAQ", fallback="AAAAAg"))
    refusals = {
        "one-time key id AAAAAQ is already held": keys(phone, "AAAAAw", "AAAAAQ"),
        "fallback key id AAAAAg is already held": keys(phone, fallback="AAAAAg"),
        "one-time key id AAAABA is already held": keys(phone, "AAAABA", "AAAABA"),
        "2 fallback keys were published at once": [
            *keys(phone, fallback="AAAABQ"),
            *keys(phone, fallback="AAAABg"),
        ],
    }
    for reason, batch in refusals.items():
        with pytest.raises(PrekeyRefused, match=f"^{reason}"):
            store.publish_prekeys("bob", phone, batch)
    with pytest.raises(PrekeyRefused) as info:
        store.publish_prekeys("bob", phone, keys(phone, "AAAAAw", "AAAABA"), max_one_time=2)
    assert str(info.value) == (
        f"bob's device {phone} would hold 3 one-time keys, more than 2; no key of this batch "
        "was stored"
    )
    assert store.prekey_count("bob", phone) == PrekeyCount(1, True)
    # vodozemac numbers one-time and fallback keys apart: the same id in the other kind is new.
    assert store.publish_prekeys("bob", phone, keys(phone, "AAAAAg")) == PrekeyCount(2, True)
    # Key ids are per device: another device may use the same ones.
    assert store.publish_prekeys("bob", laptop, keys(laptop, "AAAAAQ")) == PrekeyCount(1, False)


def test_one_claim_covers_every_active_device_of_a_user(
    bob_devices: tuple[SQLiteStore, list[str]], make_identity: MakeIdentity
) -> None:
    store, (phone, laptop, tablet) = bob_devices
    store.publish_prekeys("bob", phone, keys(phone, "AAAAAQ", fallback="AAAAAg"))
    store.publish_prekeys("bob", laptop, keys(laptop, fallback="AAAAAw"))
    _, old = new_device(make_identity("bob"), "bob")
    store.put_device(old, 1_000)
    store.publish_prekeys("bob", old.device_id, keys(old.device_id, "AAAABA"))
    store.revoke_device("bob", old.device_id, "{}", 2_000)
    claimed = store.claim_prekeys("bob")
    assert claimed == {
        phone: keys(phone, "AAAAAQ")[0],
        laptop: keys(laptop, fallback="AAAAAw")[0],
        tablet: None,
    }
    assert store.claim_prekeys("bob", [phone, old.device_id, "AAAAAAAAAAAAAAAA"]) == {
        phone: keys(phone, fallback="AAAAAg")[0]
    }
    assert store.claim_prekeys("nobody") == {}
    with pytest.raises(RevokedDevice, match=f"^bob's device {old.device_id} was revoked$"):
        store.publish_prekeys("bob", old.device_id, keys(old.device_id, "AAAABQ"))
    with pytest.raises(RevokedDevice):
        store.prekey_count("bob", old.device_id)
    with pytest.raises(UnknownDevice, match=r"^bob has no device AAAAAAAAAAAAAAAA$"):
        store.publish_prekeys("bob", "AAAAAAAAAAAAAAAA", keys("AAAAAAAAAAAAAAAA", "AAAAAQ"))


def test_two_connections_claiming_at_once_never_get_the_same_one_time_key(
    bob_devices: tuple[SQLiteStore, list[str]], tmp_path: Path
) -> None:
    store, (phone, laptop, _) = bob_devices
    total = 200
    for device in (phone, laptop):
        ids = [f"k{i}" for i in range(total)]
        store.publish_prekeys("bob", device, keys(device, *ids, fallback="fb"), max_one_time=total)
    start = threading.Barrier(2)
    got: list[list[tuple[str, str]]] = [[], []]
    errors: list[BaseException] = []

    def claim(slot: int) -> None:
        # A connection of its own, as a second worker or process would have.
        mine = SQLiteStore(tmp_path / "db.sqlite")
        try:
            start.wait(10)
            while True:
                claimed = mine.claim_prekeys("bob", [phone, laptop])
                one_time = [(d, k.key_id) for d, k in claimed.items() if k and not k.fallback]
                if not one_time:
                    return
                got[slot] += one_time
        except BaseException as exc:
            errors.append(exc)
        finally:
            mine.close()

    threads = [threading.Thread(target=claim, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert not set(got[0]) & set(got[1])
    assert len(got[0]) + len(got[1]) == 2 * total
    everything = {(d, f"k{i}") for d in (phone, laptop) for i in range(total)}
    assert set(got[0]) | set(got[1]) == everything
    assert store.prekey_count("bob", phone) == PrekeyCount(0, True)


# -- one offline queue per device ------------------------------------------------------------------


def test_envelopes_wait_per_device_in_order_until_that_device_acks_across_a_restart(
    bob_devices: tuple[SQLiteStore, list[str]], tmp_path: Path
) -> None:
    store, (phone, laptop, _) = bob_devices
    for msg_id in ("m1", "m2", "m3"):
        store.queue_envelope(envelope(msg_id, phone), **LIMITS)
    store.queue_envelope(envelope("m1", laptop), **LIMITS)
    store.queue_envelope(envelope("m2", phone), **LIMITS)  # the sender retried: stored once
    store.close()

    store = SQLiteStore(tmp_path / "db.sqlite")
    assert store.pending_envelopes("bob", phone, 2_000) == [
        envelope("m1", phone),
        envelope("m2", phone),
        envelope("m3", phone),
    ]
    assert store.ack_envelopes("bob", laptop, ["m2", "m3"]) == 0  # the laptop holds no m2, m3
    assert store.ack_envelopes("bob", phone, ["m1", "m3", "unknown"]) == 2
    assert pending(store, phone) == ["m2"]
    assert pending(store, laptop) == ["m1"]  # acknowledged on the phone only
    with pytest.raises(UnknownDevice, match=r"^bob has no device AAAAAAAAAAAAAAAA$"):
        store.queue_envelope(envelope("m4", "AAAAAAAAAAAAAAAA"), **LIMITS)


def test_expired_envelopes_are_dropped(bob_devices: tuple[SQLiteStore, list[str]]) -> None:
    store, (phone, *_) = bob_devices
    store.queue_envelope(envelope("m1", phone), ttl_ms=1_000, quota=LIMITS["quota"])  # to 2_000
    store.queue_envelope(envelope("m2", phone), **LIMITS)
    assert pending(store, phone, 1_999) == ["m1", "m2"]
    assert pending(store, phone, 2_000) == ["m2"]
    assert pending(store, phone, 1_999) == ["m2"]  # gone for good


def test_the_queue_quotas_apply_to_each_recipient_device(
    bob_devices: tuple[SQLiteStore, list[str]],
) -> None:
    store, (phone, laptop, _) = bob_devices
    quota: dict[str, Any] = {"ttl_ms": 60_000, "quota": DMQuota(3, 1_000, 2, 1_000)}
    store.queue_envelope(envelope("m1", phone, sender="mallory"), **quota)
    store.queue_envelope(envelope("m2", phone, sender="mallory"), **quota)
    with pytest.raises(SenderShareExceeded) as share:
        store.queue_envelope(envelope("m3", phone, sender="mallory"), **quota)
    assert str(share.value) == (
        f"your share of bob's queue of waiting messages for device {phone} is full (2 messages, "
        "20 bytes from you; one sender may have at most 2 messages or 1000 bytes waiting for one "
        "recipient); try again when bob has read them"
    )
    store.queue_envelope(envelope("m3", laptop, sender="mallory"), **quota)  # another device
    store.queue_envelope(envelope("a1", phone), **quota)
    with pytest.raises(QuotaExceeded) as full:
        store.queue_envelope(envelope("c1", phone, sender="carol"), **quota)
    assert not isinstance(full.value, SenderShareExceeded)
    assert str(full.value) == (
        f"bob's queue of waiting messages for device {phone} is full (3 messages, 30 bytes); "
        "try again later"
    )
    bytes_quota: dict[str, Any] = {"ttl_ms": 60_000, "quota": DMQuota(100, 25, 100, 25)}
    with pytest.raises(QuotaExceeded, match=r"for device .* is full \(1 messages, 10 bytes\)"):
        store.queue_envelope(envelope("big", laptop, size=16), **bytes_quota)
    assert pending(store, phone) == ["m1", "m2", "a1"]
    assert pending(store, laptop) == ["m3"]


def test_a_revoked_device_loses_its_queue_and_prekeys_and_gets_nothing_more(
    bob_devices: tuple[SQLiteStore, list[str]], make_identity: MakeIdentity
) -> None:
    store, (phone, laptop, _) = bob_devices
    store.queue_envelope(envelope("m1", phone), **LIMITS)
    store.queue_envelope(envelope("m2", phone), **LIMITS)
    store.queue_envelope(envelope("m1", laptop), **LIMITS)
    store.publish_prekeys("bob", phone, keys(phone, "AAAAAQ", fallback="AAAAAg"))
    signed = revocation(make_identity("bob"), "bob", phone)
    assert store.revoke_device("bob", phone, signed, 3_000) == 2
    assert store.revoke_device("bob", phone, "another", 4_000) == 0  # the first one stays
    assert store.device("bob", phone).revocation == signed  # type: ignore[union-attr]
    assert pending(store, phone) == []
    assert pending(store, laptop) == ["m1"]
    with pytest.raises(RevokedDevice, match=f"^bob's device {phone} was revoked$"):
        store.queue_envelope(envelope("m3", phone), **LIMITS)
    assert pending(store, phone) == []
    assert phone not in store.claim_prekeys("bob")
    assert store.touch_device("bob", phone, 5_000) is DeviceStatus.REVOKED


# -- transactions, failures, migration -------------------------------------------------------------


def test_a_refused_device_operation_in_a_batch_undoes_only_itself(
    bob_devices: tuple[SQLiteStore, list[str]], tmp_path: Path
) -> None:
    store, (phone, laptop, _) = bob_devices
    with store.batch():
        store.publish_prekeys("bob", phone, keys(phone, "AAAAAQ"))
        with pytest.raises(PrekeyRefused):
            store.publish_prekeys("bob", phone, keys(phone, "AAAAAg", "AAAAAQ"))
        store.queue_envelope(envelope("m1", laptop), **LIMITS)
        with pytest.raises(UnknownDevice):
            store.queue_envelope(envelope("m1", "AAAAAAAAAAAAAAAA"), **LIMITS)
    reopened = SQLiteStore(tmp_path / "db.sqlite")
    assert reopened.prekey_count("bob", phone) == PrekeyCount(1, False)
    assert pending(reopened, laptop) == ["m1"]


def test_a_closed_store_says_so_for_device_operations(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    store.close()
    with pytest.raises(StorageError, match=r"^server database error: Cannot operate on a closed"):
        store.claim_prekeys("bob")
    with pytest.raises(StorageError, match=r"^server database error"):
        store.queue_envelope(envelope("m1", "AAAAAAAAAAAAAAAA"), **LIMITS)


def test_a_database_of_schema_version_2_is_migrated_and_keeps_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_identity: MakeIdentity
) -> None:
    path = tmp_path / "db.sqlite"
    with monkeypatch.context() as old_code:
        old_code.setattr(store_module, "MIGRATIONS", MIGRATIONS[:2])
        old = SQLiteStore(path)
        assert old.schema_version == 2
        old.claim_name("bob", b"k" * 32)
        # The history as that version wrote it (today's append_history writes today's columns).
        old._db.execute(
            "INSERT INTO room_history (room, sender, text, ts) "
            "VALUES ('#lobby', 'alice', 'hi', 1000)"
        )
        old.close()

    store = SQLiteStore(path)
    assert store.schema_version == len(MIGRATIONS) == 5
    assert store.public_key("bob") == b"k" * 32
    assert store.room_history("#lobby", 10) == [HistoryRow("#lobby", "alice", "hi", 1_000)]
    # The version 1 queue is gone (version 2 clients refuse Box DMs); the device tables work.
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "queued_dms" not in tables
    _, phone = new_device(make_identity("bob"), "bob")
    store.put_device(phone, 2_000)
    store.queue_envelope(envelope("m1", phone.device_id), **LIMITS)
    store.close()
    store = SQLiteStore(path)  # opening it again migrates nothing twice
    assert pending(store, phone.device_id) == ["m1"]


# -- the real clients, through the store -----------------------------------------------------------


class StoreDirectory(PrekeyDirectory):
    """The test parties' prekey directory, backed by the server's store instead of dicts."""

    def __init__(self, store: SQLiteStore) -> None:
        super().__init__()
        self.db = store

    def publish(self, record: dict[str, Any], keys: list[prekeys.SignedPrekey]) -> None:
        entry = DeviceEntry(
            record["user"],
            record["device_id"],
            canonical(record),
            record["curve25519"],
            record["ed25519"],
            record["created_ms"],
        )
        self.db.put_device(entry, 1_000)
        published = [Prekey(k.key_id, canonical(k.to_wire()), k.fallback) for k in keys]
        self.db.publish_prekeys(entry.user, entry.device_id, published)
        self.records[entry.user] = [
            json.loads(d.entry.record) for d in self.db.list_devices(entry.user)
        ]

    def claim(self, user: str, device_id: str) -> dict[str, Any]:
        claimed = self.db.claim_prekeys(user, [device_id])[device_id]
        assert claimed is not None
        return json.loads(claimed.prekey)


def test_olm_dms_between_real_devices_go_through_the_store_per_device(
    tmp_path: Path, make_identity: MakeIdentity
) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    directory = StoreDirectory(store)
    alice_key, bob_key = make_identity("alice"), make_identity("bob")
    keys_dir = tmp_path / "keys"
    alice = Party("alice", keys_dir / "alice.key", tmp_path / "alice", directory)
    phone = Party("bob", keys_dir / "bob.key", tmp_path / "bob-phone", directory)
    laptop = Party("bob", keys_dir / "bob.key", tmp_path / "bob-laptop", directory)
    one_time_keys = store.prekey_count("bob", laptop.device_id).one_time
    sent = alice.send("bob", bob_key.verify_key_bytes, "hello both", "msg-0001")
    assert sorted(e.recipient_device for e in sent) == sorted([phone.device_id, laptop.device_id])
    assert store.prekey_count("bob", laptop.device_id).one_time == one_time_keys - 1
    for env in sent:
        store.queue_envelope(
            DeviceEnvelope(
                env.recipient,
                env.recipient_device,
                "alice",
                env.sender_device,
                "msg-0001",
                env.data,
                1_000,
            ),
            **LIMITS,
        )
    for party in (phone, laptop):
        (queued,) = store.pending_envelopes("bob", party.device_id, 2_000)
        data = Envelope(
            queued.recipient, queued.recipient_device, queued.sender_device, queued.ciphertext
        )
        delivered = party.receive("alice", alice_key.verify_key_bytes, data)
        assert delivered.delivery.record.body == "hello both"
        assert store.ack_envelopes("bob", party.device_id, [queued.msg_id]) == 1
        assert store.pending_envelopes("bob", party.device_id, 2_000) == []
