"""Interactive verification by short authentication strings (SAS): 7 emoji, or 3 numbers, that two
people compare to confirm that their devices hold each other's identity keys, as Matrix clients do.

One of alice's devices and one of bob's run an ephemeral Curve25519 exchange (vodozemac's Sas)
through a server that may be hostile. The emoji are derived from the shared secret and an info
string naming both users, both devices, both identity keys (the Ed25519 keys trust.py pins), both
ephemeral keys and a random transaction id; so a server that substitutes any key, or relays
between two other pairs, makes the two screens show different emoji, and the MACs that follow do
not check out. The outcome of a match is exactly the identity key that was compared: the caller
marks that key verified (KnownKeys.mark_shown_verified), never a key fetched later.

The flow (Matrix's m.sas.v1 order; the commitment stops the responder, or a server in the middle,
from choosing its key after seeing the initiator's, which would let it grind for matching emoji):

    initiator                                   responder
      Start   -------------------------------->   respond(): checks names and keys
              <--------------------------------   Accept: SHA-256 commitment to its SAS key
      Key     -------------------------------->
              <--------------------------------   Key (initiator checks it against the commitment)
      both show the emoji; the users compare them and each confirms on their own device
      Mac     <------------------------------->   Mac (after its user confirms; either order)
      Done    <------------------------------->   Done (after the other side's MAC checks out)
      Cancel  from either side at any time ends it; a verification is VERIFIED once its user
              confirmed, the other's MAC checked out and the other's Done arrived.

Rules:
 1. A message with another transaction id is refused (SasMessageError) and changes nothing.
 2. A message the current state does not expect (a replay, or out of order) cancels the
    verification (VerificationFailed, code unexpected_message).
 3. A commitment, MAC or key that does not match cancels it (SasMismatch).
 4. After it ends (VERIFIED or CANCELLED), every message is refused and changes nothing.

No I/O and no clock of its own: the caller passes one, and carries the messages (inside Olm DMs
or as relayed frames). No secret in any message or error; fingerprints are the only key material
in error text.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NoReturn

import vodozemac

from securechat.e2e.device import valid_device_id
from securechat.errors import SasMessageError, SasMismatch, VerificationError, VerificationFailed
from securechat.identity import fingerprint
from securechat.protocol import valid_name

SAS_VERSION = 1
TIMEOUT_SECONDS = 600.0  # as Matrix: a verification not finished in 10 minutes is cancelled
MAX_MESSAGE_BYTES = 1024  # the largest honest message (a start) is under 400 bytes
KEY_BYTES = 32
TXN_RE = re.compile(r"[0-9a-f]{32}")  # 128 random bits, as hex
EMOJI_COUNT = 7

# Domain separation: every string below names this protocol and its version, so no value made
# here means anything in another protocol, and no MAC means anything as a SAS or vice versa.
SAS_INFO_PREFIX = "SECURECHAT_SAS_V1_EMOJI"
MAC_INFO_PREFIX = "SECURECHAT_SAS_V1_MAC"
COMMITMENT_CONTEXT = b"securechat/sas-commitment/v1\0"

_B64_32 = re.compile(r"[A-Za-z0-9+/]{43}=")  # standard base64 of 32 bytes (identity keys)
_UNPADDED_32 = re.compile(r"[A-Za-z0-9+/]{43}")  # vodozemac's unpadded base64 of 32 bytes
_CODE_RE = re.compile(r"[a-z_]{1,32}")


# -- the emoji ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Emoji:
    symbol: str
    name: str


# The Matrix SAS emoji table (index -> emoji and its English name), so our users can compare with
# the same pictures any Matrix client shows. Escapes keep the variation selectors (U+FE0F) visible.
EMOJI: tuple[Emoji, ...] = tuple(
    Emoji(symbol, name)
    for symbol, name in (
        ("\U0001f436", "Dog"),
        ("\U0001f431", "Cat"),
        ("\U0001f981", "Lion"),
        ("\U0001f40e", "Horse"),
        ("\U0001f984", "Unicorn"),
        ("\U0001f437", "Pig"),
        ("\U0001f418", "Elephant"),
        ("\U0001f430", "Rabbit"),
        ("\U0001f43c", "Panda"),
        ("\U0001f413", "Rooster"),
        ("\U0001f427", "Penguin"),
        ("\U0001f422", "Turtle"),
        ("\U0001f41f", "Fish"),
        ("\U0001f419", "Octopus"),
        ("\U0001f98b", "Butterfly"),
        ("\U0001f337", "Flower"),
        ("\U0001f333", "Tree"),
        ("\U0001f335", "Cactus"),
        ("\U0001f344", "Mushroom"),
        ("\U0001f30f", "Globe"),
        ("\U0001f319", "Moon"),
        ("\u2601\ufe0f", "Cloud"),
        ("\U0001f525", "Fire"),
        ("\U0001f34c", "Banana"),
        ("\U0001f34e", "Apple"),
        ("\U0001f353", "Strawberry"),
        ("\U0001f33d", "Corn"),
        ("\U0001f355", "Pizza"),
        ("\U0001f382", "Cake"),
        ("\u2764\ufe0f", "Heart"),
        ("\U0001f600", "Smiley"),
        ("\U0001f916", "Robot"),
        ("\U0001f3a9", "Hat"),
        ("\U0001f453", "Glasses"),
        ("\U0001f527", "Spanner"),
        ("\U0001f385", "Santa"),
        ("\U0001f44d", "Thumbs Up"),
        ("\u2602\ufe0f", "Umbrella"),
        ("\u231b", "Hourglass"),
        ("\u23f0", "Clock"),
        ("\U0001f381", "Gift"),
        ("\U0001f4a1", "Light Bulb"),
        ("\U0001f4d5", "Book"),
        ("\u270f\ufe0f", "Pencil"),
        ("\U0001f4ce", "Paperclip"),
        ("\u2702\ufe0f", "Scissors"),
        ("\U0001f512", "Lock"),
        ("\U0001f511", "Key"),
        ("\U0001f528", "Hammer"),
        ("\u260e\ufe0f", "Telephone"),
        ("\U0001f3c1", "Flag"),
        ("\U0001f682", "Train"),
        ("\U0001f6b2", "Bicycle"),
        ("\u2708\ufe0f", "Aeroplane"),
        ("\U0001f680", "Rocket"),
        ("\U0001f3c6", "Trophy"),
        ("\u26bd", "Ball"),
        ("\U0001f3b8", "Guitar"),
        ("\U0001f3ba", "Trumpet"),
        ("\U0001f514", "Bell"),
        ("\u2693", "Anchor"),
        ("\U0001f3a7", "Headphones"),
        ("\U0001f4c1", "Folder"),
        ("\U0001f4cc", "Pin"),
    )
)


@dataclass(frozen=True)
class ShortCode:
    """What both people compare: 7 emoji (42 bits) or, on screens without emoji, 3 numbers of
    4 digits (1000-9191, 39 bits). Both are made from the same SAS bytes."""

    emoji: tuple[Emoji, ...]
    decimals: tuple[int, int, int]

    @property
    def emoji_line(self) -> str:
        return "  ".join(f"{e.symbol} {e.name}" for e in self.emoji)

    @property
    def decimal_line(self) -> str:
        return " ".join(str(d) for d in self.decimals)


def short_code(indices: bytes | list[int], decimals: tuple[int, int, int]) -> ShortCode:
    """The emoji for vodozemac's 7 emoji indices (each 0-63), with the decimal form."""
    first, second, third = decimals
    return ShortCode(tuple(EMOJI[i] for i in indices), (first, second, third))


