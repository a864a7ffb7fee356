"""Devices, device records, revocations and prekeys (securechat/e2e), with no network."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from securechat import identity
from securechat.e2e import atrest, prekeys, records, storage
from securechat.e2e.device import Device, valid_device_id
from securechat.errors import DeviceRecordError, DeviceStateError, PrekeyError, UnsignedDevice

from .conftest import PASSPHRASE


@pytest.fixture
def alice(make_identity) -> identity.Identity:
    return make_identity("alice")


# -- the device file ------------------------------------------------------------------------------


def test_a_device_is_made_once_and_reloaded_from_the_file_beside_the_key(alice) -> None:
    device, created = storage.load_or_create_device(alice, clock_ms=lambda: 1_234)
    assert created and valid_device_id(device.device_id)
    path = storage.device_path(alice)
    assert path == alice.path.with_name("alice.device.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created = storage.load_or_create_device(
        identity.load(alice.path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS)
    )
    assert not created
    assert (again.device_id, again.created_ms) == (device.device_id, 1_234)
    assert (again.curve25519, again.ed25519) == (device.curve25519, device.ed25519)


def test_two_installations_of_one_key_are_two_devices(alice, tmp_path: Path) -> None:
    other = tmp_path / "laptop" / "alice.key"
    other.parent.mkdir()
    other.write_bytes(alice.path.read_bytes())
    other.chmod(0o600)
    one, _ = storage.load_or_create_device(alice)
    two, _ = storage.load_or_create_device(
        identity.load(other, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS)
    )
    assert one.device_id != two.device_id and one.curve25519 != two.curve25519


def test_the_device_file_holds_no_key_or_id_in_clear(alice) -> None:
    device, _ = storage.load_or_create_device(alice)
    raw = storage.device_path(alice).read_bytes()
    assert device.device_id.encode() not in raw
    assert device.curve25519.encode() not in raw and device.ed25519.encode() not in raw


def test_a_device_file_open_to_others_is_refused(alice) -> None:
    storage.load_or_create_device(alice)
    path = storage.device_path(alice)
    path.chmod(0o640)
    with pytest.raises(DeviceStateError) as err:
        storage.load_device(alice)
    assert str(err.value) == (
        f"permissions 0640 for '{path}' are too open; it must be readable by you only "
        f"(chmod 600 {path})"
    )


def test_a_device_file_of_another_identity_is_refused(alice, make_identity) -> None:
    storage.load_or_create_device(alice)
    bob = make_identity("bob")
    path = storage.device_path(alice)
    os.replace(path, storage.device_path(bob))
    with pytest.raises(DeviceStateError) as err:
        storage.load_device(bob)
    assert str(err.value) == (
        f"the device file {storage.device_path(bob)} belongs to another identity key; use the "
        "key file it was made with, or move it aside to start a new device"
    )


def test_a_device_file_relabelled_for_another_identity_does_not_open(alice, make_identity) -> None:
    """Editing the clear header to name bob's key leaves the sealed part unopenable for bob."""
    storage.load_or_create_device(alice)
    bob = make_identity("bob")
    outer = json.loads(storage.device_path(alice).read_bytes())
    outer["identity"] = base64.b64encode(bob.verify_key_bytes).decode()
    target = storage.device_path(bob)
    target.write_text(json.dumps(outer))
    target.chmod(0o600)
    with pytest.raises(DeviceStateError) as err:
        storage.load_device(bob)
    assert str(err.value) == (
        f"the device file {target} is damaged or was altered (it does not open with your key)"
    )


def test_a_tampered_device_file_is_refused(alice) -> None:
    storage.load_or_create_device(alice)
    path = storage.device_path(alice)
    outer = json.loads(path.read_bytes())
    sealed = bytearray(base64.b64decode(outer["sealed"]))
    sealed[40] ^= 1
    outer["sealed"] = base64.b64encode(bytes(sealed)).decode()
    path.write_text(json.dumps(outer))
    with pytest.raises(DeviceStateError, match="is damaged or was altered"):
        storage.load_device(alice)


