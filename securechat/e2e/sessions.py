"""Olm sessions, one set per peer device, kept in memory and exported as encrypted pickles.

Rules:
  1. We encrypt to a device only over a session; with none, claim one of its prekeys (checked
     against its signed device record) and start an outbound session.
  2. A pre-key message goes to the existing session it belongs to (session_matches) before a
     new inbound session is made, so a replayed pre-key message meets the used-up ratchet
     instead of starting a second session.
  3. A message that does not decrypt is an UndecryptableMessage, never shown. If no session with
     that device decrypts it, the device is marked wedged (at most once an hour per device, so a
     replaying server cannot make us burn its one-time keys): the caller then starts a new
     session, and the front end shows the note that says so.
  4. The newest working session is the one we encrypt with; a few older ones are kept for
     messages still in flight.
Sessions are keyed by (user, device id, Curve25519 key), so a record with other keys never meets
an old session. Not thread-safe: one thread owns the store. No I/O here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import vodozemac

from securechat.e2e.device import Device, valid_device_id
from securechat.e2e.prekeys import SignedPrekey
from securechat.e2e.records import DeviceRecord
from securechat.errors import DeviceStateError, NoSession, UndecryptableMessage

MAX_SESSIONS_PER_DEVICE = 4
UNWEDGE_INTERVAL_MS = 60 * 60 * 1000
OLM_PRE_KEY, OLM_NORMAL = 0, 1

_PeerKey = tuple[str, str, str]
# Every exception vodozemac raises derives from ValueError; a hostile message must not escape
# as anything but UndecryptableMessage.
_OLM_FAILURE = ValueError


class NoteKind(enum.Enum):
    RESTARTED = "restarted"  # we started a new session because the old one broke
    PEER_RESTARTED = "peer_restarted"  # the peer device started a new session with us
    DROPPED = "dropped"  # a saved session was damaged and was dropped


@dataclass(frozen=True)
class SessionNote:
    """Something the front end shows about a session, e.g. "a new secure session was started"."""

    kind: NoteKind
    user: str
    device_id: str

    @property
    def text(self) -> str:
        device = f"{self.user}'s device {self.device_id}"
        if self.kind is NoteKind.RESTARTED:
            return (
                f"the secure session with {device} had broken; a new one was started (messages "
                "sent over the old one may be lost)"
            )
        if self.kind is NoteKind.PEER_RESTARTED:
            return f"{device} started a new secure session with you"
        return f"the saved secure session with {device} was damaged; a new one will be started"


@dataclass(frozen=True)
class Decrypted:
    """A decrypted plaintext. `new_session` is the inbound session a pre-key message started:
    it joins the store only through adopt(), once the record inside was accepted, so a replayed
    pre-key message never leaves a session behind."""

    plaintext: bytes
    new_session: vodozemac.Session | None = field(default=None, repr=False, compare=False)

    @property
    def account_changed(self) -> bool:
        """A one-time key was used up: save the device."""
        return self.new_session is not None


def _key(peer: DeviceRecord) -> _PeerKey:
    return (peer.user, peer.device_id, peer.curve25519)


def _curve(key: str) -> vodozemac.Curve25519PublicKey:
    return vodozemac.Curve25519PublicKey.from_base64(key)


class SessionStore:
    def __init__(self) -> None:
        self._sessions: dict[_PeerKey, list[vodozemac.Session]] = {}
        self._wedged: set[_PeerKey] = set()
        self._last_wedged: dict[_PeerKey, int] = {}

    # -- sending ----------------------------------------------------------------------------------

    def needs_session(self, peer: DeviceRecord) -> bool:
        """True when a prekey of `peer` must be claimed before encrypting to it."""
        key = _key(peer)
        return key in self._wedged or not self._sessions.get(key)

    def start_session(
        self, device: Device, peer: DeviceRecord, prekey: SignedPrekey
    ) -> SessionNote | None:
        """Start an outbound session to `peer` from a prekey that verify_prekey accepted."""
        if (prekey.user, prekey.device_id) != (peer.user, peer.device_id):
            raise NoSession(
                f"the prekey given for {peer.user}'s device {peer.device_id} belongs to another "
                "device"
            )
        session = device.account.create_outbound_session(
            _curve(peer.curve25519), _curve(prekey.key)
        )
        key = _key(peer)
        restarted = key in self._wedged and bool(self._sessions.get(key))
        self._wedged.discard(key)
        self._push(key, session)
        return SessionNote(NoteKind.RESTARTED, peer.user, peer.device_id) if restarted else None

    def encrypt(self, peer: DeviceRecord, plaintext: bytes) -> tuple[int, bytes]:
        """(Olm message type, ciphertext) for `peer`; NoSession if a prekey is needed first."""
        if self.needs_session(peer):
            raise NoSession(
                f"there is no working secure session with {peer.user}'s device "
                f"{peer.device_id}; claim one of its prekeys first"
            )
        message_type, ciphertext = self._sessions[_key(peer)][0].encrypt(plaintext).to_parts()
        return int(message_type), bytes(ciphertext)

    # -- receiving --------------------------------------------------------------------------------

    def decrypt(
        self, device: Device, peer: DeviceRecord, message_type: int, ciphertext: bytes, now_ms: int
    ) -> Decrypted:
        """Decrypt a message that `peer` sent to `device`; UndecryptableMessage on failure.

        Pass the result to adopt() once the record inside has been accepted.
        """
        key = _key(peer)
        try:
            message = vodozemac.AnyOlmMessage.from_parts(message_type, ciphertext)
        except (_OLM_FAILURE, OverflowError, TypeError):
            raise self._undecryptable(peer, "it is not a well-formed Olm message") from None
        sessions = self._sessions.get(key, [])
        pre_key = message.to_pre_key()
        if pre_key is not None:
            matching = next((s for s in sessions if s.session_matches(pre_key)), None)
            if matching is not None:
                return Decrypted(self._decrypt_with(key, peer, matching, message))
            return self._inbound(device, peer, pre_key)
        for session in sessions:
            try:
                plaintext = session.decrypt(message)
            except _OLM_FAILURE:
                continue
            self._push(key, session)
            return Decrypted(bytes(plaintext))
        # Whether we lost our sessions or they fell out of step, a new one from our side mends it.
        last = self._last_wedged.get(key)
        wedged = last is None or now_ms - last >= UNWEDGE_INTERVAL_MS
        if wedged:
            self._wedged.add(key)
            self._last_wedged[key] = now_ms
        why = "no secure session with that device decrypts it"
        raise self._undecryptable(peer, why, wedged=wedged)

    def _decrypt_with(
        self, key: _PeerKey, peer: DeviceRecord, session: vodozemac.Session, message: Any
    ) -> bytes:
        try:
            plaintext = session.decrypt(message)
        except _OLM_FAILURE:
            # The session it belongs to has already used this message's key, or it was altered.
            raise self._undecryptable(
                peer, "it was already decrypted once, or altered (a replayed or forged copy)"
            ) from None
        self._push(key, session)
        return bytes(plaintext)

    def _inbound(
        self, device: Device, peer: DeviceRecord, pre_key: vodozemac.PreKeyMessage
    ) -> Decrypted:
        try:
            session, plaintext = device.account.create_inbound_session(
                _curve(peer.curve25519), pre_key
            )
        except _OLM_FAILURE:
            raise self._undecryptable(
                peer,
                "it starts a session with a one-time key that is unknown or already used (the "
                "server may be replaying it, or handing out a key twice)",
            ) from None
        return Decrypted(bytes(plaintext), session)

    def adopt(self, peer: DeviceRecord, decrypted: Decrypted) -> SessionNote | None:
        """Keep the session a pre-key message started (if any); a note if it replaced others."""
        if decrypted.new_session is None:
            return None
        key = _key(peer)
        had_sessions = bool(self._sessions.get(key))
        self._wedged.discard(key)
        self._push(key, decrypted.new_session)
        if had_sessions:
            return SessionNote(NoteKind.PEER_RESTARTED, peer.user, peer.device_id)
        return None

    @staticmethod
    def _undecryptable(
        peer: DeviceRecord, why: str, *, wedged: bool = False
    ) -> UndecryptableMessage:
        return UndecryptableMessage(
            f"a message from {peer.user}'s device {peer.device_id} could not be decrypted and "
            f"was dropped: {why}",
            user=peer.user,
            device_id=peer.device_id,
            wedged=wedged,
        )

    def _push(self, key: _PeerKey, session: vodozemac.Session) -> None:
        rest = [s for s in self._sessions.get(key, []) if s.session_id != session.session_id]
        self._sessions[key] = [session, *rest][:MAX_SESSIONS_PER_DEVICE]

    # -- devices that go away ---------------------------------------------------------------------

    def forget(self, user: str, device_id: str) -> None:
        """Drop every session with a device (it was revoked)."""
        for key in [k for k in self._sessions if k[:2] == (user, device_id)]:
            del self._sessions[key]
            self._wedged.discard(key)
            self._last_wedged.pop(key, None)

    def session_count(self, peer: DeviceRecord) -> int:
        return len(self._sessions.get(_key(peer), []))

    # -- persistence ------------------------------------------------------------------------------

    def export(self, pickle_key: bytes) -> dict[str, Any]:
        """JSON-able state; every session is a vodozemac pickle encrypted under `pickle_key`."""
        return {
            "version": 1,
            "peers": [
                {
                    "user": user,
                    "device_id": device_id,
                    "curve25519": curve,
                    "wedged": (user, device_id, curve) in self._wedged,
                    "sessions": [s.pickle(pickle_key) for s in sessions],
                }
                for (user, device_id, curve), sessions in sorted(self._sessions.items())
            ],
        }

    @classmethod
    def load(
        cls, data: dict[str, Any], pickle_key: bytes, what: str
    ) -> tuple[SessionStore, list[SessionNote]]:
        """The store `export` gave, and a note for each saved session that was damaged."""
        store, notes = cls(), []
        peers = data.get("peers")
        if data.get("version") != 1 or not isinstance(peers, list):
            raise DeviceStateError(f"{what} is damaged (bad format)")
        for item in peers:
            if not isinstance(item, dict) or not isinstance(item.get("sessions"), list):
                raise DeviceStateError(f"{what} is damaged (bad entry)")
            user, device_id, curve = item.get("user"), item.get("device_id"), item.get("curve25519")
            if not (
                isinstance(user, str) and valid_device_id(device_id) and isinstance(curve, str)
            ):
                raise DeviceStateError(f"{what} is damaged (bad entry)")
            key = (user, device_id, curve)
            sessions = []
            for pickled in item["sessions"]:
                try:
                    sessions.append(vodozemac.Session.from_pickle(pickled, pickle_key))
                except (vodozemac.PickleException, TypeError):
                    notes.append(SessionNote(NoteKind.DROPPED, user, device_id))
            if sessions:
                store._sessions[key] = sessions[:MAX_SESSIONS_PER_DEVICE]
            if item.get("wedged") is True or len(sessions) < len(item["sessions"]):
                store._wedged.add(key)
                store._sessions.setdefault(key, [])
        return store, notes
