"""Direct messages on the client (protocol version 2): this device's Olm state, device lists
checked against pinned identity keys, fan-out on sending, and opening what arrives.

The server relays envelopes and stamps the sender; it cannot read them, and this module is where
its claims are checked (with securechat/e2e). A device not signed by the pinned identity key is
refused and reported; a DM that fails any check becomes a DMRejected event, never a message. The
device, its sessions and its conversation chains are saved beside the key file after every change,
so replays are refused across restarts. Requests go through `request` (the connection's); it must
not be called on the connection's own thread, since these calls wait for the replies.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from securechat.client.connection import RequestError
from securechat.client.events import (
    DeviceWarning,
    DirectMessage,
    DMRejected,
    Event,
    RoomKeyRecord,
    SasRecord,
)
from securechat.e2e import envelope, inner, prekeys, records, storage
from securechat.e2e.conversations import ConversationTracker, Delivery
from securechat.e2e.records import DeviceList, DeviceRecord
from securechat.e2e.sessions import SessionStore
from securechat.errors import (
    BrokenChain,
    DeviceRecordError,
    E2EError,
    EnvelopeError,
    ErrorCode,
    PrekeyError,
    ProtocolError,
    ReplayedRecord,
    SecureChatError,
    UndecryptableMessage,
    UnsignedDevice,
)
from securechat.identity import Identity
from securechat.protocol import CLAIM_USERS_MAX, DMS_MAX, USERS_MAX, claim_devices_max
from securechat.sealing import ReplayedMessage, SealError, StaleMessage
from securechat.trust import KeyChanged, KeyCheck, KeyState, KnownKeys

Request = Callable[..., "Future[dict[str, Any]]"]

# What each refusal is called in a DMRejected event (stable words for UIs and tests).
REJECTION_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (UnsignedDevice, "unsigned_device"),
    (DeviceRecordError, "unsigned_device"),
    (ReplayedRecord, "replayed"),
    (ReplayedMessage, "replayed"),
    (StaleMessage, "stale"),
    (BrokenChain, "broken_chain"),
    (UndecryptableMessage, "undecryptable"),
    (EnvelopeError, "misrouted"),
    (E2EError, "tampered"),
    (SealError, "tampered"),
)


def _kind(exc: Exception) -> str:
    return next(kind for cls, kind in REJECTION_KINDS if isinstance(exc, cls))


def new_message_id() -> str:
    return secrets.token_urlsafe(16)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class DeviceState:
    """This installation's device, its Olm sessions and its conversation chains, as saved beside
    the key file. One lock: the sending thread and the receiving thread share it."""

    def __init__(self, identity: Identity, user: str) -> None:
        self.identity = identity
        self.user = user
        self.device, self.created = storage.load_or_create_device(identity)
        self.sessions: SessionStore
        self.sessions, notes = storage.load_sessions(identity)
        self.notes = [n.text for n in notes]
        self.tracker: ConversationTracker = storage.load_tracker(identity, user, self.device)
        self.lock = threading.RLock()

    @property
    def device_id(self) -> str:
        return self.device.device_id

    def record(self) -> DeviceRecord:
        return records.sign_device(self.identity, self.user, self.device)

    def save(self) -> None:
        storage.save_device(self.identity, self.device)
        storage.save_sessions(self.identity, self.sessions)
        storage.save_tracker(self.identity, self.tracker)


@dataclass(frozen=True)
class DeviceInfo:
    """One device as /devices shows it."""

    device_id: str
    fingerprint: str  # of its Ed25519 key; "" when it was refused
    last_seen_ms: int | None
    revoked: bool
    this_device: bool


class DirectMessages:
    """Sends and opens version 2 DMs for one logged-in device."""

    def __init__(
        self,
        state: DeviceState,
        known_keys: KnownKeys,
        request: Request,
        warn: Callable[[Event], None],
        timeout: float = 10.0,
        max_frame: int = 64 * 1024,
    ) -> None:
        self.state = state
        self.identity = state.identity
        self.user = state.user
        self.known_keys = known_keys
        self._request = request
        self._warn = warn
        self._timeout = timeout
        self._max_frame = max_frame  # the server's: prekeys are published in frames that fit
        self._lists: dict[str, DeviceList] = {}  # verified device lists, by user
        for note in state.notes:
            warn(DeviceWarning(self.user, note))

    def _ask(self, ftype: str, **fields: Any) -> dict[str, Any]:
        return self._request(ftype, **fields).result(self._timeout)

    # -- this device --------------------------------------------------------------------------

    def publish(self) -> None:
        """Publish this device's signed record, then top up its prekeys."""
        self._ask("publish_device", record=self.state.record().to_wire())
        count = self._ask("prekey_count")
        self.replenish(count.get("count"), count.get("fallback") is True)

    def replenish(self, server_count: Any, has_fallback: bool) -> None:
        """Publish new prekeys if the server's count says so (prekeys.plan_prekeys)."""
        state = self.state
        with state.lock:
            plan = prekeys.plan_prekeys(
                server_count, has_fallback, state.device.account.max_number_of_one_time_keys
            )
            if not plan.one_time_keys and not plan.new_fallback:
                return
            keys = prekeys.new_prekeys(state.device, self.user, plan)
            state.save()
        for batch in _batches([k.to_wire() for k in keys], self._max_frame):
            self._ask("publish_prekeys", keys=batch)

    # -- device lists -------------------------------------------------------------------------

    def _pinned(self, user: str, offered: bytes, check: KeyCheck | None) -> bytes:
        """The identity key to check `user`'s devices against: our own, or the pinned one."""
        if user == self.user:
            return self.identity.verify_key_bytes
        if check is None or check.key != offered:
            check = self.known_keys.check(user, offered)
        if check.state is KeyState.CHANGED or check.pinned_key is None:
            raise KeyChanged(check)
        return check.pinned_key

    def devices_of(
        self, user: str, check: KeyCheck | None = None
    ) -> tuple[DeviceList, dict[str, Any]]:
        """`user`'s devices that may be encrypted to (signed by the pinned key, not revoked),
        and the server's answer; each refused record is reported as a DeviceWarning."""
        reply = self._ask("devices", user=user)
        return self._accept(user, reply, check), reply

    def fetch_lists(self, users: Iterable[str]) -> dict[str, Exception]:
        """Fetch and check the device lists of many users, USERS_MAX a request (the server
        answers what fits in a frame and names the rest under `more`, asked again). Returns
        why each list that was not taken failed (an unknown name, a changed key, a refusal)."""
        wanted, failed = list(dict.fromkeys(users)), dict[str, Exception]()
        while wanted:
            batch, wanted = wanted[:USERS_MAX], wanted[USERS_MAX:]
            reply = self._ask("devices", users=batch)
            entries, more = reply.get("users"), _list(reply.get("more"))
            entries = entries if isinstance(entries, dict) else {}
            unknown = _list(reply.get("unknown"))
            for user in batch:
                entry = entries.get(user)
                if user in more:
                    continue
                if user in unknown:
                    failed[user] = DeviceRecordError(f"nobody is called {user}")
                elif not isinstance(entry, dict):
                    failed[user] = DeviceRecordError(f"the server did not list {user}'s devices")
                else:
                    try:
                        self._accept(user, entry, None)
                    except SecureChatError as exc:
                        failed[user] = exc
            # Asked again, ahead of the rest; a server that answers nothing gets no second go.
            again = [u for u in batch if u in more]
            if len(again) == len(batch):
                failed.update((u, DeviceRecordError("the server answered nothing")) for u in again)
            else:
                wanted = again + wanted
        return failed

    def _accept(self, user: str, entry: dict[str, Any], check: KeyCheck | None) -> DeviceList:
        """Check one user's devices as the server listed them against the pinned key; keep
        those signed by it and report each refused record as a DeviceWarning."""
        offered = _b64(entry.get("key"))
        pinned = self._pinned(user, offered or b"", check)
        found = records.verified_devices(
            user, pinned, _list(entry.get("devices")), _list(entry.get("revocations"))
        )
        for warning in found.refused:
            self._warn(DeviceWarning(user, warning))
        self._lists[user] = found
        with self.state.lock:
            for device_id in found.revoked:
                self.state.sessions.forget(user, device_id)
        return found

    def device_infos(self, user: str) -> list[DeviceInfo]:
        """What /devices shows for `user` (ourselves included)."""
        found, reply = self.devices_of(user)
        seen = {s.get("device_id"): s for s in _list(reply.get("seen")) if isinstance(s, dict)}
        shown = [*(d.device_id for d in found.devices), *found.revoked]
        by_id = {d.device_id: d for d in found.devices}
        out = []
        for device_id in shown:
            record = by_id.get(device_id)
            last = seen.get(device_id, {}).get("last_seen_ms")
            out.append(
                DeviceInfo(
                    device_id,
                    record.fingerprint if record is not None else "",
                    last if isinstance(last, int) else None,
                    record is None,
                    user == self.user and device_id == self.state.device_id,
                )
            )
        return out

    def revoke(self, device_id: str) -> dict[str, Any]:
        """Publish a revocation of one of our devices, signed by the identity key."""
        revocation = records.sign_revocation(self.identity, self.user, device_id, _now_ms())
        reply = self._ask("revoke", revocation=revocation.to_wire())
        with self.state.lock:
            self.state.sessions.forget(self.user, device_id)
            self.state.save()
        self._lists.pop(self.user, None)
        return reply

    # -- sending ------------------------------------------------------------------------------

    def send(self, check: KeyCheck, text: str) -> tuple[Future[dict[str, Any]], str, int]:
        """Encrypt `text` to every device of `check.name` and our own other devices, and send the
        envelopes in one `dms` (one rate-limit token, however many devices). Returns (a future
        for the whole fan-out, message id, timestamp)."""
        if check.state is KeyState.CHANGED:
            raise KeyChanged(check)
        user = check.name
        theirs, _ = self.devices_of(user, check)
        own = theirs if user == self.user else self.devices_of(self.user)[0]
        state = self.state
        targets = envelope.fanout_targets(state.device_id, theirs, own)
        if user != self.user and not theirs.devices:
            raise DeviceRecordError(
                f"{user} has no device signed by their identity key; nothing was sent"
            )
        self._start_sessions(targets)
        message_id, ts = new_message_id(), _now_ms()
        with state.lock:
            reachable = [t for t in targets if not state.sessions.needs_session(t)]
            envelopes = envelope.encrypt_dm(
                state.sessions, state.tracker, reachable, user, message_id, ts, text
            )
            state.save()
        items = [_dm_fields(user, env, message_id) for env in envelopes]
        return _gather(self._send_batched(items), message_id, ts), message_id, ts

    def send_sas(self, target: DeviceRecord, body: str) -> Future[dict[str, Any]]:
        """Send one verification message (inner kind "sas") to exactly one device; the receiver
        hands it to its verifier, never to the chat."""
        return self.send_one(target, body, inner.SAS_KIND, "the verification message")

    def send_room_keys(
        self, targets: list[DeviceRecord], payload: str
    ) -> tuple[list[tuple[DeviceRecord, Future[dict[str, Any]]]], list[tuple[DeviceRecord, str]]]:
        """Send a room-key payload (inner kind "room_key") to each of `targets`, each in its own
        Olm message (no fan-out to our own devices), in as few `dms` requests as the frame size
        allows, prekeys claimed for all of them at once; the receiver hands it to its room keys,
        never to the chat. Returns each target sent to with the future of its own result, and
        each target it could not be sent to with the reason."""
        items, refused = self._seal(targets, payload, inner.ROOM_KEY_KIND, "the room key")
        futures = self._send_batched([item for _, item in items])
        return [(t, f) for (t, _), f in zip(items, futures, strict=True)], refused

    def send_one(
        self, target: DeviceRecord, body: str, kind: str, what: str
    ) -> Future[dict[str, Any]]:
        """Encrypt `body` as an inner record of `kind` to exactly one device: no fan-out to our
        own devices. Raises DeviceRecordError, naming `what`, if no Olm session can be made."""
        items, refused = self._seal([target], body, kind, what)
        if refused:
            raise DeviceRecordError(refused[0][1])
        ((_, item),) = items
        return self._request("dm", **item)

    def _seal(
        self, targets: list[DeviceRecord], body: str, kind: str, what: str
    ) -> tuple[list[tuple[DeviceRecord, dict[str, Any]]], list[tuple[DeviceRecord, str]]]:
        """`body` as an inner record of `kind` for each of `targets` on its own (a message id
        each), as the fields of its `dm`; and the targets no Olm session could be made with."""
        self._start_sessions(targets)
        state = self.state
        items, refused = [], []
        with state.lock:
            for target in targets:
                if state.sessions.needs_session(target):
                    why = (
                        f"no secure session with {target.user}'s device {target.device_id}; "
                        f"{what} was not sent"
                    )
                    refused.append((target, why))
                    continue
                message_id = new_message_id()
                (env,) = envelope.encrypt_dm(
                    state.sessions,
                    state.tracker,
                    [target],
                    target.user,
                    message_id,
                    _now_ms(),
                    body,
                    kind,
                )
                items.append((target, _dm_fields(target.user, env, message_id)))
            if items:
                state.save()
        return items, refused

    def _send_batched(self, items: list[dict[str, Any]]) -> list[Future[dict[str, Any]]]:
        """Send the `dm` fields of `items` as `dms` requests (each within the frame size and
        DMS_MAX envelopes); one future per item, with that item's own result or refusal."""
        futures: list[Future[dict[str, Any]]] = []
        for batch in _batches(items, self._max_frame, DMS_MAX):
            mine: list[Future[dict[str, Any]]] = [Future() for _ in batch]
            self._request("dms", messages=batch).add_done_callback(
                functools.partial(_split, items=mine)
            )
            futures += mine
        return futures

    def _start_sessions(self, targets: list[DeviceRecord]) -> None:
        """Claim a prekey of each target we have no session with (many users a request) and
        start those sessions; a target whose prekey is missing or bad is warned about."""
        with self.state.lock:
            lacking = envelope.needs_prekeys(self.state.sessions, targets)
        for claim in _claims(lacking, claim_devices_max(self._max_frame)):
            wanted: dict[str, list[str]] = {}
            for target in claim:
                wanted.setdefault(target.user, []).append(target.device_id)
            reply = self._ask("claim_prekeys", users=wanted)
            found = reply.get("users")
            by_user: dict[str, Any] = found if isinstance(found, dict) else {}
            for target in claim:
                keys = by_user.get(target.user)
                self._start_session(target, keys if isinstance(keys, dict) else {})

    def _start_session(self, target: DeviceRecord, keys: dict[str, Any]) -> None:
        user = target.user
        try:
            claimed = prekeys.verify_prekey(keys.get(target.device_id), target)
        except PrekeyError as exc:
            self._warn(
                DeviceWarning(
                    user,
                    f"no secure session with {user}'s device {target.device_id} ({exc});"
                    " it will not get this message",
                )
            )
            return
        with self.state.lock:
            note = self.state.sessions.start_session(self.state.device, target, claimed)
        if note is not None:
            self._warn(DeviceWarning(user, note.text))

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, frame: dict[str, Any]) -> Event | SasRecord | RoomKeyRecord | None:
        """Turn a delivered `dm` frame into a DirectMessage, or a DMRejected saying why not; a
        verification message (inner kind "sas") into a SasRecord for the verifier, a room-key
        message (inner kind "room_key") into a RoomKeyRecord for the room keys.

        None for a DM from the server's queue that was already shown: the server redelivers until
        we acknowledge, so a repeat of that kind is expected and shown once only.
        """
        sender = frame.get("from") if isinstance(frame.get("from"), str) else ""
        sender_device = frame.get("from_device")
        data = _b64(frame.get("data"))
        if not sender or not isinstance(sender_device, str) or data is None:
            return DMRejected(sender or "?", "tampered", "a direct message arrived malformed")
        pinned_before = self.known_keys.state(sender)
        try:
            record = self._sender_device(sender, sender_device)
        except KeyChanged as exc:
            return DMRejected(sender, "key_changed", exc.check.warning(), exc.check)
        except (E2EError, TimeoutError) as exc:
            return DMRejected(sender, "unsigned_device", str(exc))
        if record is None:
            return DMRejected(
                sender,
                "unsigned_device",
                f"a direct message came from {sender}'s device {sender_device}, which is not "
                f"signed by {sender}'s pinned identity key (or was revoked); it was refused. The "
                "server may be adding a device of its own",
            )
        state = self.state
        with state.lock:
            if state.tracker.guard.seen(sender, _str(frame)):
                # Accepted before: its message keys are spent, so do not try them (a failure would
                # look like a broken session). From the queue it is a redelivery of what we showed
                # before the ack was lost; live, the server is replaying it.
                if frame.get("queued") is True:
                    return None
                return DMRejected(
                    sender,
                    "replayed",
                    f"a direct message from {sender} arrived again; the copy was dropped. The "
                    "server may be replaying old messages",
                )
            try:
                opened = envelope.open_envelope(
                    state.sessions, state.device, state.tracker, sender, record, data, _now_ms()
                )
            except (ReplayedRecord, ReplayedMessage) as exc:
                if frame.get("queued") is True:
                    return None
                return DMRejected(sender, "replayed", str(exc))
            except (E2EError, SealError) as exc:
                return DMRejected(sender, _kind(exc), str(exc))
            finally:
                state.save()  # a refusal may still have changed state (a wedged session)
        if opened.note is not None:
            self._warn(DeviceWarning(sender, opened.note.text))
        return self._delivered(sender, opened.delivery, pinned_before)

    def _delivered(
        self, sender: str, delivery: Delivery, pinned_before: KeyState | None
    ) -> DirectMessage | SasRecord | RoomKeyRecord:
        record = delivery.record
        notice = delivery.notice(self.user)
        if record.kind in (inner.SAS_KIND, inner.ROOM_KEY_KIND):
            if notice is not None:
                self._warn(DeviceWarning(sender, notice))
            if record.kind == inner.ROOM_KEY_KIND:
                return RoomKeyRecord(sender, record.sender_device, record.body)
            return SasRecord(sender, record.sender_device, record.body, record.ts)
        trust = self.known_keys.state(sender) if pinned_before is not None else None
        mine = sender == self.user
        key_state = KeyState.VERIFIED.value if mine else (trust or KeyState.NEW).value
        return DirectMessage(
            record.sender,
            record.recipient,
            record.body,
            record.ts,
            record.message_id,
            key_state,
            notice=notice,
            device=record.sender_device,
            own=mine,
        )

    def known_list(self, user: str) -> DeviceList | None:
        """`user`'s device list as last fetched and checked, or None (none fetched yet)."""
        return self._lists.get(user)

    def known_device(self, user: str, device_id: str) -> DeviceRecord | None:
        """`user`'s device as last checked against the pinned key, or None."""
        known = self._lists.get(user)
        return known.get(device_id) if known is not None else None

    def _sender_device(self, sender: str, device_id: str) -> DeviceRecord | None:
        known = self._lists.get(sender)
        if known is None or known.get(device_id) is None:
            known, _ = self.devices_of(sender)
        return known.get(device_id)


