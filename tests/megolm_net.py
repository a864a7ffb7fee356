"""A stand-in for the Olm device layer and the server's device directory, built on real vodozemac.

Each device is a real vodozemac Account; each pair of devices talks through a real Olm session;
device records are really signed by an identity key and checked as the Olm layer will check them
(a valid signature by the key the record names). What a hostile server can do is spelt out as
methods: list a device it signed itself, list a name as a room member, replay or re-stamp a room
message. The room core under test never sees anything but the OlmPort interface.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nacl.exceptions
import nacl.signing
import vodozemac

from securechat.identity import Identity
from securechat.megolm.port import DeviceRef
from securechat.megolm.rooms import RoomCrypto
from securechat.megolm.rotation import DEFAULT_POLICY, RotationPolicy
from securechat.trust import KnownKeys

DEVICE_CONTEXT = b"test/device-record"


@dataclass(frozen=True)
class SignedDevice:
    """A device record as the server hands it out (DeviceInfo once its signature checks)."""

    user: str
    device_id: str
    identity_key: bytes
    curve25519: str
    revoked: bool
    signature: bytes

    def transcript(self) -> bytes:
        fields = [self.user, self.device_id, self.identity_key.hex(), self.curve25519, self.revoked]
        return DEVICE_CONTEXT + json.dumps(fields).encode()


def sign_device(
    signer: nacl.signing.SigningKey, user: str, device_id: str, curve: str, revoked: bool = False
) -> SignedDevice:
    unsigned = SignedDevice(user, device_id, bytes(signer.verify_key), curve, revoked, b"")
    signature = signer.sign(unsigned.transcript()).signature
    return SignedDevice(user, device_id, unsigned.identity_key, curve, revoked, signature)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Client:
    """One device of one user, with its own pins, and the room core under test."""

    ref: DeviceRef
    identity: Identity
    known: KnownKeys
    crypto: RoomCrypto
    notices: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


class OlmNet:
    """Accounts, Olm sessions and the device directory; one OlmPort per device."""

    def __init__(self, folder: Path, clock: Clock | None = None) -> None:
        self.folder = folder
        self.clock = clock or Clock()
        self.directory: dict[str, list[SignedDevice]] = {}
        self.accounts: dict[DeviceRef, vodozemac.Account] = {}
        self.sessions: dict[tuple[DeviceRef, DeviceRef], vodozemac.Session] = {}
        self.inbox: dict[DeviceRef, list[tuple[DeviceRef, int, bytes]]] = {}
        self.identities: dict[str, Identity] = {}
        self.clients: dict[DeviceRef, Client] = {}
        self.olm_messages = 0
        self._valid: set[SignedDevice] = set()

    # -- devices ----------------------------------------------------------------------------------

    def identity(self, user: str) -> Identity:
        if user not in self.identities:
            self.identities[user] = Identity(None, nacl.signing.SigningKey.generate(), user)
        return self.identities[user]

    def add_device(
        self,
        user: str,
        device_id: str,
        *,
        policy: RotationPolicy = DEFAULT_POLICY,
        state: bytes | None = None,
    ) -> Client:
        ref = DeviceRef(user, device_id)
        account = vodozemac.Account()
        self.accounts[ref] = account
        ident = self.identity(user)
        record = sign_device(ident.signing_key, user, device_id, account.curve25519_key.to_base64())
        self.directory.setdefault(user, []).append(record)
        known = KnownKeys(self.folder / f"{user}-{device_id}.known-keys.json", clock=self.clock)
        crypto = RoomCrypto(
            ident, device_id, known, Port(self, ref), policy=policy, clock=self.clock, state=state
        )
        client = Client(ref, ident, known, crypto)
        self.clients[ref] = client
        return client

    def restart(self, client: Client) -> Client:
        """The same device after a restart: a new RoomCrypto from the saved state."""
        restarted = Client(
            client.ref,
            client.identity,
            client.known,
            RoomCrypto(
                client.identity,
                client.ref.device_id,
                client.known,
                Port(self, client.ref),
                clock=self.clock,
                state=client.crypto.export_state(),
            ),
        )
        self.clients[client.ref] = restarted
        return restarted

    def add_forged_device(self, user: str, device_id: str, signer: nacl.signing.SigningKey) -> None:
        """A hostile server lists a device for `user` that a key of its own signed."""
        ref = DeviceRef(user, device_id)
        account = vodozemac.Account()
        self.accounts[ref] = account
        curve = account.curve25519_key.to_base64()
        self.directory.setdefault(user, []).append(sign_device(signer, user, device_id, curve))

    def revoke(self, user: str, device_id: str) -> None:
        ident = self.identity(user)
        self.directory[user] = [
            sign_device(ident.signing_key, d.user, d.device_id, d.curve25519, True)
            if d.device_id == device_id
            else d
            for d in self.directory[user]
        ]

    def pin_all(self) -> None:
        """Every client pins every other user's identity key (first sight)."""
        for client in self.clients.values():
            for user, ident in self.identities.items():
                if user != client.ref.user:
                    client.known.check(user, ident.verify_key_bytes)

    def checked_devices(self, user: str) -> list[SignedDevice]:
        """What the Olm layer returns: records with a valid signature by the key they name.

        Checked once per record, as the Olm layer checks records when they arrive."""
        valid = []
        for record in self.directory.get(user, []):
            if record not in self._valid:
                try:
                    key = nacl.signing.VerifyKey(record.identity_key)
                    key.verify(record.transcript(), record.signature)
                except (nacl.exceptions.BadSignatureError, ValueError):
                    continue
                self._valid.add(record)
            valid.append(record)
        return valid

    # -- Olm --------------------------------------------------------------------------------------

    def _session(self, sender: DeviceRef, recipient: DeviceRef) -> vodozemac.Session:
        if (sender, recipient) not in self.sessions:
            theirs = self.accounts[recipient]
            theirs.generate_one_time_keys(1)
            one_time_key = next(iter(theirs.one_time_keys.values()))
            theirs.mark_keys_as_published()
            ours = self.accounts[sender].create_outbound_session(
                theirs.curve25519_key, one_time_key
            )
            hello = ours.encrypt(b"hello").to_pre_key()
            assert hello is not None
            inbound, _ = theirs.create_inbound_session(self.accounts[sender].curve25519_key, hello)
            self.sessions[(sender, recipient)] = ours
            self.sessions[(recipient, sender)] = inbound
        return self.sessions[(sender, recipient)]

    def send(self, sender: DeviceRef, recipient: DeviceRef, payload: bytes) -> None:
        message_type, ciphertext = self._session(sender, recipient).encrypt(payload).to_parts()
        self.olm_messages += 1
        self.inbox.setdefault(recipient, []).append((sender, message_type, ciphertext))

    def deliver(self, client: Client) -> None:
        """Decrypt every queued Olm message for `client` and hand it to its room core."""
        from securechat.errors import SecureChatError

        queued = self.inbox.pop(client.ref, [])
        for sender, message_type, ciphertext in queued:
            message = vodozemac.AnyOlmMessage.from_parts(message_type, ciphertext)
            payload = self.sessions[(client.ref, sender)].decrypt(message)
            try:
                client.notices.extend(client.crypto.receive_to_device(sender, payload))
            except SecureChatError as exc:
                client.refusals.append(str(exc))

    def deliver_all(self) -> None:
        while any(self.inbox.values()):
            for ref in list(self.inbox):
                self.deliver(self.clients[ref])


class Port:
    """The OlmPort of one device."""

    def __init__(self, net: OlmNet, me: DeviceRef) -> None:
        self.net = net
        self.me = me
        self.batches: list[int] = []  # how many devices each send_to_devices named

    def devices(self, user: str) -> Sequence[SignedDevice]:
        return self.net.checked_devices(user)

    def send_to_device(self, user: str, device_id: str, payload: bytes) -> None:
        self.net.send(self.me, DeviceRef(user, device_id), payload)

    def send_to_devices(self, devices: Sequence[DeviceRef], payload: bytes) -> dict[DeviceRef, str]:
        self.batches.append(len(devices))
        for device in devices:
            self.net.send(self.me, device, payload)
        return {}


def join_everyone(clients: Sequence[Client], room: str, users: Sequence[str]) -> None:
    """Each client displayed each user's `joined` event, and the server lists exactly them."""
    for client in clients:
        membership = client.crypto.membership(room)
        for user in users:
            membership.shown_joined(user)
        membership.server_members(users)
