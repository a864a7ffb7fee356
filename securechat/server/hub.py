"""The hub: rooms, presence and routing, the only state shared between I/O loops.

Callers are I/O loop threads. One lock guards every table here, including which rooms each
connection is in (the hub's, not the connection's: a login on one loop may part a connection
owned by another). Inside the lock we only append to loops' inboxes (never a socket write),
which keeps a room's messages in one order for every member. A broadcast frame is encoded once
and the same bytes go to every recipient. Of a connection the hub reads only `user`, `device` and
`loop`, all fixed before it logs in. Users are routed per device: one connection per (user, device).
Each room is end-to-end encrypted or plain, chosen when it is made; in an encrypted room the hub
relays and keeps only ciphertext (say_encrypted), and refuses a plaintext say.
"""

from __future__ import annotations

import base64
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from securechat import framing
from securechat.errors import ErrorCode, ProtocolError
from securechat.protocol import (
    LOBBY,
    MODE_ENCRYPTED,
    MODE_PLAIN,
    TEXT_MAX,
    History,
    Join,
    Part,
    RequestFrame,
    Rooms,
    Say,
    SayEncrypted,
    Who,
    now_ms,
)
from securechat.server.devicestore import DeviceEnvelope
from securechat.server.outbox import Audience, Roster
from securechat.server.store import HistoryFields, HistoryRow

if TYPE_CHECKING:
    from securechat.server.connection import Connection
    from securechat.server.loop import IOLoop

RoomRequest = Join | Part | Say | SayEncrypted | Rooms | Who | History
HISTORY_REPLY_OVERHEAD = 256  # the reply frame's own fields around its messages
MEMBERS_REPLY_OVERHEAD = 256  # likewise around a member list
# What a relayed message_encrypted (marked history) holds besides its ciphertext, at most: type,
# room, from, device, session id, ts, history, with their quotes and commas.
ENCRYPTED_FRAME_OVERHEAD = 512
ROSTER_RESTART = 4  # a room's roster starts afresh once a quarter as many left as are still in it


