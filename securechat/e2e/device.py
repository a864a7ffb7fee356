"""A device: one installation of the client, holding one vodozemac Olm Account.

The account's Curve25519 and Ed25519 keys are the device's; the identity key vouches for them in a
signed device record (records.py). The account is mutable (one-time keys are used up as sessions
start), so the caller saves the device after every change that says so. No I/O here.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeGuard

import vodozemac

from securechat.errors import DeviceStateError

DEVICE_ID_BYTES = 10  # 80 random bits: no two devices of one person ever collide
DEVICE_ID_RE = re.compile(r"[A-Z2-7]{16}")  # base32 of DEVICE_ID_BYTES, easy to type for /revoke
_TS_MAX = 2**53


def new_device_id() -> str:
    return base64.b32encode(secrets.token_bytes(DEVICE_ID_BYTES)).decode("ascii")


def valid_device_id(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and DEVICE_ID_RE.fullmatch(value) is not None


def _clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Device:
    """An Olm account with its random device id and creation time (ms since the epoch)."""

    def __init__(self, account: vodozemac.Account, device_id: str, created_ms: int) -> None:
        if not valid_device_id(device_id):
            raise ValueError("a device id is 16 characters of A-Z and 2-7")
        self.account = account
        self.device_id = device_id
        self.created_ms = created_ms

    @classmethod
    def create(cls, clock_ms: Callable[[], int] = _clock_ms) -> Device:
        return cls(vodozemac.Account(), new_device_id(), clock_ms())

    @property
    def curve25519(self) -> str:
        """The account's Curve25519 key, in vodozemac's unpadded base64."""
        return self.account.curve25519_key.to_base64()

    @property
    def ed25519(self) -> str:
        """The account's Ed25519 key, in vodozemac's unpadded base64."""
        return self.account.ed25519_key.to_base64()

    def to_state(self, pickle_key: bytes) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "created_ms": self.created_ms,
            "account": self.account.pickle(pickle_key),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], pickle_key: bytes, what: str) -> Device:
        device_id, created, pickled = (
            state.get("device_id"),
            state.get("created_ms"),
            state.get("account"),
        )
        if not valid_device_id(device_id):
            raise DeviceStateError(f"{what} is damaged (bad device id)")
        if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created < _TS_MAX:
            raise DeviceStateError(f"{what} is damaged (bad creation time)")
        if not isinstance(pickled, str):
            raise DeviceStateError(f"{what} is damaged (no account)")
        try:
            account = vodozemac.Account.from_pickle(pickled, pickle_key)
        except vodozemac.PickleException:
            raise DeviceStateError(
                f"{what} is damaged or was altered (its account does not open with your key)"
            ) from None
        return cls(account, device_id, created)

    def __repr__(self) -> str:
        return f"Device(device_id={self.device_id!r})"
