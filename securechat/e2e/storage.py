"""The device's files beside the key file, sealed under keys only the unlocked identity derives.

    alice.key -> alice.device.json          the Olm account, its device id and creation time
              -> alice.olm-sessions.json    the Olm sessions with other devices
              -> alice.conversations.json   sequence numbers, hash chains, message ids seen
              -> alice.rooms.json           room modes, Megolm sessions, strict rooms

Each is written atomically with mode 0600; one that group or others may read or write is
refused, as the key file is. The one module in securechat/e2e that touches the disk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securechat.e2e import atrest
from securechat.e2e.conversations import ConversationTracker
from securechat.e2e.device import Device
from securechat.e2e.sessions import SessionNote, SessionStore
from securechat.errors import DeviceStateError
from securechat.files import write_atomically
from securechat.identity import Identity

MAX_FILE_BYTES = 64 * 1024 * 1024  # sessions and chains of thousands of contacts fit easily

DEVICE_FORMAT = "securechat-device"
SESSIONS_FORMAT = "securechat-olm-sessions"
CONVERSATIONS_FORMAT = "securechat-conversations"
ROOMS_FORMAT = "securechat-rooms"
PURPOSE_ROOMS_FILE = b"sc-e2e-rooms"


def _beside(identity: Identity, suffix: str) -> Path:
    if identity.path is None:
        raise DeviceStateError("an identity without a key file has no place for a device")
    path = Path(identity.path)
    return path.with_name(f"{path.stem or path.name}.{suffix}")


def device_path(identity: Identity) -> Path:
    return _beside(identity, "device.json")


def sessions_path(identity: Identity) -> Path:
    return _beside(identity, "olm-sessions.json")


def conversations_path(identity: Identity) -> Path:
    return _beside(identity, "conversations.json")


def rooms_path(identity: Identity) -> Path:
    return _beside(identity, "rooms.json")


def read_private(path: Path) -> bytes | None:
    """The bytes of a private file, None if there is none; refuses one others may open."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DeviceStateError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DeviceStateError(f"{path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if os.name == "posix" and mode & 0o077:
            raise DeviceStateError(
                f"permissions {mode:04o} for '{path}' are too open; it must be readable by you "
                f"only (chmod 600 {path})"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise DeviceStateError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise DeviceStateError(f"{path} is damaged (larger than any such file can be)")
    return raw


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(path, data, 0o600)
    except OSError as exc:
        raise DeviceStateError(f"cannot write {path}: {exc.strerror or exc}") from None


# -- the device -----------------------------------------------------------------------------------


def save_device(identity: Identity, device: Device) -> None:
    """Write the device file; call after creating it and after every change to its account."""
    payload = device.to_state(atrest.pickle_key(identity))
    data = atrest.seal_state(identity, DEVICE_FORMAT, atrest.PURPOSE_DEVICE_FILE, payload)
    _write(device_path(identity), data)


def load_device(identity: Identity) -> Device | None:
    """The device saved beside the key file, None if there is none yet."""
    path = device_path(identity)
    raw = read_private(path)
    if raw is None:
        return None
    what = f"the device file {path}"
    payload = atrest.open_state(identity, DEVICE_FORMAT, atrest.PURPOSE_DEVICE_FILE, raw, what)
    return Device.from_state(payload, atrest.pickle_key(identity), what)


def load_or_create_device(
    identity: Identity, clock_ms: Callable[[], int] | None = None
) -> tuple[Device, bool]:
    """The saved device, or a new one saved now; returns (device, created)."""
    device = load_device(identity)
    if device is not None:
        return device, False
    device = Device.create() if clock_ms is None else Device.create(clock_ms)
    save_device(identity, device)
    return device, True


# -- sessions -------------------------------------------------------------------------------------


def save_sessions(identity: Identity, store: SessionStore) -> None:
    payload = store.export(atrest.pickle_key(identity))
    data = atrest.seal_state(identity, SESSIONS_FORMAT, atrest.PURPOSE_SESSIONS_FILE, payload)
    _write(sessions_path(identity), data)


def load_sessions(identity: Identity) -> tuple[SessionStore, list[SessionNote]]:
    """The saved sessions (an empty store if none), and a note per damaged session dropped."""
    path = sessions_path(identity)
    raw = read_private(path)
    if raw is None:
        return SessionStore(), []
    what = f"the session file {path}"
    payload = atrest.open_state(identity, SESSIONS_FORMAT, atrest.PURPOSE_SESSIONS_FILE, raw, what)
    return SessionStore.load(payload, atrest.pickle_key(identity), what)


# -- conversations --------------------------------------------------------------------------------


def save_tracker(identity: Identity, tracker: ConversationTracker) -> None:
    purpose = atrest.PURPOSE_CONVERSATIONS_FILE
    data = atrest.seal_state(identity, CONVERSATIONS_FORMAT, purpose, tracker.export())
    _write(conversations_path(identity), data)


def load_tracker(identity: Identity, me: str, device: Device) -> ConversationTracker:
    """The saved tracker for `me` on `device` (a fresh one if none)."""
    path = conversations_path(identity)
    raw = read_private(path)
    if raw is None:
        return ConversationTracker(me, device.device_id)
    what = f"the conversation file {path}"
    purpose = atrest.PURPOSE_CONVERSATIONS_FILE
    payload = atrest.open_state(identity, CONVERSATIONS_FORMAT, purpose, raw, what)
    return ConversationTracker.load(payload, me, device.device_id, what)


# -- encrypted rooms ------------------------------------------------------------------------------


def save_rooms(identity: Identity, payload: dict[str, Any]) -> None:
    """Write the room state (RoomCrypto's sealed export and the room settings)."""
    data = atrest.seal_state(identity, ROOMS_FORMAT, PURPOSE_ROOMS_FILE, payload)
    _write(rooms_path(identity), data)


def load_rooms(identity: Identity) -> dict[str, Any] | None:
    """The saved room state, None if there is none yet."""
    path = rooms_path(identity)
    raw = read_private(path)
    if raw is None:
        return None
    what = f"the room key file {path}"
    return atrest.open_state(identity, ROOMS_FORMAT, PURPOSE_ROOMS_FILE, raw, what)
