"""What the load generator says to each kind of server: securechat's framed JSON and IRC lines.

No sockets here. A Wire turns a client's login into bytes to send and reads the server's answers
until the client is in the room; after that the worker only counts patterns in what arrives
(a delivery, an acknowledgement of a send), so counting a million deliveries a second stays cheap.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import nacl.signing

from securechat import framing, protocol, sealing
from securechat.client.session import ClientSession
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
        return login.session.hello(login.name, login.identity)

    def feed(self, login: Login, data: bytes) -> bytes:
        out = []
        for frame in login.session.receive_data(data):
            kind = frame["type"]
            if kind == "challenge":
                out.append(login.session.auth(frame, login.name, login.identity, login.cert_sha256))
            elif kind == "welcome":
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


class DirectMessages:
    """The dm workload, securechat only: each client seals DMs for its partner with the real
    sealing code and opens the partner's, checks included, then acknowledges them."""

    def __init__(self, login: Login, partner: str, partner_seed: bytes) -> None:
        self.me = login.name
        self.key = login.identity.signing_key
        self.partner = partner
        self.partner_key = bytes(nacl.signing.SigningKey(partner_seed).verify_key)
        self.decoder = framing.FrameDecoder()
        self._id = 0

    def seal(self, text: str) -> bytes:
        sealed = sealing.seal(self.key, self.me, self.partner, self.partner_key, text)
        self._id += 1
        frame = {
            "type": "dm",
            "id": self._id,
            "to": self.partner,
            "msg_id": sealed.message_id,
            "box": protocol.b64(sealed.envelope),
        }
        return framing.encode(frame)

    def receive(self, data: bytes) -> tuple[list[str], int, int, bytes]:
        """Frames that arrived: (bodies opened, sends acknowledged, refused, what to answer)."""
        self.decoder.feed(data)
        bodies, acked, refused, opened_ids = [], 0, 0, []
        for payload in self.decoder.payloads():
            frame = framing.parse(payload)
            kind = frame["type"]
            if kind == "dm":
                opened = sealing.open_sealed(
                    self.key,
                    self.me,
                    frame["from"],
                    self.partner_key,
                    base64.b64decode(frame["box"]),
                    expected_message_id=frame["msg_id"],
                )
                bodies.append(opened.body)
                opened_ids.append(frame["msg_id"])
            elif kind == "ok":
                acked += 1
            elif kind == "error":
                refused += 1
        answer = b""
        if opened_ids:
            answer = framing.encode({"type": "ack", "msg_ids": opened_ids})
        return bodies, acked, refused, answer
