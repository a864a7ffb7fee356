"""Encrypted rooms end to end through the room core: real vodozemac Olm and Megolm, no network."""

from __future__ import annotations

from pathlib import Path

import nacl.signing
import pytest

from securechat.identity import Identity
from securechat.megolm.envelope import RoomCiphertext
from securechat.megolm.errors import ReplayedRoomMessage, RoomStateError
from securechat.megolm.inbound import (
    CannotDecrypt,
    DecryptedRoomMessage,
    Undecryptable,
    before_join_note,
)
from securechat.megolm.mode import RoomMode
from securechat.megolm.port import DeviceRef
from securechat.megolm.rooms import OutgoingRoomMessage, RoomCrypto
from securechat.megolm.rotation import RotationPolicy, RotationReason
from tests.megolm_net import Client, OlmNet, join_everyone

ROOM = "#team"


@pytest.fixture
def net(tmp_path: Path) -> OlmNet:
    return OlmNet(tmp_path)


def setup_room(net: OlmNet, *users: str) -> list[Client]:
    clients = [net.add_device(user, "dev1") for user in users]
    net.pin_all()
    join_everyone(clients, ROOM, users)
    for client in clients:
        client.crypto.modes.observe(ROOM, RoomMode.ENCRYPTED)
    return clients


def send(net: OlmNet, client: Client, body: str) -> OutgoingRoomMessage:
    out = client.crypto.encrypt(ROOM, body)
    net.deliver_all()  # the key shares travel before the room message
    return out


def read(
    client: Client, out: OutgoingRoomMessage, *, before_join: bool = False
) -> DecryptedRoomMessage | CannotDecrypt:
    return client.crypto.decrypt(out.record.sender, out.message, before_join=before_join)


def text(client: Client, out: OutgoingRoomMessage) -> str:
    result = read(client, out)
    assert isinstance(result, DecryptedRoomMessage), result
    return result.body


def test_three_members_share_keys_and_read_each_others_messages(net: OlmNet) -> None:
    alice, bob, carol = setup_room(net, "alice", "bob", "carol")
    sent = [send(net, sender, f"hello from {sender.ref.user}") for sender in (alice, bob, carol)]
    for out in sent:
        for reader in (alice, bob, carol):  # the sender reads its own message back too
            result = read(reader, out)
            assert isinstance(result, DecryptedRoomMessage)
            assert (result.room, result.sender, result.device) == (ROOM, out.record.sender, "dev1")
            assert result.body == f"hello from {out.record.sender}"
            assert result.message_id == out.record.message_id
            assert result.notices == ()
    assert sent[0].shared_to == (DeviceRef("bob", "dev1"), DeviceRef("carol", "dev1"))
    assert sent[0].warnings == () and sent[0].excluded == ()


def test_the_key_is_shared_once_per_session_not_per_message(net: OlmNet) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    first = send(net, alice, "one")
    second = send(net, alice, "two")
    assert first.shared_to == (DeviceRef("bob", "dev1"),)
    assert second.shared_to == ()
    assert second.message.session_id == first.message.session_id
    assert [text(bob, first), text(bob, second)] == ["one", "two"]


def test_a_member_who_left_cannot_read_messages_after_the_rotation(net: OlmNet) -> None:
    alice, bob, carol = setup_room(net, "alice", "bob", "carol")
    before = send(net, alice, "carol is still here")
    assert text(carol, before) == "carol is still here"
    for client in (alice, bob):
        client.crypto.membership(ROOM).shown_left("carol")
        client.crypto.membership(ROOM).server_members(["alice", "bob"])

    after = send(net, alice, "carol has gone")

    assert after.rotated is RotationReason.MEMBER_LEFT
    assert after.message.session_id != before.message.session_id
    assert after.shared_to == (DeviceRef("bob", "dev1"),)
    assert text(bob, after) == "carol has gone"
    result = read(carol, after)
    assert result == CannotDecrypt(ROOM, "alice", Undecryptable.NO_KEY, after.message.session_id)
    assert "cannot decrypt a message from alice in #team" in result.notice()


def test_a_member_gone_from_the_server_list_without_a_leave_event_gets_no_more_keys(
    net: OlmNet,
) -> None:
    alice, _bob, carol = setup_room(net, "alice", "bob", "carol")
    send(net, alice, "first")
    alice.crypto.membership(ROOM).server_members(["alice", "bob"])
    after = send(net, alice, "second")
    assert after.rotated is RotationReason.MEMBER_LEFT
    assert isinstance(read(carol, after), CannotDecrypt)