# -- who compares what ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SasParty:
    """One side of a verification: a user, one of their devices, and their identity key (for the
    other side: the key it is comparing, the one /verify showed)."""

    user: str
    device_id: str
    identity_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.user, str) or valid_name(self.user):
            raise ValueError("a verification needs a valid user name")
        if not valid_device_id(self.device_id):
            raise ValueError("a device id is 16 characters of A-Z and 2-7")
        if not isinstance(self.identity_key, bytes) or len(self.identity_key) != KEY_BYTES:
            raise ValueError(f"an identity key is {KEY_BYTES} bytes")

    @property
    def key_b64(self) -> str:
        return _b64(self.identity_key)


@dataclass(frozen=True)
class VerifiedKey:
    """The outcome of a verification where the emoji matched: the user, device and identity key
    compared. Mark exactly this key verified."""

    user: str
    device_id: str
    identity_key: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity_key)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _side(party: SasParty, sas_key: str) -> str:
    return f"{party.user}|{party.device_id}|{party.key_b64}|{sas_key}"


def sas_info(
    txn: str, initiator: SasParty, initiator_sas: str, responder: SasParty, responder_sas: str
) -> str:
    """The info string the emoji are derived with (HKDF inside vodozemac). Every part is free of
    "|" (names, device ids, hex, base64), so the string has one parse only."""
    return (
        f"{SAS_INFO_PREFIX}|{txn}|{_side(initiator, initiator_sas)}|"
        f"{_side(responder, responder_sas)}"
    )


