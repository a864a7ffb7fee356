"""What the load generator says to each kind of server: securechat's framed JSON and IRC lines.

No sockets here. A Wire turns a client's login into bytes to send and reads the server's answers
until the client is in the room; after that the worker only counts patterns in what arrives
(a delivery, an acknowledgement of a send), so counting a million deliveries a second stays cheap.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import vodozemac

from securechat import framing, protocol
from securechat.client.session import ClientSession
from securechat.e2e import envelope, inner, records
from securechat.e2e.conversations import ConversationTracker
from securechat.e2e.device import Device
from securechat.identity import Identity

LOBBY = "#lobby"


class LoginFailed(Exception):
    """The server refused this client's login; the message says why."""


@dataclass
class Login:
    """One client's way into the room. `feed` takes what the server sent and returns what to
    answer; `done` once the client is logged in and has joined."""

    name: str
    seed: bytes
    done: bool = False
    cert_sha256: bytes = b""
    buf: bytearray = field(default_factory=bytearray)  # an IRC line not yet complete
    session: ClientSession = field(default_factory=ClientSession)  # securechat's, the library's
    device: Device | None = None  # a dm client's: published before it counts as logged in
    publishing: bool = False
    _identity: Identity | None = None

    @property
    def identity(self) -> Identity:
        if self._identity is None:  # derived once: deriving the key costs more than signing
            self._identity = Identity(None, nacl.signing.SigningKey(self.seed), self.name)
        return self._identity


class SecureChatWire:
    """securechat: hello, a challenge signed with the client's Ed25519 key, welcome (which joins
    #lobby, the benchmark room). The login is the library's own client session."""

    name = "securechat"
    room = LOBBY
    delivery = b'{"type":"message"'  # a room message, as the server encodes it
    ack = b'{"type":"ok"'  # the reply to each of our requests
    refusal = b'{"type":"error"'  # a request refused (rate limited, say)
    ping = b'{"type":"ping"'
    max_burst = 1 << 20  # bytes a sender may write at once
    login_concurrency = 256  # logins in flight: the server accepts with a backlog of 1024
    # The server echoes a sender's own message to it just before the "ok", and a refused say
    # gets an error instead: both end a request.
    echoes = True

    def __init__(self) -> None:
        self._id = 0

    def greeting(self, login: Login) -> bytes:
        device = login.device.device_id if login.device else None
        return login.session.hello(login.name, login.identity, device)

    def feed(self, login: Login, data: bytes) -> bytes:
        out = []
        for frame in login.session.receive_data(data):
            kind = frame["type"]
            if kind == "challenge":
                out.append(login.session.auth(frame, login.name, login.identity, login.cert_sha256))
            elif kind == "welcome" and login.device is not None:
                # Its partner may send as soon as everyone is in: publish the device first.
                record = records.sign_device(login.identity, login.name, login.device)
                _, publish = login.session.request("publish_device", record=record.to_wire())
                out.append(publish)
                login.publishing = True
            elif kind == "welcome" or (kind == "ok" and login.publishing):
                login.done = True
                break
            elif kind in ("error", "bye"):
                raise LoginFailed(frame.get("code") or frame.get("reason") or kind)
        return b"".join(out)

    def answer_pings(self, data: bytes) -> bytes:
        return framing.encode({"type": "pong"}) * data.count(self.ping)

    def say(self, text: str) -> bytes:
        self._id += 1
        return framing.encode({"type": "say", "id": self._id, "room": self.room, "text": text})

    def ack_marker(self) -> bytes:
        """Sent after a batch of says to learn when the batch was handled: nothing, since every
        say is answered."""
        return b""

    def acks_per_batch(self, batch: int) -> int:
        return batch


class IRCWire:
    """IRC (ngircd): NICK and USER, the 001 welcome, then JOIN; a sender learns that a batch of
    PRIVMSGs was handled from the PONG to a PING sent after it (IRC acknowledges nothing else)."""

    name = "ngircd"
    room = "#lobby"
    delivery = b" PRIVMSG #"
    ack = b" PONG "
    refusal = b" 404 "  # ERR_CANNOTSENDTOCHAN
    ping = b"PING :"
    echoes = False
    # ngircd reads 2 KB at a time and handles 3 commands a client per pass: a larger TLS burst
    # stalls that client (GnuTLS keeps the rest buffered where epoll cannot see it).
    max_burst = 1200
    login_concurrency = 40  # its listen backlog is 10: more connects in flight get dropped SYNs

    def __init__(self, join: bool = True) -> None:
        # IRC users need not be in any channel, so held clients stay out of one: joining ten
        # thousand to one channel costs ngircd minutes (every join lists and tells everyone).
        self.join = join

    def greeting(self, login: Login) -> bytes:
        return f"NICK {login.name}\r\nUSER {login.name} 0 * :bench\r\n".encode()

    def feed(self, login: Login, data: bytes) -> bytes:
        login.buf += data
        out = []
        *lines, rest = bytes(login.buf).split(b"\r\n")
        login.buf[:] = rest
        for line in lines:
            if line.startswith(b"PING "):
                out.append(b"PONG " + line[5:] + b"\r\n")
                continue
            parts = line.split(b" ", 3)
            if len(parts) < 2:
                continue
            code = parts[1]
            if code == b"001":
                if not self.join:
                    login.done = True  # hold: registered is logged in
                else:
                    out.append(f"JOIN {self.room}\r\n".encode())
            elif code == b"366":  # end of the member list: joined
                login.done = True
            elif code in (b"433", b"432", b"465", b"471", b"473", b"474") or line.startswith(
                b"ERROR"
            ):
                raise LoginFailed(line.decode("utf-8", "replace")[:120])
        return b"".join(out)

    def say(self, text: str) -> bytes:
        return f"PRIVMSG {self.room} :{text}\r\n".encode()

    def ack_marker(self) -> bytes:
        return b"PING :b\r\n"

    def acks_per_batch(self, batch: int) -> int:
        return 1

    @staticmethod
    def answer_pings(data: bytes) -> bytes:
        """Answers to the server's keep-alive PINGs found in `data`."""
        out = []
        for line in data.split(b"\r\n"):
            if line.startswith(b"PING :"):
                out.append(b"PONG " + line[5:] + b"\r\n")
        return b"".join(out)


