"""Envelopes (version 2): one Olm-encrypted inner record per recipient device, and opening one.

The bytes the server relays for one device:

    version (1 byte, 0x02) || Olm message type (1 byte: 0 pre-key, 1 normal) || Olm ciphertext

Version 1 (NaCl Box, no longer sent) is refused here: a server cannot downgrade a v2 conversation
to the old format. Fan-out: a DM goes to each verified device of the recipient and to each of
the sender's own other devices, so every device shows what was sent from any other. Opening
checks that the record inside names the device whose session decrypted it as its sender, and
this device as its recipient, so an envelope swapped between devices or users is refused.
No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from securechat.e2e import inner
from securechat.e2e.conversations import ConversationTracker, Delivery
from securechat.e2e.device import Device
from securechat.e2e.records import DeviceList, DeviceRecord
from securechat.e2e.sessions import OLM_NORMAL, OLM_PRE_KEY, SessionNote, SessionStore
from securechat.errors import EnvelopeError, NoSession

ENVELOPE_VERSION = 2
# The largest record, padded, plus Olm's overhead (a pre-key message adds under 200 bytes).
MAX_ENVELOPE_BYTES = inner.MAX_RECORD_BYTES + 512


@dataclass(frozen=True)
class Envelope:
    """What the server delivers to one device; `data` is opaque to it."""

    recipient: str
    recipient_device: str
    sender_device: str
    data: bytes


@dataclass(frozen=True)
class Opened:
    """A DM that decrypted, passed the routing checks and was accepted by the tracker."""

    delivery: Delivery
    account_changed: bool  # save the device (a one-time key was used up)
    note: SessionNote | None  # a new session replaced older ones: show it


def pack(message_type: int, ciphertext: bytes) -> bytes:
    return bytes([ENVELOPE_VERSION, message_type]) + ciphertext


def unpack(data: bytes, sender: str) -> tuple[int, bytes]:
    """(Olm message type, ciphertext) of an envelope; EnvelopeError when it is not version 2."""
    if not isinstance(data, bytes) or len(data) < 3:
        raise EnvelopeError(f"a direct message from {sender} has an empty envelope; it was dropped")
    if data[0] != ENVELOPE_VERSION:
        raise EnvelopeError(
            f"a direct message from {sender} uses envelope version {data[0]}, but this "
            f"conversation uses version {ENVELOPE_VERSION} only; it was dropped (an old client, "
            "or a server trying to downgrade the encryption)"
        )
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(
            f"a direct message from {sender} is larger than any envelope can be; it was dropped"
        )
    if data[1] not in (OLM_PRE_KEY, OLM_NORMAL):
        raise EnvelopeError(
            f"a direct message from {sender} has an unknown message type; it was dropped"
        )
    return data[1], data[2:]


def fanout_targets(
    my_device_id: str, recipient_devices: DeviceList, own_devices: DeviceList
) -> list[DeviceRecord]:
    """Every device a DM goes to: the recipient's verified devices and our own other ones."""
    own = [d for d in own_devices.devices if d.device_id != my_device_id]
    if recipient_devices.user == own_devices.user:
        return own  # a note to ourselves goes to our other devices only
    return [*recipient_devices.devices, *own]


def needs_prekeys(store: SessionStore, targets: Sequence[DeviceRecord]) -> list[DeviceRecord]:
    """The targets to claim a prekey for (and start_session with) before encrypt_dm."""
    return [t for t in targets if store.needs_session(t)]


def encrypt_dm(
    store: SessionStore,
    tracker: ConversationTracker,
    targets: Sequence[DeviceRecord],
    recipient: str,
    message_id: str,
    ts: int,
    body: str,
    kind: str = inner.RECORD_KIND,
) -> list[Envelope]:
    """One envelope per target device, each with its own chain's record (fan-out); `kind`
    "sas" carries a verification message (its body) to one device instead of chat text.

    NoSession before anything is encrypted if a target still needs a prekey; InvalidRecord if the
    message cannot be sent.
    """
    lacking = needs_prekeys(store, targets)
    if lacking:
        names = ", ".join(f"{t.user}/{t.device_id}" for t in lacking)
        raise NoSession(f"no secure session yet with {names}; claim their prekeys first")
    envelopes = []
    for target in targets:
        record = tracker.next_record(recipient, target.device_id, message_id, ts, body, kind)
        message_type, ciphertext = store.encrypt(target, inner.encode(record))
        tracker.record_sent(record)
        envelopes.append(
            Envelope(
                target.user, target.device_id, tracker.my_device, pack(message_type, ciphertext)
            )
        )
    return envelopes


def open_envelope(
    store: SessionStore,
    device: Device,
    tracker: ConversationTracker,
    stamped_sender: str,
    sender_device: DeviceRecord,
    data: bytes,
    now_ms: int,
) -> Opened:
    """Decrypt, check and track a DM the server delivered to this device.

    `stamped_sender` is the user the server says sent it and `sender_device` the verified record
    of the device it names. Refusals: EnvelopeError, UndecryptableMessage, InvalidRecord,
    ReplayedRecord, BrokenChain (and the ReplayGuard's ReplayedMessage / StaleMessage).
    Save the device, sessions and tracker afterwards, refused or not: a refused message may
    still have used up a one-time key or marked a session wedged.
    """
    if sender_device.user != stamped_sender:
        raise EnvelopeError(
            f"a direct message stamped as from {stamped_sender} came with a device of another "
            "user; it was dropped"
        )
    message_type, ciphertext = unpack(data, stamped_sender)
    decrypted = store.decrypt(device, sender_device, message_type, ciphertext, now_ms)
    record = inner.decode(decrypted.plaintext)
    _check_route(record, stamped_sender, sender_device.device_id, tracker)
    delivery = tracker.accept(record, now_ms)
    note = store.adopt(sender_device, decrypted)
    return Opened(delivery, decrypted.account_changed, note)


def _check_route(
    record: inner.InnerRecord, sender: str, sender_device: str, tracker: ConversationTracker
) -> None:
    me, my_device = tracker.me, tracker.my_device
    if record.sender != sender or record.sender_device != sender_device:
        raise EnvelopeError(
            f"a direct message from {sender} claims to come from another user or device; it "
            "was dropped"
        )
    if record.recipient_device != my_device:
        raise EnvelopeError(
            f"a direct message from {sender} was encrypted for another device and delivered to "
            "this one; it was dropped. The server re-routed it"
        )
    if record.recipient != me and record.sender != me:
        raise EnvelopeError(
            f"a direct message from {sender} is addressed to someone else; it was dropped. The "
            "server re-routed it"
        )