def mac_info(
    txn: str, sender: SasParty, sender_sas: str, receiver: SasParty, receiver_sas: str
) -> str:
    """The info string of the MAC `sender` sends over its own identity key. Naming the sender
    first makes a MAC reflected back to its sender fail."""
    return f"{MAC_INFO_PREFIX}|{txn}|{_side(sender, sender_sas)}|{_side(receiver, receiver_sas)}"


def mac_input(party: SasParty) -> str:
    """What a side's MAC covers: its own identity key (the key the other side will mark)."""
    return party.key_b64


def commitment(responder_sas: str, start: Start) -> bytes:
    """The responder's commitment to its SAS key, over the start it answers, so the initiator
    sees any change to either."""
    return hashlib.sha256(
        COMMITMENT_CONTEXT + responder_sas.encode("ascii") + b"\0" + start.encode()
    ).digest()


# -- messages -------------------------------------------------------------------------------------


class CancelCode(enum.Enum):
    """Why a verification was cancelled, as sent to the other device; the text is ours, never the
    peer's, so a server cannot put words on the screen."""

    USER = ("user", "the user cancelled it")
    MISMATCHED_SAS = ("mismatched_sas", "the user said the emoji do not match")
    KEY_MISMATCH = ("key_mismatch", "the names or identity keys did not match")
    MISMATCHED_COMMITMENT = ("mismatched_commitment", "the SAS key did not match its commitment")
    MAC_MISMATCH = ("mac_mismatch", "the MAC check failed")
    UNEXPECTED_MESSAGE = ("unexpected_message", "a message arrived out of order")
    INVALID_MESSAGE = ("invalid_message", "a message was invalid")
    TIMEOUT = ("timeout", "it timed out")

    def __init__(self, wire: str, reason: str) -> None:
        self.wire = wire
        self.reason = reason

    @classmethod
    def reason_for(cls, wire: str) -> str:
        unknown = "for a reason this version of securechat does not know"
        return next((c.reason for c in cls if c.wire == wire), unknown)


def _name(value: Any, field: str) -> str:
    why = valid_name(value) if isinstance(value, str) else "must be text"
    if why:
        raise SasMessageError(f"a verification message is malformed: the {field} {why}")
    return str(value)


def _device(value: Any, field: str) -> str:
    if not valid_device_id(value):
        raise SasMessageError(
            f"a verification message is malformed: the {field} is not a device id "
            "(16 characters of A-Z and 2-7)"
        )
    return str(value)


def _txn(value: Any, field: str) -> str:
    if not isinstance(value, str) or not TXN_RE.fullmatch(value):
        raise SasMessageError(
            "a verification message is malformed: the transaction id is not 32 hex digits"
        )
    return value


def _identity_key(value: Any, field: str) -> bytes:
    if not isinstance(value, str) or not _B64_32.fullmatch(value):
        raise SasMessageError(
            f"a verification message is malformed: the {field} is not a 32-byte base64 key"
        )
    raw = base64.b64decode(value)
    if _b64(raw) != value:  # the unused low bits of the last digit must be zero
        raise SasMessageError(
            f"a verification message is malformed: the {field} is not a 32-byte base64 key"
        )
    return raw


