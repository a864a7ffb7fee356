"""Direct messages on the client: key look-up against pinned keys, sealing, and opening.

The server relays sealed envelopes and stamps the sender; it cannot read them, and this module
is where its claims are checked. A key the server offers that differs from the pinned one stops
sending to that name; a DM that fails any check becomes a DMRejected event, never a message.

The replay guard outlives connections: one ReplayMemory per identity and name for the whole
process, shared by every Client that logs in as them. A reconnect (the terminal and the GUI make a
new Client each time) must not give a hostile server a fresh guard to replay old DMs past.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable
from typing import Any

from securechat import sealing
from securechat.client.events import DirectMessage, DMRejected, Event
from securechat.identity import Identity
from securechat.trust import KeyChanged, KeyCheck, KeyState, KnownKeys

# What each refusal is called in a DMRejected event (stable words for UIs and tests).
REJECTION_KINDS: tuple[tuple[type[sealing.SealError], str], ...] = (
    (sealing.ReflectedMessage, "reflected"),
    (sealing.MisroutedMessage, "misrouted"),
    (sealing.ForgedSender, "forged"),
    (sealing.ReplayedMessage, "replayed"),
    (sealing.StaleMessage, "stale"),
    (sealing.UnsupportedEnvelope, "unsupported"),
    (sealing.SealError, "tampered"),
)


def _kind(exc: sealing.SealError) -> str:
    return next(kind for cls, kind in REJECTION_KINDS if isinstance(exc, cls))


class ReplayMemory:
    """A thread-safe ReplayGuard. Bounded by the guard itself: it forgets a DM once its sealed
    time leaves the accepted window (the server keeps DMs for at most a week) and holds at most
    sealing.MAX_REMEMBERED_DEFAULT of them."""

    def __init__(self, guard: sealing.ReplayGuard | None = None) -> None:
        self._guard = guard or sealing.ReplayGuard()
        self._lock = threading.Lock()

    def check(self, opened: sealing.OpenedDM) -> None:
        """Accept and remember `opened`, or raise ReplayedMessage / StaleMessage."""
        with self._lock:
            self._guard.check(opened)

    def __len__(self) -> int:
        with self._lock:
            return len(self._guard)


_process_memories: dict[tuple[bytes, str], ReplayMemory] = {}
_process_lock = threading.Lock()


def process_replay_memory(identity: Identity, user: str) -> ReplayMemory:
    """The one ReplayMemory of this process for `user` logged in with `identity`."""
    with _process_lock:
        return _process_memories.setdefault((identity.verify_key_bytes, user), ReplayMemory())


def _b64(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


class DirectMessages:
    """Seals outgoing DMs and checks incoming ones for one logged-in identity."""

    def __init__(
        self,
        identity: Identity,
        user: str,
        known_keys: KnownKeys,
        *,
        seen: Callable[[str, str], bool] | None = None,
        replays: ReplayMemory | None = None,
    ) -> None:
        self.identity = identity
        self.user = user
        self.known_keys = known_keys
        # seen(sender, msg_id): shown in an earlier run (the local history knows), so the
        # replay guard's memory, which dies with the process, is not the only defence. A
        # history that cannot be read answers False: the guard then still refuses repeats.
        self._seen = seen
        self.replays = replays if replays is not None else process_replay_memory(identity, user)
        self._lock = threading.Lock()  # one check-and-record at a time

    def seal_to(self, check: KeyCheck, text: str) -> sealing.SealedDM:
        """Seal `text` for the checked key; refuses (KeyChanged) a key that is not pinned."""
        if check.state is KeyState.CHANGED:
            raise KeyChanged(check)
        return sealing.seal(self.identity.signing_key, self.user, check.name, check.key, text)

    def receive(self, frame: dict[str, Any]) -> Event | None:
        """Turn a delivered `dm` frame into a DirectMessage, or a DMRejected saying why not.

        None for a DM from the server's queue that we have already shown: the server redelivers
        until we acknowledge, so a repeat of that kind is expected and shown once only.
        """
        sender = frame.get("from") if isinstance(frame.get("from"), str) else ""
        msg_id = frame.get("msg_id") if isinstance(frame.get("msg_id"), str) else ""
        envelope, sender_key = _b64(frame.get("box")), _b64(frame.get("from_key"))
        if not sender or envelope is None or sender_key is None or len(sender_key) != 32:
            return DMRejected(sender or "?", "tampered", "a direct message arrived malformed")
        try:
            opened = sealing.open_sealed(
                self.identity.signing_key,
                self.user,
                sender,
                sender_key,
                envelope,
                expected_message_id=msg_id,
            )
        except sealing.SealError as exc:
            return DMRejected(sender, _kind(exc), str(exc))
        # Pin or compare the sender's key only once the message proved it holds that key.
        check = self.known_keys.check(sender, sender_key)
        if check.state is KeyState.CHANGED:
            return DMRejected(sender, "key_changed", check.warning(), check)
        with self._lock:
            try:
                self.replays.check(opened)
                if self._seen is not None and self._seen(opened.sender, opened.message_id):
                    raise sealing.ReplayedMessage(
                        f"a direct message from {sender} arrived again (shown in an earlier"
                        " session); the copy was dropped. The server may be replaying old messages"
                    )
            except sealing.ReplayedMessage as exc:
                if frame.get("queued") is True:
                    return None
                return DMRejected(sender, _kind(exc), str(exc))
            except sealing.SealError as exc:
                return DMRejected(sender, _kind(exc), str(exc))
        return DirectMessage(
            opened.sender,
            opened.recipient,
            opened.body,
            opened.ts,
            opened.message_id,
            check.state.value,
        )
