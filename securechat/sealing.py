"""Sealing and opening direct messages end to end, and refusing replays.

A DM is a small canonical JSON record (sender, recipient, message id, timestamp, body) sealed with
NaCl Box from the sender's key to the recipient's. The server relays the sealed envelope as opaque
bytes and stamps the authenticated sender on delivery; the recipient opens it and checks the names
inside against that stamp and itself. No I/O here, no hand-picked nonces (PyNaCl picks a random
one), and no plaintext or key material in any error message.

Why the names inside matter: Box derives the same shared key in both directions, so anything alice
seals to bob also opens for alice with bob's public key. A server could bounce alice's DM to bob
back to alice as if bob wrote it (a reflection); only the inner sender and recipient tell the two
directions apart.

Envelope format (ENVELOPE_VERSION 1), the bytes the server sees:

    version (1 byte, 0x01) || nonce (24 bytes) || Box ciphertext (16-byte tag + sealed record)

The version byte lets a later forward-secret ratchet replace plain Box while stored version-1
messages still open. The sealed record (RECORD_VERSION 1) is
json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False) encoded as UTF-8:

    {"body":str,"from":name,"id":str,"kind":"dm","to":name,"ts":int ms,"v":1}

exactly those keys. Opening re-encodes the record and refuses any other byte form, so each record
has one encoding (no duplicate keys, no whitespace, no NaN). A new field means a new record version.
"""

from __future__ import annotations

import base64
import heapq
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.signing

from securechat.errors import SecureChatError
from securechat.protocol import TEXT_MAX, valid_name

ENVELOPE_VERSION = 1
RECORD_VERSION = 1
RECORD_KIND = "dm"
BODY_MAX = TEXT_MAX  # the same limit as room text
# The same form the wire protocol accepts for a DM's id (protocol.py), so any sealed id relays.
MESSAGE_ID_MIN, MESSAGE_ID_MAX = 8, 64
_MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_RECORD_KEYS = frozenset({"v", "kind", "from", "to", "id", "ts", "body"})
_TS_MAX = 2**53  # JSON-safe integers only; other peers may parse numbers as doubles

# A cap on envelopes, checked before decrypting (bound every buffer before filling it). The largest
# envelope seal() can make is about 48,250 bytes: a BODY_MAX body of control characters (each
# escaped as \u00XX, 6 bytes), the longest names, id and timestamp, and 41 bytes of version, nonce
# and tag. Its base64 (about 64,330 bytes) still fits a 64 KiB frame.
MAX_ENVELOPE_BYTES = 48 * 1024

DAY_MS = 24 * 60 * 60 * 1000
MAX_AGE_MS_DEFAULT = 7 * DAY_MS  # offline DMs are queued on the server; a week covers a holiday
MAX_SKEW_MS_DEFAULT = 5 * 60 * 1000  # clocks of ordinary machines agree to well within this
MAX_REMEMBERED_DEFAULT = 50_000  # about 15 MB; far more DMs than one person gets in a week


# -- errors ---------------------------------------------------------------------------------------


class SealError(SecureChatError):
    """A direct message could not be sealed, or was refused on opening; never shown as one."""


class InvalidMessage(SealError):
    """We cannot seal this: a bad name, body, id or key on our side (nothing was sent)."""


class BadKey(SealError):
    """A public key we were given is not a usable Ed25519 key."""


class UnsupportedEnvelope(SealError):
    """The envelope uses a format version this client does not know; upgrading may help."""


class TamperedMessage(SealError):
    """The envelope does not open with the sender's key, or what is inside is malformed."""


class ForgedSender(SealError):
    """The stamped sender's key sealed it, but the record inside names someone else as sender."""


class MisroutedMessage(SealError):
    """The record inside is addressed to someone else, so it was delivered to the wrong person."""


class ReflectedMessage(MisroutedMessage):
    """One of our own DMs came back to us as if the other side had written it."""


class ReplayedMessage(SealError):
    """A message id from this sender was seen before: a replayed copy."""


class StaleMessage(SealError):
    """The sealed timestamp is too old, or too far in the future, to be accepted."""


class ReplayStateError(SealError):
    """The saved replay record is damaged and cannot be loaded."""


# -- sealing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedDM:
    """What goes to the server: the id it may see, and the opaque envelope."""

    message_id: str
    envelope: bytes
    ts: int = 0  # the sealed timestamp, for the sender's own records


@dataclass(frozen=True)
class OpenedDM:
    """A DM that opened and passed the name checks (replays are ReplayGuard's job)."""

    sender: str
    recipient: str
    message_id: str
    ts: int  # milliseconds since the Unix epoch, as the sender's clock saw it
    body: str