def _commitment(value: Any, field: str) -> bytes:
    try:
        return _identity_key(value, field)
    except SasMessageError:
        raise SasMessageError(
            "a verification message is malformed: the commitment is not 32 bytes of base64"
        ) from None


def _sas_key(value: Any, field: str) -> str:
    try:
        ok = isinstance(value, str) and _UNPADDED_32.fullmatch(value) is not None
        ok = ok and vodozemac.Curve25519PublicKey.from_base64(value).to_base64() == value
    except vodozemac.KeyException:
        ok = False
    if not ok:
        raise SasMessageError("a verification message is malformed: the SAS key is not a key")
    return str(value)


def _mac(value: Any, field: str) -> str:
    # The form only: a tag that is not the right one fails the MAC check, with its own error.
    if not isinstance(value, str) or not _UNPADDED_32.fullmatch(value):
        raise SasMessageError("a verification message is malformed: the MAC is not 32 bytes")
    return value


def _code(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _CODE_RE.fullmatch(value):
        raise SasMessageError("a verification message is malformed: the cancel code is not a code")
    return value


# One checker per field name, used by every message that has the field.
_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "txn": _txn,
    "from_user": _name,
    "from_device": _device,
    "from_key": _identity_key,
    "to_user": _name,
    "to_device": _device,
    "to_key": _identity_key,
    "commitment": _commitment,
    "key": _sas_key,
    "mac": _mac,
    "code": _code,
}


class _Message:
    """Encoding shared by every message: {"type", "v", and the dataclass fields}, bytes as
    standard base64, as canonical JSON (sorted keys, no whitespace, ASCII)."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "v": SAS_VERSION}
        for name, value in vars(self).items():
            out[name] = _b64(value) if isinstance(value, bytes) else value
        return out

    def encode(self) -> bytes:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class Start(_Message):
    """The initiator asks one device of `to_user` to compare: who is who, and which identity keys
    each side is comparing."""

    TYPE: ClassVar[str] = "sas.start"
    txn: str
    from_user: str
    from_device: str
    from_key: bytes
    to_user: str
    to_device: str
    to_key: bytes


@dataclass(frozen=True)
class Accept(_Message):
    TYPE: ClassVar[str] = "sas.accept"
    txn: str
    commitment: bytes


@dataclass(frozen=True)
class Key(_Message):
    TYPE: ClassVar[str] = "sas.key"
    txn: str
    key: str  # the ephemeral Curve25519 key, vodozemac's unpadded base64


@dataclass(frozen=True)
class Mac(_Message):
    TYPE: ClassVar[str] = "sas.mac"
    txn: str
    mac: str  # HMAC-SHA-256 (vodozemac), unpadded base64


@dataclass(frozen=True)
class Done(_Message):
    TYPE: ClassVar[str] = "sas.done"
    txn: str


@dataclass(frozen=True)
class Cancel(_Message):
    TYPE: ClassVar[str] = "sas.cancel"
    txn: str
    code: str  # a CancelCode's wire value; an unknown one is shown as unknown


SasMessage = Start | Accept | Key | Mac | Done | Cancel
MESSAGE_TYPES: dict[str, type[SasMessage]] = {
    cls.TYPE: cls for cls in (Start, Accept, Key, Mac, Done, Cancel)
}


def from_wire(data: Any) -> SasMessage:
    """The message in a decoded JSON object; SasMessageError (saying what is wrong) otherwise."""
    if not isinstance(data, dict):
        raise SasMessageError("a verification message is malformed: it is not a JSON object")
    kind = data.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SasMessageError(f"a verification message is malformed: unknown type {kind!r:.40}")
    if data.get("v") != SAS_VERSION or isinstance(data.get("v"), bool):
        raise SasMessageError(
            f"a verification message has an unsupported version {data.get('v')!r:.20} "
            f"(this client speaks version {SAS_VERSION})"
        )
    names = [f.name for f in fields(cls)]
    if set(data) != {"type", "v", *names}:
        raise SasMessageError(
            f"a verification message is malformed: a {cls.TYPE} has exactly the fields "
            f"{sorted(names)}"
        )
    return cls(**{n: _CHECKS[n](data[n], n.replace("_", " ")) for n in names})


def decode(raw: bytes) -> SasMessage:
    """The message in `raw`, which must be its canonical encoding (one byte form only)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise SasMessageError(
            f"a verification message is malformed: it is over {MAX_MESSAGE_BYTES} bytes"
        )
    try:
        data = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SasMessageError("a verification message is malformed: it is not JSON") from None
    message = from_wire(data)
    if message.encode() != raw:
        raise SasMessageError("a verification message is not in canonical form")
    return message