def test_a_tampered_account_pickle_is_refused(alice) -> None:
    """Even sealed correctly around it, an altered vodozemac pickle does not load."""
    device = Device.create()
    state = device.to_state(atrest.pickle_key(alice))
    pickled = state["account"]
    state["account"] = pickled[:40] + ("A" if pickled[40] != "A" else "B") + pickled[41:]
    data = atrest.seal_state(alice, storage.DEVICE_FORMAT, atrest.PURPOSE_DEVICE_FILE, state)
    path = storage.device_path(alice)
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(DeviceStateError) as err:
        storage.load_device(alice)
    assert str(err.value) == (
        f"the device file {path} is damaged or was altered (its account does not open with "
        "your key)"
    )


def test_the_pickle_key_differs_per_identity_and_purpose(alice, make_identity) -> None:
    keys = {
        atrest.pickle_key(alice),
        atrest.pickle_key(make_identity("bob")),
        atrest.derive_key(alice, atrest.PURPOSE_DEVICE_FILE),
        atrest.derive_key(alice, atrest.PURPOSE_SESSIONS_FILE),
    }
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)
    assert atrest.pickle_key(
        identity.load(alice.path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS)
    ) == atrest.pickle_key(alice)


# -- device records and revocations ---------------------------------------------------------------


def test_a_device_record_signed_by_the_pinned_key_is_accepted(alice) -> None:
    device = Device.create()
    record = records.sign_device(alice, "alice", device)
    got = records.verify_device(record.to_wire(), "alice", alice.verify_key_bytes)
    assert got == record
    assert (got.curve25519, got.ed25519) == (device.curve25519, device.ed25519)
    assert got.transcript().startswith(b"securechat/device-record/v2\0{")


def test_a_device_record_signed_by_another_key_is_refused(alice, make_identity) -> None:
    """The server signs a device of its own for alice with a key it holds."""
    mallory = make_identity("mallory")
    forged = records.sign_device(mallory, "alice", Device.create())
    with pytest.raises(UnsignedDevice) as err:
        records.verify_device(forged.to_wire(), "alice", alice.verify_key_bytes)
    assert str(err.value) == (
        f"a device record for alice ({forged.device_id}) is signed by a key that is not the one "
        "you pinned for alice; it was refused. The server may be adding a device of its own"
    )


def test_a_device_record_claiming_the_pinned_key_without_its_signature_is_refused(
    alice, make_identity
) -> None:
    forged = records.sign_device(make_identity("mallory"), "alice", Device.create()).to_wire()
    forged["identity_key"] = base64.b64encode(alice.verify_key_bytes).decode()
    with pytest.raises(UnsignedDevice, match="does not carry a valid signature by alice's pinned"):
        records.verify_device(forged, "alice", alice.verify_key_bytes)


def test_a_device_record_with_swapped_keys_is_refused(alice) -> None:
    wire = records.sign_device(alice, "alice", Device.create()).to_wire()
    wire["curve25519"] = Device.create().curve25519
    with pytest.raises(UnsignedDevice, match="does not carry a valid signature"):
        records.verify_device(wire, "alice", alice.verify_key_bytes)


def test_a_device_record_moved_to_another_user_is_refused(alice) -> None:
    wire = records.sign_device(alice, "alice", Device.create()).to_wire()
    with pytest.raises(DeviceRecordError) as err:
        records.verify_device(wire, "bob", alice.verify_key_bytes)
    assert str(err.value) == "a device record offered for bob names another user (alice)"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, "a device record does not have exactly the fields"),
        ({"device_id": "lower-case-id-00"}, "the device id of a device record is malformed"),
        ({"ed25519": "not a key"}, "the ed25519 key of a device record is malformed"),
        ({"created_ms": True}, "the creation time of a device record is not a time"),
        ({"signature": "AAAA"}, "the signature of a device record is not 64 bytes of base64"),
    ],
)
def test_a_malformed_device_record_gets_a_clear_error(alice, change, message) -> None:
    wire = {**records.sign_device(alice, "alice", Device.create()).to_wire(), **change}
    with pytest.raises(DeviceRecordError, match=message):
        records.verify_device(wire, "alice", alice.verify_key_bytes)


