"""Prekeys: signed one-time keys and a fallback key, and when to publish more.

A device publishes Curve25519 one-time keys (each used for one session) and one fallback key
(used when the server has no one-time key left). The device's Ed25519 key signs each one, bound
to the user and device id, so whoever claims a key checks it against the device record, which
the identity key signed. Transcript:

    b"securechat/prekey/v2\\0" + canonical JSON {"device_id","fallback","key","key_id","user"}

A one-time key gives a session forward secrecy from its first message; the fallback key is
reused until it is replaced, so a session started with it is weaker until both sides have
ratcheted (its private half stays on the device until it is rotated). No I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import vodozemac

from securechat.canonical import canonical_json
from securechat.e2e.device import Device, valid_device_id
from securechat.e2e.records import DeviceRecord
from securechat.errors import PrekeyError

PREKEY_CONTEXT = b"securechat/prekey/v2\0"
_KEY_ID_RE = re.compile(r"[A-Za-z0-9+/]{1,16}")
_PREKEY_KEYS = frozenset({"user", "device_id", "key_id", "key", "fallback", "signature"})


@dataclass(frozen=True)
class SignedPrekey:
    user: str
    device_id: str
    key_id: str
    key: str  # Curve25519, vodozemac unpadded base64
    fallback: bool
    signature: str  # Ed25519 by the device key, vodozemac unpadded base64

    def _signed_fields(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "device_id": self.device_id,
            "key_id": self.key_id,
            "key": self.key,
            "fallback": self.fallback,
        }

    def transcript(self) -> bytes:
        return PREKEY_CONTEXT + canonical_json(self._signed_fields(), ascii_only=True)

    def to_wire(self) -> dict[str, Any]:
        return {**self._signed_fields(), "signature": self.signature}


@dataclass(frozen=True)
class PrekeyPlan:
    """What to publish now: this many new one-time keys, and whether a new fallback key."""

    one_time_keys: int
    new_fallback: bool


def plan_prekeys(server_count: int, has_fallback: bool, max_keys: int) -> PrekeyPlan:
    """How many one-time keys to generate, given how many the server says it still holds.

    The account keeps at most `max_keys` private one-time keys and forgets the oldest beyond
    that, so at most half of them are ever published; new ones are made only once the server's
    count falls below a quarter, in one batch. The fallback key is replaced at each refill (it
    has likely been used by then) and whenever the server holds none.
    """
    if isinstance(server_count, bool) or not isinstance(server_count, int) or server_count < 0:
        raise PrekeyError("the server reported an impossible number of one-time keys")
    target = max(1, max_keys // 2)
    if server_count >= max(1, target // 2):
        return PrekeyPlan(0, not has_fallback)
    return PrekeyPlan(max(0, target - server_count), True)


def sign_prekey(
    device: Device, user: str, key_id: str, key: str, *, fallback: bool
) -> SignedPrekey:
    unsigned = SignedPrekey(user, device.device_id, key_id, key, fallback, "")
    signature = device.account.sign(unsigned.transcript()).to_base64()
    return SignedPrekey(user, device.device_id, key_id, key, fallback, signature)


def new_prekeys(device: Device, user: str, plan: PrekeyPlan) -> list[SignedPrekey]:
    """Generate what `plan` asks for, sign it, and mark it published on the account.

    Save the device afterwards, and publish the keys: once marked, the account does not offer
    them again.
    """
    account = device.account
    if plan.one_time_keys:
        account.generate_one_time_keys(plan.one_time_keys)
    if plan.new_fallback:
        # The binding has these two; its type stubs do not list them yet.
        account.generate_fallback_key()  # type: ignore[attr-defined]
    keys = [
        sign_prekey(device, user, key_id, key.to_base64(), fallback=False)
        for key_id, key in sorted(account.one_time_keys.items())
    ]
    keys += [
        sign_prekey(device, user, key_id, key.to_base64(), fallback=True)
        for key_id, key in sorted(account.fallback_key.items())  # type: ignore[attr-defined]
    ]
    account.mark_keys_as_published()
    return keys


def verify_prekey(data: Any, device: DeviceRecord) -> SignedPrekey:
    """The prekey in `data` (wire form) if `device`'s Ed25519 key signed it for that device."""
    if not isinstance(data, dict) or set(data) != _PREKEY_KEYS:
        raise PrekeyError(
            f"a claimed prekey does not have exactly the fields {sorted(_PREKEY_KEYS)}"
        )
    user, device_id, key_id = data["user"], data["device_id"], data["key_id"]
    key, fallback, signature = data["key"], data["fallback"], data["signature"]
    if user != device.user or device_id != device.device_id or not valid_device_id(device_id):
        raise PrekeyError(
            f"a prekey claimed for {device.user}'s device {device.device_id} names another "
            "device; it was refused"
        )
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise PrekeyError("a claimed prekey has a malformed key id")
    if not isinstance(fallback, bool) or not isinstance(key, str) or not isinstance(signature, str):
        raise PrekeyError("a claimed prekey has a malformed field")
    try:
        if vodozemac.Curve25519PublicKey.from_base64(key).to_base64() != key:
            raise PrekeyError("a claimed prekey is not a canonical Curve25519 key")
        prekey = SignedPrekey(user, device_id, key_id, key, fallback, signature)
        vodozemac.Ed25519PublicKey.from_base64(device.ed25519).verify_signature(
            prekey.transcript(), vodozemac.Ed25519Signature.from_base64(signature)
        )
    except (vodozemac.KeyException, vodozemac.SignatureException):
        raise PrekeyError(
            f"a prekey claimed for {device.user}'s device {device.device_id} is not signed by "
            "that device; it was refused. The server may be handing out keys of its own"
        ) from None
    return prekey