def new_message_id() -> str:
    """A fresh random message id: 16 random bytes, URL-safe base64 without padding (22 chars)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")


def _clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _span(ms: int) -> str:
    for unit, size in (("days", DAY_MS), ("hours", 3_600_000), ("minutes", 60_000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms / 1000:g} seconds"


def _canonical(record: dict[str, Any]) -> bytes:
    # ensure_ascii=False keeps non-Latin text at most 4 bytes a character instead of 12.
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def _box_public(public_key: bytes, role: str) -> nacl.public.PublicKey:
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise BadKey(f"the {role}'s public key must be 32 bytes")
    try:
        return nacl.signing.VerifyKey(public_key).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise BadKey(f"the {role}'s public key is not a valid Ed25519 key") from None


def _body_problem(body: Any) -> str | None:
    if not isinstance(body, str):
        return "must be text"
    if not body.strip():
        return "must not be empty"
    if len(body) > BODY_MAX:
        return f"must be at most {BODY_MAX} characters"
    return None


def seal(
    sender_key: nacl.signing.SigningKey,
    sender: str,
    recipient: str,
    recipient_public_key: bytes,
    body: str,
    *,
    message_id: str | None = None,
    ts: int | None = None,
) -> SealedDM:
    """Seal `body` from `sender` (holding `sender_key`) to `recipient` (whose key is given).

    `recipient_public_key` must be the key the caller's trust store allows sending to.
    Raises InvalidMessage or BadKey; nothing is sealed then.
    """
    for role, name in (("sender", sender), ("recipient", recipient)):
        why = valid_name(name) if isinstance(name, str) else "must be text"
        if why:
            raise InvalidMessage(f"cannot seal a direct message: the {role} name {why}")
    why = _body_problem(body)
    if why:
        raise InvalidMessage(f"cannot seal a direct message: the text {why}")
    if message_id is None:
        message_id = new_message_id()
    elif not isinstance(message_id, str) or not _MESSAGE_ID_RE.fullmatch(message_id):
        raise InvalidMessage(
            "cannot seal a direct message: the message id must be "
            f"{MESSAGE_ID_MIN} to {MESSAGE_ID_MAX} characters of A-Z, a-z, 0-9, _ and -"
        )
    if ts is None:
        ts = _clock_ms()
    elif not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < _TS_MAX:
        raise InvalidMessage("cannot seal a direct message: the timestamp is out of range")
    record = {
        "v": RECORD_VERSION,
        "kind": RECORD_KIND,
        "from": sender,
        "to": recipient,
        "id": message_id,
        "ts": ts,
        "body": body,
    }
    try:
        plaintext = _canonical(record)
    except UnicodeEncodeError:
        # Lone surrogates (e.g. from undecodable terminal input) have no UTF-8 form.
        raise InvalidMessage(
            "cannot seal a direct message: the text holds characters that are not valid Unicode"
        ) from None
    box = nacl.public.Box(
        sender_key.to_curve25519_private_key(), _box_public(recipient_public_key, "recipient")
    )
    # PyNaCl draws a fresh random 24-byte nonce; never pass one here.
    envelope = bytes([ENVELOPE_VERSION]) + bytes(box.encrypt(plaintext))
    return SealedDM(message_id=message_id, envelope=envelope, ts=ts)


# -- opening --------------------------------------------------------------------------------------


def _tampered(stamped_sender: str, why: str) -> TamperedMessage:
    return TamperedMessage(
        f"a direct message delivered as from {stamped_sender} was dropped: {why}. It may have "
        "been altered on the way; ask them to send it again, and compare safety numbers "
        f"(/verify {stamped_sender}) if it happens again"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_record(plaintext: bytes, stamped_sender: str) -> OpenedDM:
    """The validated record, or TamperedMessage; a hostile peer controls every byte here."""
    try:
        record = json.loads(plaintext.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _tampered(stamped_sender, "its sealed record is not valid JSON") from None
    if not isinstance(record, dict) or set(record) != _RECORD_KEYS:
        raise _tampered(stamped_sender, "its sealed record does not have the expected fields")
    version = record["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version != RECORD_VERSION:
        raise _tampered(stamped_sender, "its sealed record has an unknown version")
    if record["kind"] != RECORD_KIND:
        raise _tampered(stamped_sender, "its sealed record is not a direct message")
    for field in ("from", "to"):
        value = record[field]
        if not isinstance(value, str) or valid_name(value):
            raise _tampered(stamped_sender, f'its sealed "{field}" name is malformed')
    message_id = record["id"]
    if not isinstance(message_id, str) or not _MESSAGE_ID_RE.fullmatch(message_id):
        raise _tampered(stamped_sender, "its sealed message id is malformed")
    ts = record["ts"]
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < _TS_MAX:
        raise _tampered(stamped_sender, "its sealed timestamp is malformed")
    if _body_problem(record["body"]):
        raise _tampered(stamped_sender, "its sealed text is empty, too long or not text")
    try:
        canonical = _canonical(record)
    except UnicodeEncodeError:  # pragma: no cover - decoded UTF-8 always re-encodes
        canonical = b""
    if canonical != plaintext:
        raise _tampered(stamped_sender, "its sealed record is not in canonical form")
    return OpenedDM(
        sender=record["from"],
        recipient=record["to"],
        message_id=message_id,
        ts=ts,
        body=record["body"],
    )


def open_sealed(
    recipient_key: nacl.signing.SigningKey,
    recipient: str,
    stamped_sender: str,
    sender_public_key: bytes,
    envelope: bytes,
    *,
    expected_message_id: str | None = None,
) -> OpenedDM:
    """Open a DM the server delivered to `recipient` (us) stamped as from `stamped_sender`.

    `sender_public_key` is the key pinned for `stamped_sender`. `expected_message_id` is the id the
    server showed beside the envelope; when given, it must match the sealed one. Every refusal is a
    SealError leaf: UnsupportedEnvelope, TamperedMessage, ReflectedMessage, MisroutedMessage,
    ForgedSender (or BadKey for an unusable pinned key). Call ReplayGuard.check on the result
    before showing it.
    """
    if not isinstance(stamped_sender, str) or valid_name(stamped_sender):
        # Never echo it: it is whatever the server sent.
        raise TamperedMessage("a direct message with a malformed sender name was dropped")
    if isinstance(envelope, (bytearray, memoryview)):
        envelope = bytes(envelope)
    if not isinstance(envelope, bytes) or not envelope:
        raise _tampered(stamped_sender, "its envelope is empty")
    if envelope[0] != ENVELOPE_VERSION:
        raise UnsupportedEnvelope(
            f"a direct message from {stamped_sender} uses envelope format {envelope[0]}, which "
            f"this version of securechat cannot open (it knows {ENVELOPE_VERSION}); upgrade "
            "securechat to read it"
        )
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise _tampered(stamped_sender, "its envelope is larger than any sealed message can be")
    box = nacl.public.Box(
        recipient_key.to_curve25519_private_key(), _box_public(sender_public_key, "sender")
    )
    try:
        plaintext = box.decrypt(envelope[1:])
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise _tampered(stamped_sender, "it does not open with their key") from None
    opened = _parse_record(plaintext, stamped_sender)

    # The order matters only for which warning is shown; each check alone refuses the message.
    if opened.sender == recipient and stamped_sender != recipient:
        # Only we or stamped_sender could have sealed it (Box is symmetric), and it says it is
        # from us: the server is bouncing our own DM back to us.
        raise ReflectedMessage(
            f"a direct message delivered as from {stamped_sender} was one you sent yourself, "
            "sent back to you; it was dropped. The server is replaying your messages"
        )
    if opened.recipient != recipient:
        raise MisroutedMessage(
            f"a direct message from {stamped_sender} was sealed for someone else and delivered "
            f"to you ({recipient}); it was dropped. The server re-routed it, or {stamped_sender} "
            f"sealed it with the wrong key: compare safety numbers (/verify {stamped_sender})"
        )
    if opened.sender != stamped_sender:
        raise ForgedSender(
            f"a direct message from {stamped_sender} claims to come from someone else; it was "
            f"dropped. {stamped_sender} (or whoever holds their key) is impersonating another user"
        )
    if expected_message_id is not None and expected_message_id != opened.message_id:
        raise _tampered(stamped_sender, "the id beside it does not match the id sealed inside")
    return opened


# -- replays --------------------------------------------------------------------------------------


class ReplayGuard:
    """Refuses opened DMs that were seen before or whose timestamp is outside the window.

    A DM is accepted when its sealed timestamp is no older than `max_age_ms` (DMs wait on the
    server for offline users, so a week by default) and no more than `max_skew_ms` ahead of our
    clock (5 minutes), and when its (sender, id) pair is new. Accepting records the pair.

    Memory stays bounded: a pair is forgotten once its timestamp falls out of the window, since it
    would be refused as stale anyway. The window's lower edge (`horizon`) only ever moves forward,
    so setting the clock back cannot re-admit a forgotten message. At most `max_remembered` pairs
    are kept; past that the oldest is forgotten and its sender's floor rises to its timestamp, so
    nothing at or below the floor from that sender is accepted again (a flood costs the flooder,
    since one sender's DMs arrive in order).

    Only check DMs that open_sealed accepted: an unauthenticated id must not be remembered.
    Not thread-safe: use it from the one thread that opens DMs.
    """

    def __init__(
        self,
        *,
        max_age_ms: int = MAX_AGE_MS_DEFAULT,
        max_skew_ms: int = MAX_SKEW_MS_DEFAULT,
        max_remembered: int = MAX_REMEMBERED_DEFAULT,
    ) -> None:
        if max_age_ms <= 0 or max_skew_ms < 0 or max_remembered <= 0:
            raise ValueError("max_age_ms and max_remembered must be positive, max_skew_ms >= 0")
        self.max_age_ms = max_age_ms
        self.max_skew_ms = max_skew_ms
        self.max_remembered = max_remembered
        self._horizon = 0  # timestamps below this are stale; only moves forward
        self._seen: dict[tuple[str, str], int] = {}
        self._by_age: list[tuple[int, str, str]] = []  # a heap of (ts, sender, id) in _seen
        self._floor: dict[str, int] = {}  # sender -> highest forgotten ts before its time

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, sender: str, message_id: str) -> bool:
        """Whether a DM with this id from `sender` was accepted (and is still remembered)."""
        return (sender, message_id) in self._seen

    def check(self, opened: OpenedDM, now_ms: int | None = None) -> None:
        """Accept and remember `opened`, or raise ReplayedMessage / StaleMessage."""
        now = _clock_ms() if now_ms is None else now_ms
        self._advance(now - self.max_age_ms)
        sender, ts = opened.sender, opened.ts
        if (sender, opened.message_id) in self._seen:
            raise ReplayedMessage(
                f"a direct message from {sender} arrived again; the copy was dropped. The server "
                "may be replaying old messages"
            )
        if ts < self._horizon or ts <= self._floor.get(sender, -1):
            raise StaleMessage(
                f"a direct message from {sender} is older than {_span(self.max_age_ms)} "
                "(or older than messages already forgotten); it was dropped as a possible replay"
            )
        if ts > now + self.max_skew_ms:
            raise StaleMessage(
                f"a direct message from {sender} is dated more than "
                f"{_span(self.max_skew_ms)} in the future; it was dropped. Check that "
                f"your clock and {sender}'s are right"
            )
        self._remember(sender, opened.message_id, ts)

    def _remember(self, sender: str, message_id: str, ts: int) -> None:
        self._seen[(sender, message_id)] = ts
        heapq.heappush(self._by_age, (ts, sender, message_id))
        while len(self._seen) > self.max_remembered:
            old_ts, old_sender, old_id = heapq.heappop(self._by_age)
            del self._seen[(old_sender, old_id)]
            self._floor[old_sender] = max(self._floor.get(old_sender, -1), old_ts)

    def _advance(self, horizon: int) -> None:
        if horizon <= self._horizon:
            return
        self._horizon = horizon
        dropped = False
        while self._by_age and self._by_age[0][0] < horizon:
            _, sender, message_id = heapq.heappop(self._by_age)
            del self._seen[(sender, message_id)]
            dropped = True
        if dropped and self._floor:
            # A floor below the horizon says nothing the horizon does not.
            self._floor = {s: f for s, f in self._floor.items() if f >= horizon}

    def export(self) -> dict[str, Any]:
        """Plain JSON-able state for persisting; ReplayGuard.load reads it back."""
        return {
            "version": 1,
            "horizon": self._horizon,
            "seen": sorted([sender, mid, ts] for (sender, mid), ts in self._seen.items()),
            "floors": dict(sorted(self._floor.items())),
        }

    @classmethod
    def load(
        cls,
        data: Any,
        *,
        max_age_ms: int = MAX_AGE_MS_DEFAULT,
        max_skew_ms: int = MAX_SKEW_MS_DEFAULT,
        max_remembered: int = MAX_REMEMBERED_DEFAULT,
    ) -> ReplayGuard:
        """A guard with the state `export` gave; ReplayStateError when the data is damaged."""
        guard = cls(max_age_ms=max_age_ms, max_skew_ms=max_skew_ms, max_remembered=max_remembered)

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        damaged = ReplayStateError(
            "the saved record of direct messages already seen is damaged; delete it to start "
            "afresh (old messages may then be shown again)"
        )
        if not isinstance(data, dict) or data.get("version") != 1:
            raise damaged
        horizon, seen, floors = data.get("horizon"), data.get("seen"), data.get("floors")
        if not is_int(horizon) or not isinstance(seen, list) or not isinstance(floors, dict):
            raise damaged
        for item in seen:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], str)
                and is_int(item[2])
            ):
                raise damaged
        if not all(isinstance(s, str) and is_int(f) for s, f in floors.items()):
            raise damaged
        guard._floor = dict(floors)
        for sender, message_id, ts in seen:
            if (sender, message_id) not in guard._seen:
                guard._remember(sender, message_id, ts)
        guard._advance(horizon)
        guard._floor = {s: f for s, f in guard._floor.items() if f >= guard._horizon}
        return guard
