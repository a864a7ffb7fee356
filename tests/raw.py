"""A raw TLS client for tests that must misbehave: it logs in for real (or not at all) and then
sends whatever bytes a test likes, reading the server's frames by hand."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from securechat import framing
from securechat.client.session import ClientSession
from securechat.identity import Identity
from securechat.tls import client_context


class RawTLS:
    def __init__(
        self,
        address: tuple[str, int],
        ca: Path,
        *,
        source: str | None = None,
        rcvbuf: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # set before connecting, so the window stays small
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            raw.bind((source, 0))
        raw.settimeout(timeout)
        raw.connect(address)
        self.sock: ssl.SSLSocket = client_context(ca).wrap_socket(raw, server_hostname=address[0])
        self.session = ClientSession()
        self._decoder = framing.FrameDecoder(framing.MAX_FRAME_DEFAULT * 16)
        self._frames: list[dict[str, Any]] = []

    def login(self, user: str, ident: Identity, device: str | None = None) -> dict[str, Any]:
        self.sock.sendall(self.session.hello(user, ident, device))
        challenge = self.frame()
        server_fp = hashlib.sha256(self.sock.getpeercert(binary_form=True) or b"").digest()
        self.sock.sendall(self.session.auth(challenge, user, ident, server_fp))
        welcome = self.frame()
        assert welcome["type"] == "welcome", welcome
        return welcome

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.send_payload(json.dumps(frame).encode())

    def send_payload(self, payload: bytes) -> None:
        self.sock.sendall(framing.HEADER.pack(len(payload)) + payload)

    def frame(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame; fails if none comes in time or the server closed first."""
        deadline = time.monotonic() + timeout
        while not self._frames:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no frame came in time"
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            self._decoder.feed(data)
            self._frames += [framing.parse(p) for p in self._decoder.payloads()]
        return self._frames.pop(0)

    def frame_of(self, ftype: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame of type `ftype`, skipping others (presence, history...)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.frame(max(0.01, deadline - time.monotonic()))
            if frame["type"] == ftype:
                return frame

    def reply_to(self, request_id: int, timeout: float = 10.0) -> dict[str, Any]:
        """The reply (`ok` or `error`) to request `request_id`; the frames that came before it
        stay to be read, in order."""
        deadline = time.monotonic() + timeout
        passed: list[dict[str, Any]] = []
        while True:
            frame = self.frame(max(0.01, deadline - time.monotonic()))
            if frame["type"] in ("ok", "error") and frame.get("id") == request_id:
                self._frames[:0] = passed
                return frame
            passed.append(frame)

    def until_closed(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every frame until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the server did not close the connection in time"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError, BrokenPipeError):
                data = b""
            if not data:
                frames, self._frames = self._frames, []
                return frames
            self._decoder.feed(data)
            self._frames += [framing.parse(p) for p in self._decoder.payloads()]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawTLS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