def test_a_newcomer_cannot_read_what_was_sent_before_joining_and_is_told_how_much(
    net: OlmNet,
) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    history = [send(net, alice, f"early {i}") for i in range(3)] + [send(net, bob, "early bob")]
    dave = net.add_device("dave", "dev1")
    net.pin_all()
    join_everyone([alice, bob, dave], ROOM, ["alice", "bob", "dave"])

    welcome = send(net, alice, "welcome dave")

    assert welcome.rotated is None  # a join needs no rotation: dave gets the current index
    assert DeviceRef("dave", "dev1") in welcome.shared_to
    markers = [read(dave, out, before_join=True) for out in history]
    assert [m.reason for m in markers if isinstance(m, CannotDecrypt)] == [
        Undecryptable.BEFORE_JOIN
    ] * 4
    assert before_join_note(len(markers)) == "4 earlier messages were sent before you joined"
    assert before_join_note(1) == "1 earlier message was sent before you joined"
    assert markers[0].notice() == "an earlier message from alice was sent before you joined #team"
    assert text(dave, welcome) == "welcome dave"


def test_a_second_device_reads_the_history_from_when_its_user_joined_through_forwarding(
    net: OlmNet,
) -> None:
    (bob,) = setup_room(net, "bob")
    before_alice = send(net, bob, "before alice joined")
    laptop = net.add_device("alice", "laptop")
    net.pin_all()
    join_everyone([bob, laptop], ROOM, ["alice", "bob"])
    laptop.crypto.modes.observe(ROOM, RoomMode.ENCRYPTED)
    history = [send(net, bob, "hi alice"), send(net, laptop, "hi bob")]
    assert [text(laptop, out) for out in history] == ["hi alice", "hi bob"]

    phone = net.add_device("alice", "phone")
    phone.known.check("bob", net.identity("bob").verify_key_bytes)
    join_everyone([phone], ROOM, ["alice", "bob"])
    assert all(isinstance(read(phone, out), CannotDecrypt) for out in history)

    assert phone.crypto.request_keys(ROOM) == (DeviceRef("alice", "laptop"),)
    net.deliver_all()

    assert laptop.notices == ["sent 2 room keys for #team to your device phone"]
    assert phone.refusals == []
    assert [text(phone, out) for out in history] == ["hi alice", "hi bob"]
    late = read(phone, before_alice, before_join=True)
    assert isinstance(late, CannotDecrypt) and late.reason is Undecryptable.BEFORE_JOIN
    # bob's next message reaches the new device directly, at the current index
    assert DeviceRef("alice", "phone") in send(net, bob, "hello phone").shared_to


def test_a_gap_in_a_senders_indices_is_reported(net: OlmNet) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    first = send(net, bob, "one")
    send(net, bob, "dropped by the server")
    send(net, bob, "also dropped")
    fourth = send(net, bob, "four")
    assert text(alice, first) == "one"
    result = read(alice, fourth)
    assert isinstance(result, DecryptedRoomMessage)
    assert result.notices == ("2 messages from bob in #team are missing",)


def test_rotation_after_the_message_limit_and_after_a_week(net: OlmNet) -> None:
    alice = net.add_device("alice", "dev1", policy=RotationPolicy(max_messages=3))
    bob = net.add_device("bob", "dev1")
    net.pin_all()
    join_everyone([alice, bob], ROOM, ["alice", "bob"])
    outs = [send(net, alice, f"m{i}") for i in range(4)]
    assert [o.rotated for o in outs] == [None, None, None, RotationReason.MESSAGES]
    assert len({o.message.session_id for o in outs}) == 2
    net.clock.now += 7 * 24 * 3600
    aged = send(net, alice, "a week later")
    assert aged.rotated is RotationReason.AGE
    assert [text(bob, o) for o in [*outs, aged]] == ["m0", "m1", "m2", "m3", "a week later"]


def test_room_keys_and_replay_records_survive_a_restart_sealed(net: OlmNet) -> None:
    alice, bob = setup_room(net, "alice", "bob")
    first = send(net, alice, "before the restart")
    assert text(bob, first) == "before the restart"
    blob = bob.crypto.export_state()
    for secret in (b"#team", b"alice", b"before the restart"):
        assert secret not in blob

    bob = net.restart(bob)

    with pytest.raises(ReplayedRoomMessage):
        read(bob, first)
    assert bob.crypto.modes.mode(ROOM) is RoomMode.ENCRYPTED
    second = send(net, alice, "after the restart")
    assert text(bob, second) == "after the restart"
    stranger = Identity(None, nacl.signing.SigningKey.generate(), "bob")
    with pytest.raises(RoomStateError, match="do not open with this identity key"):
        RoomCrypto(stranger, "dev1", bob.known, bob.crypto.trust.port, state=blob)


def test_a_ciphertext_the_server_made_up_is_refused(net: OlmNet) -> None:
    from securechat.megolm.errors import TamperedRoomMessage

    alice, bob = setup_room(net, "alice", "bob")
    out = send(net, alice, "genuine")
    flipped = bytearray(out.message.ciphertext)
    flipped[-70] ^= 1  # inside the ciphertext, before the signature
    forged = RoomCiphertext(ROOM, "dev1", out.message.session_id, bytes(flipped))
    with pytest.raises(TamperedRoomMessage) as caught:
        bob.crypto.decrypt("alice", forged)
    assert str(caught.value) == (
        "an encrypted message from alice in #team was dropped: its signature or ciphertext "
        "does not verify"
    )
    assert text(bob, out) == "genuine"