Wire = SecureChatWire | IRCWire


def wire_for(target: str, workload: str = "fanout") -> Wire:
    if target == "securechat":
        return SecureChatWire()
    if target == "ngircd":
        return IRCWire(join=workload != "hold")
    raise ValueError(f"unknown target {target!r}")


def olm_pair(pickle_key: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two devices with an Olm session between them, started from a one-time key as a real first
    contact is, each as what its client needs (pickled under `pickle_key`): the benchmark measures
    the steady state of the ratchet, not prekey claims."""
    a, b = Device.create(), Device.create()
    b.account.generate_one_time_keys(1)
    [otk] = b.account.one_time_keys.values()
    b.account.mark_keys_as_published()
    to_b = a.account.create_outbound_session(b.account.curve25519_key, otk)
    first = to_b.encrypt(b"hello").to_pre_key()
    assert first is not None
    to_a, _ = b.account.create_inbound_session(a.account.curve25519_key, first)

    def side(me: Device, session: vodozemac.Session, peer: Device) -> dict[str, Any]:
        return {
            "device": me.to_state(pickle_key),
            "session": session.pickle(pickle_key),
            "partner_device": peer.device_id,
        }

    return side(a, to_b, b), side(b, to_a, a)


class DirectMessages:
    """The dm workload, securechat only: each client encrypts DMs for its partner's device with
    the real version 2 code (inner records with chains and padding, an Olm session) and opens the
    partner's, checks included, then acknowledges them."""

    def __init__(self, login: Login, partner: str, olm: dict[str, Any], pickle_key: bytes) -> None:
        self.me = login.name
        self.partner = partner
        self.device = Device.from_state(olm["device"], pickle_key, "the load generator's device")
        self.session = vodozemac.Session.from_pickle(olm["session"], pickle_key)
        self.partner_device = olm["partner_device"]
        self.tracker = ConversationTracker(self.me, self.device.device_id)
        self.decoder = framing.FrameDecoder()
        self._id = 0

    def seal(self, text: str) -> bytes:
        msg_id = secrets.token_urlsafe(16)
        record = self.tracker.next_record(
            self.partner, self.partner_device, msg_id, time.time_ns() // 1_000_000, text
        )
        message_type, ciphertext = self.session.encrypt(inner.encode(record)).to_parts()
        self.tracker.record_sent(record)
        self._id += 1
        frame = {
            "type": "dm",
            "id": self._id,
            "to": self.partner,
            "user": self.partner,
            "device": self.partner_device,
            "msg_id": msg_id,
            "data": protocol.b64(envelope.pack(int(message_type), bytes(ciphertext))),
        }
        return framing.encode(frame)

    def open(self, frame: dict[str, Any]) -> str:
        message_type, ciphertext = envelope.unpack(base64.b64decode(frame["data"]), frame["from"])
        message = vodozemac.AnyOlmMessage.from_parts(message_type, ciphertext)
        record = inner.decode(bytes(self.session.decrypt(message)))
        if (record.sender, record.recipient_device) != (frame["from"], self.device.device_id):
            raise ValueError("a direct message was re-routed")
        return self.tracker.accept(record).record.body

    def receive(self, data: bytes) -> tuple[list[str], int, int, bytes]:
        """Frames that arrived: (bodies opened, sends acknowledged, refused, what to answer)."""
        self.decoder.feed(data)
        bodies, acked, refused, opened_ids = [], 0, 0, []
        for payload in self.decoder.payloads():
            frame = framing.parse(payload)
            kind = frame["type"]
            if kind == "dm":
                bodies.append(self.open(frame))
                opened_ids.append(frame["msg_id"])
            elif kind == "ok":
                acked += 1
            elif kind == "error":
                refused += 1
        answer = b""
        if opened_ids:
            answer = framing.encode({"type": "ack", "msg_ids": opened_ids})
        return bodies, acked, refused, answer