# -- the state machine ----------------------------------------------------------------------------


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class SasState(enum.Enum):
    WAITING_FOR_ACCEPT = "waiting for the other device to accept"
    WAITING_FOR_KEY = "waiting for the other device's key"
    COMPARING = "showing the emoji; waiting for the user to compare"
    WAITING_FOR_MAC = "confirmed; waiting for the other device to confirm"
    WAITING_FOR_DONE = "confirmed both ways; waiting for the other device to finish"
    VERIFIED = "verified"
    CANCELLED = "cancelled"


# Which message each state accepts (a Cancel is accepted in every state but the last two);
# anything else is a replay or out of order (rule 2).
EXPECTED: dict[SasState, type[SasMessage]] = {
    SasState.WAITING_FOR_ACCEPT: Accept,
    SasState.WAITING_FOR_KEY: Key,
    SasState.COMPARING: Mac,  # the other user may confirm first
    SasState.WAITING_FOR_MAC: Mac,
    SasState.WAITING_FOR_DONE: Done,
}
_ENDED = frozenset({SasState.VERIFIED, SasState.CANCELLED})


class SasVerification:
    """One verification between this device (`me`) and one device of the other person (`peer`,
    whose identity key is the one being compared). Drive it with receive(), confirm() and
    cancel(); each returns the messages to send to the other device, in order."""

    def __init__(
        self, role: Role, me: SasParty, peer: SasParty, start: Start, clock: Callable[[], float]
    ) -> None:
        self.role = role
        self.me = me
        self.peer = peer
        self.txn = start.txn
        self.state = SasState.WAITING_FOR_ACCEPT
        self.short_code: ShortCode | None = None  # set once the keys are exchanged
        self.result: VerifiedKey | None = None  # set once VERIFIED
        self._start = start
        self._clock = clock
        self._deadline = clock() + TIMEOUT_SECONDS
        self._sas = vodozemac.Sas()
        self._my_sas = self._sas.public_key.to_base64()
        self._their_sas = ""
        self._established: vodozemac.EstablishedSas | None = None
        self._commitment = b""
        self._confirmed = False
        self._their_mac_ok = False

    # -- starting ---------------------------------------------------------------------------------

    @classmethod
    def initiate(
        cls, me: SasParty, peer: SasParty, *, clock: Callable[[], float] = time.monotonic
    ) -> tuple[SasVerification, Start]:
        """Start verifying `peer` (the identity key /verify showed for them, and one of their
        devices) from this device. Send the Start to that device."""
        start = Start(
            txn=secrets.token_hex(16),
            from_user=me.user,
            from_device=me.device_id,
            from_key=me.identity_key,
            to_user=peer.user,
            to_device=peer.device_id,
            to_key=peer.identity_key,
        )
        return cls(Role.INITIATOR, me, peer, start, clock), start

    @classmethod
    def respond(
        cls,
        start: Start,
        me: SasParty,
        peer_key: bytes,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> tuple[SasVerification, Accept]:
        """Answer a Start from `start.from_user`, whose identity key this side compares is
        `peer_key` (the key it pinned or was shown for them). Send the Accept back.

        SasMismatch when the Start is meant for another device, or either side's identity key
        differs from the one this side holds; the caller sends reply_to(exc) back."""
        if start.to_user != me.user or start.to_device != me.device_id:
            raise SasMismatch(
                f"a verification request from {start.from_user} was meant for {start.to_user}'s "
                f"device {start.to_device}, not this one; it was refused",
                code=CancelCode.KEY_MISMATCH.wire,
            )
        if not hmac.compare_digest(start.to_key, me.identity_key):
            raise SasMismatch(
                f"{start.from_user}'s device is comparing a key for you that is not your "
                f"identity key (its fingerprint starts {_fp_start(start.to_key)}; yours starts "
                f"{_fp_start(me.identity_key)}). The server may be swapping keys; nothing was "
                "verified",
                code=CancelCode.KEY_MISMATCH.wire,
            )
        if not hmac.compare_digest(start.from_key, peer_key):
            raise SasMismatch(
                f"{start.from_user}'s device offers the identity key whose fingerprint starts "
                f"{_fp_start(start.from_key)}, but the key you hold for {start.from_user} starts "
                f"{_fp_start(peer_key)}. The server may be swapping keys; nothing was verified",
                code=CancelCode.KEY_MISMATCH.wire,
            )
        peer = SasParty(start.from_user, start.from_device, peer_key)
        verification = cls(Role.RESPONDER, me, peer, start, clock)
        verification.state = SasState.WAITING_FOR_KEY
        accept = Accept(start.txn, commitment(verification._my_sas, start))
        return verification, accept

    # -- the other device's messages --------------------------------------------------------------

    def receive(self, message: SasMessage) -> tuple[SasMessage, ...]:
        """Take one message from the other device; the messages to send back, in order.

        SasMessageError: not for this verification (rule 1, 4); nothing changes.
        VerificationFailed (SasMismatch for a key or MAC that does not match): it is cancelled;
        send reply_to(exc) to the other device."""
        if message.txn != self.txn:
            raise SasMessageError(
                f"a verification message for another transaction reached the verification with "
                f"{self.peer.user}; it was refused"
            )
        if self.state in _ENDED:
            raise SasMessageError(
                f"a {message.TYPE} message arrived after the verification with {self.peer.user} "
                f"had ended ({self.state.value}); it was refused"
            )
        self.check_timeout()
        if isinstance(message, Cancel):
            self.state = SasState.CANCELLED
            raise VerificationFailed(
                f"{self.peer.user}'s device cancelled the verification: "
                f"{CancelCode.reason_for(message.code)}. Nothing was marked verified",
                code=message.code,
                by_peer=True,
            )
        expected = EXPECTED[self.state]
        if not isinstance(message, expected):
            self._fail(
                CancelCode.UNEXPECTED_MESSAGE,
                f"a {message.TYPE} message from {self.peer.user}'s device arrived out of order "
                f"(expected {expected.TYPE}); it may be a replay. The verification was cancelled",
            )
        if isinstance(message, Accept):
            return self._on_accept(message)
        if isinstance(message, Key):
            return self._on_key(message)
        if isinstance(message, Mac):
            return self._on_mac(message)
        return self._on_done()

    def _on_accept(self, accept: Accept) -> tuple[SasMessage, ...]:
        self._commitment = accept.commitment
        self.state = SasState.WAITING_FOR_KEY
        return (Key(self.txn, self._my_sas),)

    def _on_key(self, key: Key) -> tuple[SasMessage, ...]:
        if self.role is Role.INITIATOR and not hmac.compare_digest(
            commitment(key.key, self._start), self._commitment
        ):
            self._fail(
                CancelCode.MISMATCHED_COMMITMENT,
                f"the SAS key from {self.peer.user}'s device does not match the commitment it "
                "sent first, or the request was altered on the way: the server may be "
                "intercepting. The verification was cancelled",
                mismatch=True,
            )
        try:
            self._established = self._sas.diffie_hellman(
                vodozemac.Curve25519PublicKey.from_base64(key.key)
            )
        except (vodozemac.KeyException, vodozemac.SasException):
            self._fail(
                CancelCode.INVALID_MESSAGE,
                f"the SAS key from {self.peer.user}'s device is unusable (a weak key); the "
                "verification was cancelled",
            )
        self._their_sas = key.key
        initiator, responder = self._ordered()
        info = sas_info(self.txn, *initiator, *responder)
        sas_bytes = self._established.bytes(info)
        self.short_code = short_code(sas_bytes.emoji_indices, sas_bytes.decimals)
        self.state = SasState.COMPARING
        return (Key(self.txn, self._my_sas),) if self.role is Role.RESPONDER else ()

    def _on_mac(self, mac: Mac) -> tuple[SasMessage, ...]:
        assert self._established is not None  # COMPARING or later
        info = mac_info(self.txn, self.peer, self._their_sas, self.me, self._my_sas)
        try:
            self._established.verify_mac(mac_input(self.peer), info, mac.mac)
        except vodozemac.SasException:
            self._fail(
                CancelCode.MAC_MISMATCH,
                f"{self.peer.user}'s device did not confirm the identity key you are comparing "
                f"(fingerprint {_fp_start(self.peer.identity_key)}...) for this exchange: the "
                "MAC check failed. The server may be intercepting; nothing was marked verified",
                mismatch=True,
            )
        self._their_mac_ok = True
        if not self._confirmed:
            return ()
        self.state = SasState.WAITING_FOR_DONE
        return (Done(self.txn),)

    def _on_done(self) -> tuple[SasMessage, ...]:
        self.state = SasState.VERIFIED
        self.result = VerifiedKey(self.peer.user, self.peer.device_id, self.peer.identity_key)
        return ()

    # -- the user's answers and the clock ---------------------------------------------------------

    def confirm(self) -> tuple[SasMessage, ...]:
        """The user says both screens show the same emoji: send our MAC (and Done when the other
        side's MAC is already in)."""
        if self.state is not SasState.COMPARING:
            raise VerificationError(
                f"there are no emoji to confirm in the verification with {self.peer.user} "
                f"({self.state.value})"
            )
        self.check_timeout()
        assert self._established is not None
        info = mac_info(self.txn, self.me, self._my_sas, self.peer, self._their_sas)
        out: tuple[SasMessage, ...] = (
            Mac(self.txn, self._established.calculate_mac(mac_input(self.me), info)),
        )
        self._confirmed = True
        self.state = SasState.WAITING_FOR_MAC
        if self._their_mac_ok:
            self.state = SasState.WAITING_FOR_DONE
            out += (Done(self.txn),)
        return out

    def cancel(self, code: CancelCode = CancelCode.USER) -> Cancel | None:
        """Stop here (MISMATCHED_SAS when the user says the emoji differ): the Cancel to send,
        or None when the verification had already ended."""
        if self.state in _ENDED:
            return None
        self.state = SasState.CANCELLED
        return Cancel(self.txn, code.wire)

    def check_timeout(self) -> None:
        """VerificationFailed (code timeout) once TIMEOUT_SECONDS have passed since the start
        without the verification ending. The caller polls this with its own timer."""
        if self.state not in _ENDED and self._clock() >= self._deadline:
            self._fail(
                CancelCode.TIMEOUT,
                f"the verification with {self.peer.user} took longer than "
                f"{TIMEOUT_SECONDS / 60:.0f} minutes and was cancelled",
            )

    # -- helpers ----------------------------------------------------------------------------------

    def _ordered(self) -> tuple[tuple[SasParty, str], tuple[SasParty, str]]:
        mine, theirs = (self.me, self._my_sas), (self.peer, self._their_sas)
        return (mine, theirs) if self.role is Role.INITIATOR else (theirs, mine)

    def _fail(self, code: CancelCode, message: str, *, mismatch: bool = False) -> NoReturn:
        self.state = SasState.CANCELLED
        raise (SasMismatch if mismatch else VerificationFailed)(message, code=code.wire)


def reply_to(exc: VerificationFailed, txn: str) -> Cancel | None:
    """The Cancel to send the other device after `exc` ended verification `txn`; None when the
    other device ended it."""
    return None if exc.by_peer else Cancel(txn, exc.code)


def _fp_start(key: bytes) -> str:
    return " ".join(fingerprint(key).split()[:2])
