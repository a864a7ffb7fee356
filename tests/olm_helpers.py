"""Devices that talk through the e2e core with no network: each party is one installation (a key
file in its own folder, its device, sessions and conversation files), and PrekeyDirectory stands
in for the server's device and prekey store, which does not exist yet. Its `hostile` switches
make it misbehave the way a malicious server would."""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securechat import identity
from securechat.e2e import envelope, prekeys, records, storage
from securechat.e2e.envelope import Envelope, Opened
from securechat.e2e.records import DeviceList

from .conftest import PASSPHRASE

Request = Callable[..., "Future[dict[str, Any]]"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class PrekeyDirectory:
    """Device records, revocations and prekeys per user, as the server will keep them."""

    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    revocations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    one_time: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    fallback: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    reuse_one_time_keys: bool = False  # hostile: hand the same one-time key to every claimer
    only_fallback: bool = False  # hostile: pretend no one-time key is left
    identity_keys: dict[str, bytes] = field(default_factory=dict)  # for server_for()

    def publish(self, record: dict[str, Any], keys: list[prekeys.SignedPrekey]) -> None:
        user, device_id = record["user"], record["device_id"]
        mine = self.records.setdefault(user, [])
        if record not in mine:
            mine.append(record)
        for key in keys:
            if key.fallback:
                self.fallback[(user, device_id)] = key.to_wire()
            else:
                self.one_time.setdefault((user, device_id), []).append(key.to_wire())

    def claim(self, user: str, device_id: str) -> dict[str, Any]:
        queue = self.one_time.get((user, device_id), [])
        if queue and not self.only_fallback:
            return dict(queue[0]) if self.reuse_one_time_keys else queue.pop(0)
        return dict(self.fallback[(user, device_id)])

    def server_for(
        self, user: str, device_id: str, key: bytes, sent: list[dict[str, Any]]
    ) -> Request:
        """The server's side of the DM layer's requests for `user`'s device `device_id` (the
        identity key is `key`), from this directory: each `dm` asked for is kept in `sent`,
        stamped with its sender as the server does."""
        keys = self.identity_keys
        keys[user] = key

        def listed(who: str) -> dict[str, Any]:
            return {
                "key": base64.b64encode(keys[who]).decode(),
                "devices": self.records.get(who, []),
                "revocations": self.revocations.get(who, []),
            }

        def answer(ftype: str, **fields: Any) -> dict[str, Any]:
            if ftype == "publish_device":
                self.records.setdefault(user, []).append(fields["record"])
            elif ftype == "publish_prekeys":
                for wire in fields["keys"]:
                    where = (user, wire["device_id"])
                    if wire["fallback"]:
                        self.fallback[where] = wire
                    else:
                        self.one_time.setdefault(where, []).append(wire)
            elif ftype == "prekey_count":
                return {"count": 0, "fallback": False}
            elif ftype == "devices" and "users" in fields:
                return {"users": {u: listed(u) for u in fields["users"]}, "more": []}
            elif ftype == "devices":
                return listed(fields["user"])
            elif ftype == "claim_prekeys":
                return {
                    "users": {
                        who: {d: self.claim(who, d) for d in ids}
                        for who, ids in fields["users"].items()
                    }
                }
            elif ftype == "dm":
                sent.append({"from": user, "from_device": device_id, **fields})
                return {"status": "delivered"}
            elif ftype == "dms":
                sent.extend(
                    {"from": user, "from_device": device_id, **m} for m in fields["messages"]
                )
                return {"results": [{"status": "delivered"} for _ in fields["messages"]]}
            return {}

        def request(ftype: str, **fields: Any) -> Future[dict[str, Any]]:
            future: Future[dict[str, Any]] = Future()
            future.set_result(answer(ftype, **fields))
            return future

        return request


class Party:
    """One device of one user: a copy of the user's key file in a folder of its own."""

    def __init__(self, user: str, key_file: Path, folder: Path, directory: PrekeyDirectory) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.key_path = folder / key_file.name
        if not self.key_path.exists():
            shutil.copy2(key_file, self.key_path)
        self.user = user
        self.directory = directory
        self.notes: list[str] = []
        self.load()

    def load(self) -> None:
        """(Re)open everything from disk, as a restarted client does."""
        self.identity = identity.load(
            self.key_path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS
        )
        self.device, created = storage.load_or_create_device(self.identity)
        self.store, notes = storage.load_sessions(self.identity)
        self.notes += [n.text for n in notes]
        self.tracker = storage.load_tracker(self.identity, self.user, self.device)
        if created:
            self.publish(0, has_fallback=False)

    def save(self) -> None:
        storage.save_device(self.identity, self.device)
        storage.save_sessions(self.identity, self.store)
        storage.save_tracker(self.identity, self.tracker)

    @property
    def device_id(self) -> str:
        return self.device.device_id

    def record(self) -> records.DeviceRecord:
        return records.sign_device(self.identity, self.user, self.device)

    def publish(self, server_count: int, *, has_fallback: bool) -> int:
        plan = prekeys.plan_prekeys(
            server_count, has_fallback, self.device.account.max_number_of_one_time_keys
        )
        keys = prekeys.new_prekeys(self.device, self.user, plan)
        storage.save_device(self.identity, self.device)
        self.directory.publish(self.record().to_wire(), keys)
        return len(keys)

    def devices_of(self, user: str, pinned_key: bytes) -> DeviceList:
        return records.verified_devices(
            user,
            pinned_key,
            self.directory.records.get(user, []),
            self.directory.revocations.get(user, []),
        )

    def send(self, to: str, to_key: bytes, body: str, message_id: str) -> list[Envelope]:
        """Fan a DM out to `to`'s devices and our own other devices (claiming prekeys first)."""
        targets = envelope.fanout_targets(
            self.device_id,
            self.devices_of(to, to_key),
            self.devices_of(self.user, self.identity.verify_key_bytes),
        )
        for target in envelope.needs_prekeys(self.store, targets):
            claimed = prekeys.verify_prekey(
                self.directory.claim(target.user, target.device_id), target
            )
            note = self.store.start_session(self.device, target, claimed)
            if note is not None:
                self.notes.append(note.text)
        out = envelope.encrypt_dm(self.store, self.tracker, targets, to, message_id, now_ms(), body)
        self.save()
        return out

    def receive(self, sender: str, sender_key: bytes, env: Envelope) -> Opened:
        """Open one envelope delivered to this device, as stamped from `sender`."""
        sender_device = self.devices_of(sender, sender_key).get(env.sender_device)
        assert sender_device is not None
        try:
            opened = envelope.open_envelope(
                self.store, self.device, self.tracker, sender, sender_device, env.data, now_ms()
            )
        finally:
            self.save()  # a refusal may still have changed state (a wedged session)
        if opened.note is not None:
            self.notes.append(opened.note.text)
        return opened