def _dm_fields(to: str, env: envelope.Envelope, message_id: str) -> dict[str, Any]:
    """The fields of a `dm` (or of one item of a `dms`) carrying `env`."""
    return {
        "to": to,
        "user": env.recipient,
        "device": env.recipient_device,
        "msg_id": message_id,
        "data": base64.b64encode(env.data).decode("ascii"),
    }


def _gather(
    futures: list[Future[dict[str, Any]]], message_id: str, ts: int
) -> Future[dict[str, Any]]:
    """One future for a fan-out: "delivered" if any device got it at once, else "queued"; the
    first refusal if every envelope was refused."""
    done: Future[dict[str, Any]] = Future()
    if not futures:
        done.set_result({"msg_id": message_id, "ts": ts, "status": "queued", "devices": 0})
        return done
    left = [len(futures)]
    lock = threading.Lock()

    def one(_: Future[dict[str, Any]]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        ok = [f.result() for f in futures if f.exception() is None]
        if not ok:
            done.set_exception(futures[0].exception())
            return
        delivered = any(r.get("status") == "delivered" for r in ok)
        status = "delivered" if delivered else "queued"
        done.set_result({"msg_id": message_id, "ts": ts, "status": status, "devices": len(ok)})

    for future in futures:
        future.add_done_callback(one)
    return done


def _claims(targets: list[DeviceRecord], most: int) -> list[list[DeviceRecord]]:
    """`targets` in claims the server takes: at most `most` devices of at most CLAIM_USERS_MAX
    users each."""
    out: list[list[DeviceRecord]] = []
    users: set[str] = set()
    for target in targets:
        full = out and len(out[-1]) >= most
        if not out or full or (target.user not in users and len(users) >= CLAIM_USERS_MAX):
            out.append([])
            users = set()
        out[-1].append(target)
        users.add(target.user)
    return out


def _split(done: Future[dict[str, Any]], items: list[Future[dict[str, Any]]]) -> None:
    """Resolve the future of each item of a `dms` from the reply's result for it."""
    exc = done.exception()
    results = None if exc is not None else done.result().get("results")
    if exc is None and (not isinstance(results, list) or len(results) != len(items)):
        exc = ProtocolError(ErrorCode.BAD_FRAME, "the server's answer to a dms was malformed")
    for i, future in enumerate(items):
        if exc is not None:
            future.set_exception(exc)
            continue
        assert isinstance(results, list)
        result = results[i] if isinstance(results[i], dict) else {}
        if result.get("status") in ("delivered", "queued"):
            future.set_result(result)
        else:
            future.set_exception(RequestError(result))


def _batches(
    items: list[dict[str, Any]], max_frame: int, most: int = 100
) -> list[list[dict[str, Any]]]:
    """`items` in lists whose frames stay under `max_frame` bytes (and `most` items)."""
    budget = max_frame - 256  # the frame's own fields
    out: list[list[dict[str, Any]]] = [[]]
    used = 0
    for item in items:
        size = len(json.dumps(item)) + 2
        if out[-1] and (used + size > budget or len(out[-1]) >= most):
            out.append([])
            used = 0
        out[-1].append(item)
        used += size
    return [b for b in out if b]


def _b64(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _str(frame: dict[str, Any]) -> str:
    value = frame.get("msg_id")
    return value if isinstance(value, str) else ""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
