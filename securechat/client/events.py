"""What a Client reports to its user: plain immutable events, one per server frame of interest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from securechat.trust import KeyCheck


def _when(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


@dataclass(frozen=True)
class Message:
    """A room message, stamped by the server with the sender's authenticated name and time."""

    room: str
    sender: str
    text: str
    ts: int  # server time, milliseconds since the epoch
    action: bool = False  # a /me line
    history: bool = False  # replayed from the room's history, not live
    encrypted: bool = False  # decrypted from an end-to-end encrypted room message, all checks met
    device: str = ""  # the sending device, for an encrypted message
    late: bool = False  # shown before as unreadable: its key came after it

    @property
    def time(self) -> datetime:
        return _when(self.ts)


@dataclass(frozen=True)
class Joined:
    room: str
    user: str
    ts: int

    @property
    def time(self) -> datetime:
        return _when(self.ts)


@dataclass(frozen=True)
class Parted:
    room: str
    user: str
    reason: str
    ts: int

    @property
    def time(self) -> datetime:
        return _when(self.ts)


@dataclass(frozen=True)
class DirectMessage:
    """A DM that decrypted and passed every check: a device signed by the pinned key, names,
    its place in the conversation's chain. A copy of what we sent from another device has
    `sender` equal to our own name and `recipient` the other person."""

    sender: str
    recipient: str
    text: str
    ts: int  # the sender's clock, sealed inside the message
    message_id: str
    key_state: str  # "new", "pinned" or "verified": how far the sender's key is trusted
    notice: str | None = None  # "a message from bob is missing", "(arrived out of order)"
    device: str = ""  # the sending device
    own: bool = False  # a copy of what we sent from another of our devices

    @property
    def time(self) -> datetime:
        return _when(self.ts)


@dataclass(frozen=True)
class DeviceWarning:
    """Something about `user`'s devices to show loudly: a device record not signed by their
    pinned identity key (refused), a secure session that had to be started anew, a device that
    could not be reached."""

    user: str
    detail: str


@dataclass(frozen=True)
class DMRejected:
    """A DM that was NOT shown: `kind` is tampered, misrouted, replayed, stale, broken_chain,
    undecryptable, unsigned_device or key_changed; `detail` is the warning to show. For
    key_changed, `check` holds the key check, so that a front end can word what to do in its own
    commands."""

    sender: str
    kind: str
    detail: str
    check: KeyCheck | None = None


@dataclass(frozen=True)
class FrameDropped:
    """A server frame that was NOT shown because it breaks the protocol's own rules (a room
    message for something that is not a room name, say: a server forging a DM that way).
    `frame_type` is the frame's type; `detail` is the warning to show."""

    frame_type: str
    detail: str


@dataclass(frozen=True)
class EmojiVerification:
    """A step of an emoji comparison (SAS) with `user`'s device `device`. `stage` is one of
    STAGES: "requested" (they asked: accept or cancel), "started" (we asked; waiting for them),
    "compare" (`emoji` and `decimals` to compare aloud, then confirm or say they differ),
    "waiting" (confirmed here; waiting for them), "verified" (the key compared, whose
    fingerprint is `fingerprint`, is now marked verified) or "cancelled" (`mismatch`: the
    emoji, key or MAC did not match, so someone may be intercepting). `detail` is the line to
    show."""

    user: str
    device: str
    stage: str
    detail: str
    emoji: str = ""  # "🐶 Dog  🐱 Cat ...": the 7 emoji with their names
    decimals: str = ""  # "1234 5678 9012"
    fingerprint: str = ""
    mismatch: bool = False


STAGES = ("requested", "started", "compare", "waiting", "verified", "cancelled")


@dataclass(frozen=True)
class SasRecord:
    """A verification message that arrived inside an Olm DM (inner kind "sas"): handed to the
    client's verifier, never shown as chat text nor kept in the local history."""

    sender: str
    sender_device: str
    body: str
    ts: int  # the sender's clock, sealed inside the record


@dataclass(frozen=True)
class RoomKeyRecord:
    """A room-key message that arrived inside an Olm DM (inner kind "room_key"): handed to the
    client's room keys, never shown as chat text nor kept in the local history."""

    sender: str
    sender_device: str
    body: str


@dataclass(frozen=True)
class RoomMember:
    """One member as a member list shows it: `mark` is "verified", "pinned", "new" or "changed";
    `gets_keys` says whether our messages are encrypted to them; `ghost`: the server lists them
    but this client never showed them joining (they get no keys)."""

    user: str
    mark: str
    gets_keys: bool
    ghost: bool = False


@dataclass(frozen=True)
class RoomState:
    """What a room is, as the server announced and this client accepted it: on our join and
    whenever its mode or strictness is learnt. `mode` is "encrypted" or "plain"; `label` the
    words to show ("end-to-end encrypted" / "not end-to-end encrypted"); `strict`: keys go only
    to verified members; `members` the member list with trust marks (empty for a plain room)."""

    room: str
    mode: str
    label: str
    strict: bool = False
    members: tuple[RoomMember, ...] = ()

    @property
    def encrypted(self) -> bool:
        return self.mode == "encrypted"


@dataclass(frozen=True)
class RoomUnreadable:
    """A room message that is NOT shown because this device cannot decrypt it: a marker in its
    place. `reason` is "before_join" (sent before we joined: never readable here) or "no_key"
    (its key has not reached this device yet). `count` > 1 sums up consecutive before-join
    markers ("3 earlier messages were sent before you joined"); `sender` is then "". `detail`
    is the line to show."""

    room: str
    sender: str
    reason: str
    detail: str
    count: int = 1
    history: bool = False


@dataclass(frozen=True)
class RoomWarning:
    """Something about an end-to-end encrypted room to show loudly. `kind` is one of
    ROOM_WARNINGS: a refused message ("replayed", "forged_sender", "untrusted_device",
    "tampered"), "missing" (messages of a sender's session never arrived), "downgrade" (the
    server says plain, or sent plaintext, in a room seen encrypted), "ghost" (listed without a
    join we showed: no keys), "excluded" (a member or device gets no keys, and why),
    "key_refused" (a room key over Olm was refused) or "keys" (information: keys forwarded,
    asked for or sent). `detail` is the line to show; `user` the member concerned, if one."""

    room: str
    kind: str
    detail: str
    user: str = ""


ROOM_WARNINGS = (
    "replayed",
    "forged_sender",
    "untrusted_device",
    "tampered",
    "missing",
    "downgrade",
    "ghost",
    "excluded",
    "key_refused",
    "keys",
)


@dataclass(frozen=True)
class ServerError:
    """An error frame that answers no request of ours (a protocol complaint, say)."""

    code: str
    message: str


@dataclass(frozen=True)
class Closed:
    """The connection is over; always the last event."""

    reason: str


Event = (
    Message | Joined | Parted | DirectMessage | DMRejected | DeviceWarning | FrameDropped
    | EmojiVerification | RoomState | RoomUnreadable | RoomWarning | ServerError | Closed
)  # fmt: skip
