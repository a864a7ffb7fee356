"""A hostile server against the encrypted-room core: each trick is refused or shown.

The server controls room membership, device lists, delivery and the sender stamp; these tests play
each of those moves at the API level, with real vodozemac Olm and Megolm underneath.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nacl.signing
import pytest
import vodozemac

from securechat.megolm import keyshare, record
from securechat.megolm.envelope import RoomCiphertext
from securechat.megolm.errors import (
    DowngradeRefused,
    ForgedRoomSender,
    ReplayedRoomMessage,
    UntrustedSenderDevice,
)
from securechat.megolm.inbound import CannotDecrypt, DecryptedRoomMessage, Undecryptable
from securechat.megolm.membership import Exclusion, MemberMark, MemberView
from securechat.megolm.mode import RoomMode
from securechat.megolm.port import DeviceRef
from securechat.megolm.rotation import RotationReason
from tests.megolm_net import OlmNet, join_everyone
from tests.test_megolm_rooms import ROOM, read, send, setup_room, text

BOB1 = DeviceRef("bob", "dev1")


@pytest.fixture
def net(tmp_path: Path) -> OlmNet:
    return OlmNet(tmp_path)


# -- membership: ghosts and foreign devices -----------------------------------------------------


def test_a_ghost_member_without_a_joined_event_gets_no_keys_and_a_warning(net: OlmNet) -> None:
    alice, _bob = setup_room(net, "alice", "bob")
    mallory = net.add_device("mallory", "dev1")
    net.pin_all()  # alice even has mallory's genuine key pinned: the event is what is missing
    alice.crypto.membership(ROOM).server_members(["alice", "bob", "mallory"])

    out = send(net, alice, "for the team only")

    assert out.shared_to == (BOB1,)
    assert out.warnings == (
        "the server lists mallory in #team, but you never saw mallory join; mallory gets no "
        "keys and cannot read what you send there",
    )
    assert net.olm_messages == 1  # bob's key share, and nothing to mallory
    assert read(mallory, out) == CannotDecrypt(
        ROOM, "alice", Undecryptable.NO_KEY, out.message.session_id
    )
    members = {m.user: m for m in alice.crypto.members(ROOM)}
    assert members["mallory"].gets_keys is False
    assert members["bob"].gets_keys is True


def test_a_device_signed_by_a_key_other_than_the_pinned_identity_gets_no_keys(
    net: OlmNet,
) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    server_key = nacl.signing.SigningKey.generate()
    net.add_forged_device("bob", "evil", server_key)

    out = send(net, alice, "hello bob")

    assert out.shared_to == (BOB1,)
    assert out.excluded == (
        Exclusion("bob", "evil", "device evil of bob is not signed by bob's pinned key"),
    )
    assert out.warnings == (
        "device evil of bob is not signed by bob's pinned key; it gets no keys for #team. "
        "Someone (perhaps the server) may be trying to read the room",
    )
    assert net.olm_messages == 1  # bob's key share, and nothing to the server's device
    assert text(bob, out) == "hello bob"


def test_a_room_key_from_a_foreign_signed_device_is_refused(net: OlmNet) -> None:
    alice, _bob = setup_room(net, "alice", "bob")
    net.add_forged_device("bob", "evil", nacl.signing.SigningKey.generate())
    evil = DeviceRef("bob", "evil")
    session = vodozemac.GroupSession()
    key = keyshare.RoomKey(ROOM, evil, session.session_id, session.session_key.to_base64(), 0)
    net.send(evil, alice.ref, keyshare.encode(key))
    net.deliver(alice)
    assert alice.refusals == [
        "a room key for #team from bob/evil was refused: device evil of bob is not signed by "
        "bob's pinned key"
    ]


def test_a_member_whose_identity_key_changed_gets_no_keys_until_accepted(net: OlmNet) -> None:
    alice, _bob, _carol = setup_room(net, "alice", "bob", "carol")
    first = send(net, alice, "all three")
    assert len(first.shared_to) == 2
    new_key = bytes(nacl.signing.SigningKey.generate().verify_key)
    alice.known.check("bob", new_key)  # the server now offers another key for bob

    out = send(net, alice, "bob's key changed")

    assert out.rotated is RotationReason.MEMBER_LEFT
    assert out.shared_to == (DeviceRef("carol", "dev1"),)
    assert out.excluded == (
        Exclusion("bob", None, "the identity key of bob has changed; accept or verify it first"),
    )
    assert {m.user: m.mark for m in alice.crypto.members(ROOM)}["bob"] is MemberMark.CHANGED


def test_a_revoked_device_gets_no_keys_and_its_messages_are_refused(net: OlmNet) -> None:
    alice, _bob = setup_room(net, "alice", "bob")
    phone = net.add_device("bob", "phone")
    phone.known.check("alice", net.identity("alice").verify_key_bytes)
    join_everyone([phone], ROOM, ["alice", "bob"])
    assert DeviceRef("bob", "phone") in send(net, alice, "to both of bob's devices").shared_to
    from_phone = send(net, phone, "sent before the revocation")

    net.revoke("bob", "phone")
    out = send(net, alice, "after the revocation")

    assert out.rotated is RotationReason.DEVICE_REMOVED
    assert out.shared_to == (BOB1,)
    assert out.warnings == ()  # a revocation is the owner's act, not an attack
    with pytest.raises(UntrustedSenderDevice) as caught:
        read(alice, from_phone)
    assert str(caught.value) == (
        "a message from bob in #team was dropped: device phone of bob was revoked"
    )
    assert isinstance(read(phone, out), CannotDecrypt)


def test_a_strict_room_shares_keys_only_with_verified_members(net: OlmNet) -> None:
    alice, _bob, _carol = setup_room(net, "alice", "bob", "carol")
    alice.crypto.membership(ROOM).strict = True
    alice.known.mark_verified("carol", net.identity("carol").verify_key_bytes)

    out = send(net, alice, "verified people only")

    assert out.shared_to == (DeviceRef("carol", "dev1"),)
    assert out.excluded == (Exclusion("bob", None, "bob is not verified and the room is strict"),)
    assert alice.crypto.members(ROOM) == [
        MemberView("alice", MemberMark.VERIFIED, True),
        MemberView("bob", MemberMark.NEW, False),
        MemberView("carol", MemberMark.VERIFIED, True),
    ]


def test_a_member_seen_for_the_first_time_shows_as_getting_keys_unless_the_room_is_strict(
    net: OlmNet,
) -> None:
    # The client pins a newcomer's key when its next send fetches their list (first sight);
    # until then the list says what that send will do, and the send itself still needs the pin.
    alice, _bob = setup_room(net, "alice", "bob")
    net.add_device("erin", "dev1")  # never pinned by alice
    join_everyone([alice], ROOM, ["alice", "bob", "erin"])
    assert {m.user: m.gets_keys for m in alice.crypto.members(ROOM)}["erin"] is True
    out = send(net, alice, "before erin's key is pinned")
    assert out.excluded == (Exclusion("erin", None, "no key is pinned for erin yet"),)
    alice.crypto.membership(ROOM).strict = True
    assert {m.user: m.gets_keys for m in alice.crypto.members(ROOM)}["erin"] is False


def test_members_are_marked_verified_pinned_or_new(net: OlmNet) -> None:
    alice, _bob, _carol = setup_room(net, "alice", "bob", "carol")
    net.clock.now += 2 * 24 * 3600  # the pins are two days old now
    dave = net.add_device("dave", "dev1")
    alice.known.check("dave", net.identity("dave").verify_key_bytes)
    alice.known.mark_verified("carol", net.identity("carol").verify_key_bytes)
    join_everyone([alice, dave], ROOM, ["alice", "bob", "carol", "dave"])
    marks = {m.user: m.mark for m in alice.crypto.members(ROOM)}
    assert marks == {
        "alice": MemberMark.VERIFIED,
        "bob": MemberMark.PINNED,
        "carol": MemberMark.VERIFIED,
        "dave": MemberMark.NEW,
    }


# -- messages: replays, sender stamps, downgrades -----------------------------------------------


def test_a_replayed_room_message_is_refused(net: OlmNet) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    out = send(net, alice, "pay carol 10")
    assert text(bob, out) == "pay carol 10"
    with pytest.raises(ReplayedRoomMessage) as caught:
        read(bob, out)
    assert str(caught.value) == (
        "a message from alice in #team was a copy of one already received; it was dropped. The "
        "server is replaying room messages"
    )


def test_room_history_may_show_a_message_again_but_a_live_copy_is_refused(net: OlmNet) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    first, second, third = (send(net, alice, f"line {n}") for n in range(3))
    assert text(bob, first) == "line 0"
    assert text(bob, third) == "line 2"
    # History re-sent on a join: the message read before shows again, nothing counts as missing.
    again = bob.crypto.decrypt("alice", first.message, before_join=True, history=True)
    assert isinstance(again, DecryptedRoomMessage)
    assert (again.body, again.notices) == ("line 0", ())
    late = bob.crypto.decrypt("alice", second.message, history=True)
    assert isinstance(late, DecryptedRoomMessage) and late.body == "line 1"
    with pytest.raises(ReplayedRoomMessage):
        bob.crypto.decrypt("alice", second.message)  # seen once, as history: live it is a copy


def test_a_wrong_sender_stamped_on_a_message_is_refused(net: OlmNet) -> None:
    alice, bob, _carol = setup_room(net, "alice", "bob", "carol")
    out = send(net, alice, "from alice")
    with pytest.raises(ForgedRoomSender) as caught:
        bob.crypto.decrypt("carol", out.message)
    assert str(caught.value) == (
        "a message in #team stamped as from carol was encrypted by alice's device dev1; it was "
        "dropped. The server altered its sender"
    )
    with pytest.raises(ForgedRoomSender):
        bob.crypto.decrypt("alice", replace(out.message, sender_device="dev2"))
    assert text(bob, out) == "from alice"  # the refusals did not use up the genuine copy


def test_a_message_moved_to_another_room_does_not_decrypt_there(net: OlmNet) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    out = send(net, alice, "for #team")
    moved = replace(out.message, room="#other")
    result = bob.crypto.decrypt("alice", moved)
    assert isinstance(result, CannotDecrypt)  # keys are held per room: #other has none


def test_a_member_cannot_pass_its_message_off_as_another_members(net: OlmNet) -> None:
    alice, bob, carol = setup_room(net, "alice", "bob", "carol")
    # carol's modified client: a genuine session of hers, a record that says alice wrote it
    session = vodozemac.GroupSession()
    key = keyshare.RoomKey(ROOM, carol.ref, session.session_id, session.session_key.to_base64(), 0)
    net.send(carol.ref, bob.ref, keyshare.encode(key))
    net.deliver(bob)
    assert bob.refusals == []
    lie = record.RoomRecord(ROOM, "alice", "dev1", "m" * 22, 1, "I resign")
    ciphertext = session.encrypt(record.encode(lie)).to_bytes()
    with pytest.raises(ForgedRoomSender) as caught:
        bob.crypto.decrypt("carol", RoomCiphertext(ROOM, "dev1", session.session_id, ciphertext))
    assert str(caught.value) == (
        "a message from carol in #team names another room, sender or device inside; it was dropped"
    )
    assert alice.refusals == []


def test_a_member_cannot_re_share_anothers_session_as_its_own(net: OlmNet) -> None:
    alice, bob, carol = setup_room(net, "alice", "bob", "carol")
    out = send(net, alice, "from alice")
    # bob got alice's key; he shares it on to carol, claiming the session is his
    stolen = alice.crypto._outbound.room_key(ROOM)  # the same key bob holds
    net.send(bob.ref, carol.ref, keyshare.encode(replace(stolen, owner=bob.ref)))
    net.deliver(carol)
    assert carol.refusals == [
        "a room key for #team from bob/dev1 was refused: it claims a session that belongs to "
        "alice/dev1"
    ]
    result = read(carol, out)
    assert isinstance(result, DecryptedRoomMessage) and result.sender == "alice"


def test_a_room_key_naming_another_sender_is_refused(net: OlmNet) -> None:
    _alice, bob, carol = setup_room(net, "alice", "bob", "carol")
    session = vodozemac.GroupSession()
    key = keyshare.RoomKey(
        ROOM, DeviceRef("alice", "dev1"), session.session_id, session.session_key.to_base64(), 0
    )
    net.send(bob.ref, carol.ref, keyshare.encode(key))
    net.deliver(carol)
    assert carol.refusals == [
        "a room key for #team from bob/dev1 was refused: it names alice/dev1 as its sender"
    ]


def test_only_own_devices_may_forward_or_request_keys(net: OlmNet) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    send(net, alice, "secret")
    net.send(bob.ref, alice.ref, keyshare.encode(keyshare.KeyRequest(ROOM)))
    net.deliver(alice)
    assert alice.refusals == [
        "a request for the keys of #team from bob/dev1 was refused: bob is not you; only your own "
        "devices exchange room keys"
    ]
    alice.refusals.clear()
    session = vodozemac.InboundGroupSession(vodozemac.GroupSession().session_key)
    exported = session.export_at(0)
    assert exported is not None
    forwarded = keyshare.RoomKey(
        ROOM, DeviceRef("carol", "dev1"), session.session_id, exported.to_base64(), 0, True
    )
    net.send(bob.ref, alice.ref, keyshare.encode(forwarded))
    net.deliver(alice)
    assert alice.refusals == [
        "a room key for #team from bob/dev1 was refused: bob is not you; only your own devices "
        "exchange room keys"
    ]


def test_a_downgrade_to_plain_is_refused_and_stays_refused_after_a_restart(net: OlmNet) -> None:
    alice, _bob = setup_room(net, "alice", "bob")
    with pytest.raises(DowngradeRefused) as caught:
        alice.crypto.modes.observe(ROOM, RoomMode.PLAIN)
    assert str(caught.value) == (
        "the server now says #team is not end-to-end encrypted, but you saw it encrypted; nothing "
        "will be sent there in plaintext and plaintext from it is not shown"
    )
    with pytest.raises(DowngradeRefused, match="a plaintext message there was refused"):
        alice.crypto.modes.check_plaintext(ROOM)
    alice = net.restart(alice)
    with pytest.raises(DowngradeRefused):
        alice.crypto.modes.observe(ROOM, RoomMode.PLAIN)
    assert alice.crypto.modes.mode(ROOM) is RoomMode.ENCRYPTED
    alice.crypto.modes.observe("#new", RoomMode.PLAIN)
    alice.crypto.modes.check_plaintext("#new")  # a plain room stays usable
    assert alice.crypto.modes.observe("#new", RoomMode.ENCRYPTED) is RoomMode.ENCRYPTED
