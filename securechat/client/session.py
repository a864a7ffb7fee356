"""The client side of the protocol without I/O: frames out as bytes, bytes in as frames.

It numbers requests, decodes and sanity-checks what the server sends, and builds the login
signature. The connection owner drives it; nothing here blocks or touches a socket.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from typing import Any

from securechat import framing, protocol
from securechat.e2e.device import new_device_id
from securechat.errors import ErrorCode, ProtocolError
from securechat.identity import Identity


class ClientSession:
    def __init__(self, max_frame: int = framing.MAX_FRAME_DEFAULT) -> None:
        self.max_frame = max_frame
        self._decoder = framing.FrameDecoder(max_frame)
        self._ids = itertools.count(1)

    def adopt_limits(self, welcome: dict[str, Any]) -> None:
        """Use the frame size the server announced: we refuse locally what it would refuse, and
        accept what it may send (up to a ceiling, so a hostile server cannot make us buffer
        without bound)."""
        announced = welcome.get("max_frame")
        if (
            isinstance(announced, int)
            and not isinstance(announced, bool)
            and announced >= framing.MIN_FRAME
        ):
            self.max_frame = min(announced, framing.MAX_FRAME_CEILING)
            self._decoder.max_frame = self.max_frame

    def encode(self, frame: dict[str, Any]) -> bytes:
        return framing.encode(frame, self.max_frame)

    def next_id(self) -> int:
        return next(self._ids)

    def request(self, ftype: str, **fields: Any) -> tuple[int, bytes]:
        """A numbered request frame; the server's reply will carry the same id."""
        request_id = self.next_id()
        return request_id, self.encode({"type": ftype, "id": request_id, **fields})

    def hello(self, user: str, identity: Identity, device: str | None = None) -> bytes:
        """The first frame; `device` is this installation's device id (None: a throwaway one,
        for a connection that sends no DMs)."""
        return self.encode(
            {
                "type": "hello",
                "user": user,
                "key": protocol.b64(identity.verify_key_bytes),
                "version": protocol.PROTOCOL_VERSION,
                "device": device or new_device_id(),
            }
        )

    def auth(
        self, challenge: dict[str, Any], user: str, identity: Identity, server_cert_sha256: bytes
    ) -> bytes:
        nonce = _b64field(challenge, "nonce", protocol.NONCE_BYTES)
        transcript = protocol.login_transcript(
            nonce, user, identity.verify_key_bytes, server_cert_sha256
        )
        return self.encode({"type": "auth", "signature": protocol.b64(identity.sign(transcript))})

    def receive_data(self, data: bytes) -> list[dict[str, Any]]:
        """Feed bytes from the server; return the complete frames. A malformed frame from the
        server raises ProtocolError: we do not guess at a broken stream."""
        self._decoder.feed(data)
        return [framing.parse(p) for p in self._decoder.payloads()]


def _b64field(frame: dict[str, Any], field: str, size: int) -> bytes:
    value = frame.get(field)
    try:
        raw = base64.b64decode(value if isinstance(value, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise ProtocolError(ErrorCode.BAD_FIELD, f'server sent a bad "{field}"')
    return raw
