"""Emoji verification (SAS) on the client: carries e2e/sas.py's messages inside Olm DMs (inner
kind "sas") between this device and one device of the other person, and turns each step into an
EmojiVerification event for the front end.

One verification per other person at a time. The identity key compared is fixed when the
verification starts (the initiator's: the key /verify showed; the responder's: the key it has
pinned for the sender), and a match marks exactly that key verified, through
KnownKeys.mark_shown_verified, never a key fetched later. The messages travel only between
devices signed by the pinned identity keys (DirectMessages checks the sender's device), so the
server sees opaque DMs. Thread-safe: the DM thread feeds receive(), the user's thread calls the
rest.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from securechat.client.connection import RequestError
from securechat.client.dm import DirectMessages
from securechat.client.events import DeviceWarning, EmojiVerification, Event, SasRecord
from securechat.e2e import sas
from securechat.e2e.records import DeviceRecord
from securechat.errors import (
    E2EError,
    SasMessageError,
    SasMismatch,
    VerificationError,
    VerificationFailed,
)
from securechat.identity import fingerprint
from securechat.trust import TrustError, Verification

# The cancel codes that mean someone may be intercepting (ours or the other device's).
MISMATCH_CODES = frozenset(
    c.wire
    for c in (
        sas.CancelCode.MISMATCHED_SAS,
        sas.CancelCode.KEY_MISMATCH,
        sas.CancelCode.MISMATCHED_COMMITMENT,
        sas.CancelCode.MAC_MISMATCH,
    )
)
MAX_REQUEST_AGE_MS = int(sas.TIMEOUT_SECONDS * 1000)  # an older queued request has expired


@dataclass
class _Pending:
    """A verification with one person: a request waiting for our user (sas None), or running."""

    device: DeviceRecord
    shown: Verification  # the key compared, as mark_shown_verified wants it
    start: sas.Start
    sas: sas.SasVerification | None = None
    deadline: float = 0.0  # for a request our user has not answered yet


class EmojiVerifier:
    def __init__(
        self,
        dms: DirectMessages,
        emit: Callable[[Event], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dms = dms
        self._emit = emit
        self.clock = clock
        self._lock = threading.RLock()
        self._by_user: dict[str, _Pending] = {}

    def _me(self) -> sas.SasParty:
        dms = self._dms
        return sas.SasParty(dms.user, dms.state.device_id, dms.identity.verify_key_bytes)

    def _event(
        self,
        p: _Pending,
        stage: str,
        detail: str,
        *,
        emoji: str = "",
        decimals: str = "",
        fingerprint: str = "",
        mismatch: bool = False,
    ) -> None:
        self._emit(
            EmojiVerification(
                p.shown.name,
                p.device.device_id,
                stage,
                detail,
                emoji,
                decimals,
                fingerprint,
                mismatch,
            )
        )

    def _send(self, p: _Pending, messages: tuple[sas.SasMessage, ...]) -> None:
        for message in messages:
            self._dms.send_sas(p.device, message.encode().decode("ascii"))

    # -- the user's side ------------------------------------------------------------------------

    def _answer_theirs(self, user: str) -> EmojiVerification | None:
        """Accept `user`'s request waiting for our answer, if there is one (lock held)."""
        waiting = self._by_user.get(user)
        if waiting is None or waiting.sas is not None:
            return None
        return self.accept(user)

    def start(self, shown: Verification, device_id: str | None = None) -> EmojiVerification:
        """Ask one of `shown.name`'s devices (the one named, else the one seen last) to compare
        emoji over the pinned key `shown` showed. Raises VerificationError when that key is not
        the one pinned (compare safety numbers first), or the person has no such device."""
        user = shown.name
        if user == self._dms.user:
            raise VerificationError("your own devices share your identity key: nothing to compare")
        with self._lock:
            # They asked first: asking back means yes (so two requests never cross).
            accepted = self._answer_theirs(user)
            if accepted is not None:
                return accepted
        if shown.offered_key is not None:
            raise VerificationError(
                f"the server offers {user} a key other than the pinned one; compare safety "
                f"numbers (/verify {user}) before comparing emoji"
            )
        found, reply = self._dms.devices_of(user)
        device = self._pick(user, found.devices, reply, device_id)
        with self._lock:
            # Their request came in while we looked their devices up: answer it instead of
            # replacing it with ours, so the two never cross.
            accepted = self._answer_theirs(user)
            if accepted is not None:
                return accepted
            verification, start = sas.SasVerification.initiate(
                self._me(),
                sas.SasParty(user, device.device_id, shown.pinned_key),
                clock=self.clock,
            )
            p = _Pending(device, shown, start, verification)
            self._by_user[user] = p
        try:
            status = self._dms.send_sas(device, start.encode().decode("ascii")).result(10.0)
        except BaseException:
            with self._lock:
                if self._by_user.get(user) is p:
                    del self._by_user[user]  # never asked: nothing to answer or time out
            raise
        where = (
            "it is online"
            if status.get("status") == "delivered"
            else "it is offline; the request waits for it"
        )
        event = EmojiVerification(
            user,
            device.device_id,
            "started",
            f"asked {user}'s device {device.device_id} to compare emoji ({where}); the request "
            f"expires in {sas.TIMEOUT_SECONDS / 60:.0f} minutes",
        )
        self._emit(event)
        return event

    def _pick(
        self,
        user: str,
        devices: tuple[DeviceRecord, ...],
        reply: dict[str, object],
        device_id: str | None,
    ) -> DeviceRecord:
        if device_id is not None:
            named = [d for d in devices if d.device_id == device_id.upper()]
            if not named:
                raise VerificationError(f"{user} has no device {device_id} signed by their key")
            return named[0]
        if not devices:
            raise VerificationError(f"{user} has no device signed by their identity key")
        seen_raw = reply.get("seen")
        seen: dict[object, object] = {
            s.get("device_id"): s.get("last_seen_ms")
            for s in (seen_raw if isinstance(seen_raw, list) else [])
            if isinstance(s, dict)
        }

        def last_seen(d: DeviceRecord) -> int:
            value = seen.get(d.device_id)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        return max(devices, key=last_seen)

    def _running(self, user: str) -> _Pending:
        p = self._by_user.get(user)
        if p is None:
            raise VerificationError(f"there is no emoji comparison with {user} going on")
        return p

    def accept(self, user: str) -> EmojiVerification | None:
        """Our user agrees to the comparison `user` asked for: answer their device. The
        "started" event, or None when the request turned out not to match (shown as such)."""
        with self._lock:
            p = self._running(user)
            if p.sas is not None:
                raise VerificationError(f"the emoji comparison with {user} is already running")
            try:
                p.sas, accept = sas.SasVerification.respond(
                    p.start, self._me(), p.shown.pinned_key, clock=self.clock
                )
            except SasMismatch as exc:
                self._failed(p, exc)
                return None
            self._send(p, (accept,))
        event = EmojiVerification(
            user, p.device.device_id, "started", f"accepted; exchanging keys with {user}'s device"
        )
        self._emit(event)
        return event

    def confirm(self, user: str) -> None:
        """Our user says both screens show the same emoji."""
        with self._lock:
            p = self._running(user)
            if p.sas is None:
                raise VerificationError(f"accept the comparison with {user} first")
            try:
                out = p.sas.confirm()
            except VerificationFailed as exc:
                self._failed(p, exc)
                return
            self._send(p, out)
            waiting = p.sas.state is not sas.SasState.VERIFIED
        if waiting:
            self._event(p, "waiting", f"confirmed; waiting for {user} to confirm on their side")

    def cancel(self, user: str, *, mismatch: bool = False) -> None:
        """Stop the comparison with `user` (mismatch: our user says the emoji differ)."""
        with self._lock:
            p = self._running(user)
            del self._by_user[user]
            code = sas.CancelCode.MISMATCHED_SAS if mismatch else sas.CancelCode.USER
            if p.sas is not None:
                message = p.sas.cancel(code)
            else:
                message = sas.Cancel(p.start.txn, code.wire)
            if message is not None:
                self._send(p, (message,))
        detail = (
            f"you said the emoji differ: {user} was NOT verified. Someone may be intercepting; "
            f"compare safety numbers in person (/verify {user})"
            if mismatch
            else f"the emoji comparison with {user} was cancelled; nothing was verified"
        )
        self._event(p, "cancelled", detail, mismatch=mismatch)

    def check_timeouts(self) -> None:
        """End every comparison older than the SAS timeout (called from the client's timer)."""
        with self._lock:
            for p in list(self._by_user.values()):
                if p.sas is None:
                    if self.clock() >= p.deadline:
                        self._failed(
                            p,
                            VerificationFailed(
                                f"the request from {p.shown.name} to compare emoji expired",
                                code=sas.CancelCode.TIMEOUT.wire,
                            ),
                        )
                    continue
                try:
                    p.sas.check_timeout()
                except VerificationFailed as exc:
                    self._failed(p, exc)

    # -- the other device's side ----------------------------------------------------------------

    def receive(self, record: SasRecord, now_ms: int) -> None:
        """A verification message that arrived in an Olm DM from `record.sender`'s device, which
        DirectMessages checked is signed by their pinned identity key."""
        try:
            message = sas.decode(record.body.encode("ascii"))
        except (SasMessageError, UnicodeEncodeError) as exc:
            self._warn(record, f"a verification message from {record.sender} was refused: {exc}")
            return
        with self._lock:
            if isinstance(message, sas.Start):
                self._on_start(record, message, now_ms)
                return
            p = self._by_user.get(record.sender)
            if p is None or p.sas is None or p.device.device_id != record.sender_device:
                if p is not None and p.sas is None and isinstance(message, sas.Cancel):
                    del self._by_user[record.sender]
                    why = sas.CancelCode.reason_for(message.code)
                    self._event(
                        p,
                        "cancelled",
                        f"{record.sender}'s device withdrew the request to compare emoji: {why}",
                    )
                return  # a late message of a comparison that ended: nothing to do
            before = p.sas.short_code
            try:
                out = p.sas.receive(message)
            except SasMessageError:
                return  # another transaction's, or after the end: changes nothing
            except VerificationFailed as exc:
                self._failed(p, exc)
                return
            self._send(p, out)
            if before is None and p.sas.short_code is not None:
                code = p.sas.short_code
                self._event(
                    p,
                    "compare",
                    f"compare these with {p.shown.name} (aloud or in person); if they match "
                    "confirm, if not say they differ",
                    emoji=code.emoji_line,
                    decimals=code.decimal_line,
                )
            if p.sas.state is sas.SasState.VERIFIED:
                self._verified(p)

    def _on_start(self, record: SasRecord, start: sas.Start, now_ms: int) -> None:
        sender = record.sender
        if start.from_user != sender or start.from_device != record.sender_device:
            self._warn(
                record,
                f"a verification request inside a DM from {sender} names another sender; it "
                "was refused",
            )
            return
        if now_ms - record.ts > MAX_REQUEST_AGE_MS:
            return  # waited in the server's queue longer than any verification lasts
        device = self._dms.known_device(sender, record.sender_device)
        pinned = self._dms.known_keys.pinned(sender)
        if device is None or pinned is None or sender == self._dms.user:
            return
        ours = self._by_user.get(sender)
        if (
            ours is not None
            and ours.sas is not None
            and ours.sas.role is sas.Role.INITIATOR
            and ours.sas.state is sas.SasState.WAITING_FOR_ACCEPT
            and self._dms.user < sender
        ):
            return  # both asked at once: the request of the name first in order goes on
        check = self._dms.known_keys.check(sender, pinned)
        dms = self._dms
        shown = Verification.of(check, dms.user, dms.identity.verify_key_bytes)
        p = _Pending(device, shown, start, deadline=self.clock() + sas.TIMEOUT_SECONDS)
        self._by_user[sender] = p
        self._event(
            p,
            "requested",
            f"{sender} (device {device.device_id}) wants to compare emoji with you to verify "
            "each other's keys",
        )

    def _verified(self, p: _Pending) -> None:
        self._by_user.pop(p.shown.name, None)
        assert p.sas is not None and p.sas.result is not None
        key = p.sas.result.identity_key
        try:
            self._dms.known_keys.mark_shown_verified(p.shown, key)
        except TrustError as exc:
            self._event(p, "cancelled", f"the emoji matched but nothing was marked: {exc}")
            return
        self._event(
            p,
            "verified",
            f"the emoji matched: {p.shown.name}'s key is now verified "
            f"(fingerprint {fingerprint(key)})",
            fingerprint=fingerprint(key),
        )

    def _failed(self, p: _Pending, exc: VerificationFailed) -> None:
        self._by_user.pop(p.shown.name, None)
        txn = p.sas.txn if p.sas is not None else p.start.txn
        reply = sas.reply_to(exc, txn)
        if reply is not None:
            with contextlib.suppress(E2EError, RequestError, TimeoutError):
                self._send(p, (reply,))  # a courtesy: the failure is shown here either way
        mismatch = isinstance(exc, SasMismatch) or exc.code in MISMATCH_CODES
        warning = " Someone may be intercepting." if mismatch else ""
        self._event(
            p,
            "cancelled",
            f"the emoji comparison with {p.shown.name} failed: {exc}.{warning} "
            f"{p.shown.name} was NOT verified",
            mismatch=mismatch,
        )

    def _warn(self, record: SasRecord, text: str) -> None:
        self._emit(DeviceWarning(record.sender, text))