class Room:
    __slots__ = ("_rosters", "by_loop", "members", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        # Connections, not names: each device of a user is a member of its own.
        self.members: set[Connection] = set()
        # Members grouped by the loop that owns them: one inbox post per loop per broadcast.
        self.by_loop: dict[IOLoop, set[Connection]] = defaultdict(set)
        # Each loop's members as a Roster (server/outbox.py) that logs joins and departures, so
        # that one costs O(1) here and on the loop, not a new audience and feed for everyone.
        self._rosters: dict[IOLoop, Roster] = {}

    def add(self, conn: Connection) -> None:
        self.members.add(conn)
        peers = self.by_loop[conn.loop]
        peers.add(conn)
        self._changed(conn, peers, joined=True)

    def names(self) -> list[str]:
        return sorted({c.user for c in self.members})

    def remove(self, conn: Connection) -> None:
        self.members.discard(conn)
        peers = self.by_loop[conn.loop]
        peers.discard(conn)
        if not peers:
            del self.by_loop[conn.loop]
            self._rosters.pop(conn.loop, None)
        else:
            self._changed(conn, peers, joined=False)

    def _changed(self, conn: Connection, peers: set[Connection], joined: bool) -> None:
        roster = self._rosters.get(conn.loop)
        if roster is None:
            return  # the next broadcast starts one from the members as they are
        if joined or roster.departed * ROSTER_RESTART < len(peers):
            roster.change(conn, joined)
        else:
            # Start afresh: a loop that rebuilds the members from the log (for a new feed) then
            # does O(members) work, and the log lets departed connections go. Each fresh start
            # costs O(members), paid for by members / ROSTER_RESTART departures.
            del self._rosters[conn.loop]

    def audiences(self) -> Iterator[tuple[IOLoop, Audience]]:
        for loop, conns in self.by_loop.items():
            roster = self._rosters.get(loop)
            if roster is None:
                roster = self._rosters[loop] = Roster(conns)
            yield loop, roster.audience()


class Hub:
    def __init__(
        self,
        max_frame: int = framing.MAX_FRAME_DEFAULT,
        history_keep: int = 100,
        history_sink: Callable[[HistoryFields], None] | None = None,
        max_message: int = TEXT_MAX,
        presence_limit: int = 0,
    ) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, dict[str, Connection]] = {}  # user -> device id -> connection
        self._rooms: dict[str, Room] = {}
        # Each room's mode, kept while it has members or history (a room whose encrypted history
        # is kept must come back encrypted once it empties).
        self._modes: dict[str, str] = {LOBBY: MODE_PLAIN}
        self._joined: dict[Connection, set[str]] = {}  # room names, per logged-in connection
        self._max_frame = max_frame
        self._max_message = max_message
        # The last messages of each room: each as broadcast (a history reply marks a copy) and
        # its encoded bytes marked history (sent as they are to whoever joins); outlives empty
        # rooms.
        self._history: dict[str, deque[tuple[dict[str, Any], bytes]]] = {}
        self._history_keep = history_keep
        self._history_sink = history_sink
        # Above this many members a room announces a join or part to that user only: telling
        # everyone costs O(members) per join, O(members²) while a big room fills. 0: no limit.
        self._presence_limit = presence_limit

    def load_history(self, rows: Iterable[HistoryRow], modes: Mapping[str, str]) -> None:
        """Seed room history, and the modes of the rooms it is for, from the store at start-up."""
        with self._lock:
            for row in rows:
                frame: dict[str, Any]
                if row.encrypted:
                    frame = {
                        "type": "message_encrypted",
                        "room": row.room,
                        "from": row.sender,
                        "device": row.device,
                        "session_id": row.session_id,
                        "ciphertext": row.text,
                        "ts": row.ts,
                    }
                else:
                    frame = {
                        "type": "message",
                        "room": row.room,
                        "from": row.sender,
                        "text": row.text,
                        "ts": row.ts,
                    }
                    if row.action:
                        frame["action"] = True
                self._remember(row.room, frame, framing.encode(frame, self._max_frame))
                if row.room != LOBBY:
                    mode = modes.get(row.room, MODE_ENCRYPTED if row.encrypted else MODE_PLAIN)
                    self._modes[row.room] = mode

    def _remember(self, room: str, frame: dict[str, Any], data: bytes) -> None:
        """Keep a message (`data`: its encoded bytes); the caller no longer changes `frame`."""
        if self._history_keep <= 0:
            return
        kept = self._history.get(room)
        if kept is None:
            kept = self._history[room] = deque(maxlen=self._history_keep)
        kept.append((frame, framing.with_true_field(data, "history", self._max_frame)))

    # -- direct messages --------------------------------------------------------------------------

    def deliver_dm(self, env: DeviceEnvelope, queued: bool) -> bool:
        """Relay a stored envelope to the one device it is for, if online; True if handed over.

        The envelope is relayed as the same opaque bytes, stamped with the authenticated sending
        user and the device it names; the server cannot read it and never re-encrypts it.
        `queued` marks a delivery from the offline queue, which the device may already have seen
        (it was not acknowledged).
        """
        frame = {
            "type": "dm",
            "from": env.sender,
            "from_device": env.sender_device,
            "msg_id": env.msg_id,
            "data": base64.b64encode(env.ciphertext).decode("ascii"),
            "ts": env.ts,
        }
        if queued:
            frame["queued"] = True
        with self._lock:
            target = self._users.get(env.recipient, {}).get(env.recipient_device)
            if target is None:
                return False
            self._tell(target, frame)
        return True

    def tell_device(self, user: str, device: str, frame: dict[str, Any]) -> bool:
        """Send `frame` to that device if it is online."""
        with self._lock:
            target = self._users.get(user, {}).get(device)
            if target is not None:
                self._tell(target, frame)
        return target is not None

    def device_connection(self, user: str, device: str) -> Connection | None:
        with self._lock:
            return self._users.get(user, {}).get(device)

    # -- presence ---------------------------------------------------------------------------------

    def login(self, conn: Connection) -> Connection | None:
        """Register an authenticated connection and join it to the lobby.

        Returns the connection of the same device that it replaces (the same device logged in
        again, say after a network drop); the caller closes that one. Other devices of the same
        user stay logged in.
        """
        with self._lock:
            devices = self._users.setdefault(conn.user, {})
            old = devices.get(conn.device)
            if old is not None:
                self._leave_all((old,), "logged in again from elsewhere")
            devices[conn.device] = conn
            self._joined[conn] = set()
            self._join(conn, LOBBY)
        return old

    def logout(self, conn: Connection, reason: str) -> None:
        self.logout_all((conn,), reason)

    def logout_all(self, conns: Iterable[Connection], reason: str) -> None:
        """Log several connections out at once (the output budget's shed), under one take of
        the lock: each room announces all their departures in a row."""
        with self._lock:
            leaving = []
            for conn in conns:
                devices = self._users.get(conn.user, {})
                if devices.get(conn.device) is conn:
                    del devices[conn.device]
                    if not devices:
                        del self._users[conn.user]
                    leaving.append(conn)
            self._leave_all(leaving, reason)

    def handle(self, conn: Connection, frame: RoomRequest) -> dict[str, Any]:
        """Carry out one request; return the reply frame (an "ok" with the request id)."""
        handler = self.HANDLERS[type(frame)]
        with self._lock:
            fields = handler(self, conn, frame)
        return {"type": "ok", "id": frame.id, **fields}

    def say(self, conn: Connection, frame: Say | SayEncrypted) -> bytes:
        """handle() for a say or say_encrypted, with its "ok" already encoded, from a template:
        every room message takes this path."""
        say = self.SAYS[type(frame)]
        with self._lock:
            room, ts = say(self, conn, frame)
        return framing.say_ok(frame.id, room, ts, self._max_frame)

    def _req_join(self, conn: Connection, frame: Join) -> dict[str, Any]:
        room = frame.room
        known = room in self._modes
        if frame.create and known:
            raise ProtocolError(ErrorCode.ROOM_EXISTS, f"{room} already exists: /join {room}")
        if not known:
            self._modes[room] = MODE_PLAIN if frame.plain else MODE_ENCRYPTED
        if room not in self._joined[conn]:
            self._join(conn, room)
        return {"room": room, "mode": self._modes[room], **self._member_list(self._rooms[room])}

    def _req_history(self, conn: Connection, frame: History) -> dict[str, Any]:
        room = self._member_room(conn, frame.room)
        kept = self._history.get(room.name, ())
        limit = len(kept) if frame.limit is None else frame.limit
        # The newest that fit in one reply frame (a room of long messages may not all fit).
        budget = self._max_frame - HISTORY_REPLY_OVERHEAD
        messages: list[dict[str, Any]] = []
        for message, data in reversed(kept):
            if len(messages) >= limit or len(data) > budget:
                break
            budget -= len(data)
            messages.append({**message, "history": True})
        messages.reverse()
        fields: dict[str, Any] = {"room": room.name, "messages": messages}
        if len(messages) < min(limit, len(kept)):
            fields["truncated"] = True
        return fields

    def _req_part(self, conn: Connection, frame: Part) -> dict[str, Any]:
        room = self._member_room(conn, frame.room)
        self._part(conn, room, "left")
        return {"room": room.name}

    def _req_say(self, conn: Connection, frame: Say | SayEncrypted) -> dict[str, Any]:
        room, ts = self.SAYS[type(frame)](self, conn, frame)
        return {"room": room, "ts": ts}

    def _say(self, conn: Connection, frame: Say) -> tuple[str, int]:
        """Broadcast a message; its room and time, for the reply."""
        room = self._member_room(conn, frame.room)
        if self._modes[room.name] != MODE_PLAIN:
            raise ProtocolError(
                ErrorCode.ROOM_ENCRYPTED,
                f"{room.name} is end-to-end encrypted: messages there must be encrypted by the "
                "client (say_encrypted)",
            )
        if len(frame.text) > self._max_message:
            raise ProtocolError(
                ErrorCode.TOO_LONG, f"a message may be at most {self._max_message} characters here"
            )
        ts = now_ms()
        message = {
            "type": "message",
            "room": room.name,
            "from": conn.user,
            "text": frame.text,
            "ts": ts,
        }
        if frame.action:
            message["action"] = True
        data = framing.room_message(
            room.name, conn.user, frame.text, ts, frame.action, self._max_frame
        )
        self._relay(
            room, message, data, (room.name, conn.user, frame.text, ts, frame.action, "", "")
        )
        return room.name, ts

    def _say_encrypted(self, conn: Connection, frame: SayEncrypted) -> tuple[str, int]:
        """Relay a Megolm message as it came, stamped with the sending user and device; it is
        kept as it is relayed (the server never has its text)."""
        room = self._member_room(conn, frame.room)
        if self._modes[room.name] != MODE_ENCRYPTED:
            raise ProtocolError(
                ErrorCode.ROOM_PLAIN, f"{room.name} is not end-to-end encrypted: send say"
            )
        if len(frame.ciphertext) > self._max_frame - ENCRYPTED_FRAME_OVERHEAD:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                "this encrypted message is too large to relay in one frame here; send a shorter "
                "one",
            )
        ts = now_ms()
        message = {
            "type": "message_encrypted",
            "room": room.name,
            "from": conn.user,
            "device": conn.device,
            "session_id": frame.session_id,
            "ciphertext": frame.ciphertext,
            "ts": ts,
        }
        row = (room.name, conn.user, frame.ciphertext, ts, False, conn.device, frame.session_id)
        self._relay(room, message, framing.encode(message, self._max_frame), row)
        return room.name, ts

    def _relay(self, room: Room, message: dict[str, Any], data: bytes, row: HistoryFields) -> None:
        """Write a room message's bytes to every member, and keep it as the room's history."""
        self._broadcast_encoded(room, data)
        self._remember(room.name, message, data)
        if self._history_sink is not None:
            self._history_sink(row)

    def _req_rooms(self, conn: Connection, frame: Rooms) -> dict[str, Any]:
        rooms = [
            {"name": r.name, "members": len(r.members), "mode": self._modes[r.name]}
            for r in self._rooms.values()
        ]
        return {"rooms": sorted(rooms, key=lambda r: r["name"])}

    def _req_who(self, conn: Connection, frame: Who) -> dict[str, Any]:
        room = self._rooms.get(frame.room)
        if room is None:
            raise ProtocolError(ErrorCode.NO_SUCH_ROOM, f"there is no room {frame.room}")
        return {"room": room.name, "mode": self._modes[room.name], **self._member_list(room)}

    # The room messages, each with what broadcasts it (under the lock).
    SAYS: ClassVar[dict[type[RequestFrame], Callable[[Hub, Connection, Any], tuple[str, int]]]] = {
        Say: _say,
        SayEncrypted: _say_encrypted,
    }

    # The room requests, each with its handler (which runs under the lock).
    HANDLERS: ClassVar[
        dict[type[RequestFrame], Callable[[Hub, Connection, Any], dict[str, Any]]]
    ] = {
        Join: _req_join,
        Part: _req_part,
        Say: _req_say,
        SayEncrypted: _req_say,
        Rooms: _req_rooms,
        Who: _req_who,
        History: _req_history,
    }

    # -- internals (lock held) --------------------------------------------------------------------

    def _member_list(self, room: Room) -> dict[str, Any]:
        """The sorted member names that fit in one reply frame, and how many there are."""
        names = room.names()
        budget = self._max_frame - MEMBERS_REPLY_OVERHEAD
        for i, name in enumerate(names):
            budget -= len(name.encode()) + 3  # quotes and comma
            if budget < 0:
                return {"members": names[:i], "count": len(names), "truncated": True}
        return {"members": names, "count": len(names)}

    def _tell(self, conn: Connection, frame: dict[str, Any]) -> None:
        conn.loop.deliver(framing.encode(frame, self._max_frame), (conn,))

    def _quiet(self, room: Room) -> bool:
        return 0 < self._presence_limit < len(room.members)

    def _member_room(self, conn: Connection, name: str) -> Room:
        if name not in self._joined[conn]:
            raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"you are not in {name}")
        return self._rooms[name]

    def _join(self, conn: Connection, name: str) -> None:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name)
        # The newcomer first gets what was said before, marked as history.
        for _, data in self._history.get(name, ()):
            conn.loop.deliver(data, (conn,))
        room.add(conn)
        self._joined[conn].add(name)
        # The device too: a user's other devices must not take it for their own join.
        frame = {
            "type": "joined",
            "room": name,
            "user": conn.user,
            "device": conn.device,
            "ts": now_ms(),
        }
        if self._quiet(room):
            self._tell(conn, frame)
        else:
            self._broadcast(room, frame)

    def _part(self, conn: Connection, room: Room, reason: str, notify_self: bool = True) -> None:
        frame = {
            "type": "parted",
            "room": room.name,
            "user": conn.user,
            "device": conn.device,
            "reason": reason,
            "ts": now_ms(),
        }
        quiet = self._quiet(room)
        if notify_self and quiet:
            self._tell(conn, frame)
        elif notify_self:
            self._broadcast(room, frame)
        room.remove(conn)
        self._joined[conn].discard(room.name)
        if not notify_self and not quiet:
            self._broadcast(room, frame)
        if not room.members and room.name != LOBBY:
            del self._rooms[room.name]
            if not self._history.get(room.name):
                del self._modes[room.name]  # forgotten: a join makes it anew

    def _leave_all(self, conns: Sequence[Connection], reason: str) -> None:
        """Part each connection from all its rooms, room by room."""
        leaving: dict[str, list[Connection]] = {}
        for conn in conns:
            for name in self._joined[conn]:
                leaving.setdefault(name, []).append(conn)
        for name, members in leaving.items():
            room = self._rooms[name]
            for conn in members:
                self._part(conn, room, reason, notify_self=False)
        for conn in conns:
            del self._joined[conn]

    def _broadcast(self, room: Room, frame: dict[str, Any]) -> None:
        self._broadcast_encoded(room, framing.encode(frame, self._max_frame))

    def _broadcast_encoded(self, room: Room, data: bytes) -> None:
        for loop, audience in room.audiences():
            loop.broadcast(data, audience)