def test_verified_devices_keeps_signed_ones_and_warns_about_the_rest(alice, make_identity) -> None:
    phone, laptop, old = Device.create(), Device.create(), Device.create()
    good = [records.sign_device(alice, "alice", d) for d in (phone, laptop, old)]
    forged = records.sign_device(make_identity("mallory"), "alice", Device.create())
    revoked = records.sign_revocation(alice, "alice", old.device_id, 5)
    fake_revocation = records.sign_revocation(make_identity("mallory"), "alice", phone.device_id, 5)
    listing = records.verified_devices(
        "alice",
        alice.verify_key_bytes,
        [r.to_wire() for r in [*good, forged]],
        [revoked.to_wire(), fake_revocation.to_wire()],
    )
    assert {d.device_id for d in listing.devices} == {phone.device_id, laptop.device_id}
    assert listing.revoked == (old.device_id,)
    assert len(listing.refused) == 2
    assert all("The server may be adding a device of its own" in w for w in listing.refused)


def test_a_device_id_offered_with_two_key_sets_is_refused(alice) -> None:
    device = Device.create()
    first = records.sign_device(alice, "alice", device)
    twin = Device.create()
    twin.device_id = device.device_id
    second = records.sign_device(alice, "alice", twin)
    listing = records.verified_devices(
        "alice", alice.verify_key_bytes, [first.to_wire(), second.to_wire(), first.to_wire()]
    )
    assert listing.devices == ()
    assert listing.refused == (
        f"alice's device {device.device_id} was offered with two different sets of keys; it "
        "was refused",
    )


# -- prekeys --------------------------------------------------------------------------------------


def test_prekeys_are_signed_by_the_device_and_checked_against_its_record(alice) -> None:
    device = Device.create()
    record = records.sign_device(alice, "alice", device)
    keys = prekeys.new_prekeys(device, "alice", prekeys.PrekeyPlan(3, True))
    assert [k.fallback for k in keys] == [False, False, False, True]
    assert not device.account.one_time_keys  # marked published: not offered again
    for key in keys:
        assert prekeys.verify_prekey(key.to_wire(), record) == key


def test_a_prekey_signed_by_another_device_is_refused(alice) -> None:
    device, other = Device.create(), Device.create()
    record = records.sign_device(alice, "alice", device)
    key = prekeys.new_prekeys(other, "alice", prekeys.PrekeyPlan(1, False))[0].to_wire()
    key["device_id"] = device.device_id
    with pytest.raises(PrekeyError) as err:
        prekeys.verify_prekey(key, record)
    assert str(err.value) == (
        f"a prekey claimed for alice's device {device.device_id} is not signed by that device; "
        "it was refused. The server may be handing out keys of its own"
    )


def test_a_prekey_of_another_device_is_refused(alice) -> None:
    device, other = Device.create(), Device.create()
    key = prekeys.new_prekeys(other, "alice", prekeys.PrekeyPlan(1, False))[0].to_wire()
    with pytest.raises(PrekeyError, match="names another device; it was refused"):
        prekeys.verify_prekey(key, records.sign_device(alice, "alice", device))


def test_a_prekey_whose_key_was_swapped_is_refused(alice) -> None:
    device = Device.create()
    keys = prekeys.new_prekeys(device, "alice", prekeys.PrekeyPlan(2, False))
    wire = {**keys[0].to_wire(), "key": keys[1].key}
    with pytest.raises(PrekeyError, match="is not signed by that device"):
        prekeys.verify_prekey(wire, records.sign_device(alice, "alice", device))


@pytest.mark.parametrize(
    ("count", "has_fallback", "plan"),
    [
        (0, False, prekeys.PrekeyPlan(25, True)),
        (5, True, prekeys.PrekeyPlan(20, True)),
        (11, True, prekeys.PrekeyPlan(14, True)),
        (12, True, prekeys.PrekeyPlan(0, False)),
        (12, False, prekeys.PrekeyPlan(0, True)),
        (25, True, prekeys.PrekeyPlan(0, False)),
        (400, True, prekeys.PrekeyPlan(0, False)),
    ],
)
def test_prekeys_are_replenished_when_the_server_runs_low(count, has_fallback, plan) -> None:
    assert prekeys.plan_prekeys(count, has_fallback, 50) == plan


@pytest.mark.parametrize("count", [-1, True, 2.5, "3"])
def test_an_impossible_prekey_count_is_refused(count) -> None:
    with pytest.raises(PrekeyError) as err:
        prekeys.plan_prekeys(count, True, 50)
    assert str(err.value) == "the server reported an impossible number of one-time keys"
