"""The TLS and socket work of a room message on the server, memory BIOs against an SSLSocket.

    python -m scripts.bench_tls --mode bio     # from the repository root; or --mode socket

A loop turn at N members as a server connection does it, on real TLS 1.3 connections over
socket pairs in this process: `--senders` clients each send their share of `--per-turn` room
messages as one record each, the server reads each sender's socket until it wants more, then
writes the turn's frames to each of the N members in one write. `--mode bio` is the server's
way (server/connection.py's TLSStream: SSLObject.write into a memory BIO, a read of the BIO,
socket.send; recv, a write into the other BIO, SSLObject.read); `--mode socket` the one tried and
not kept (a non-blocking ssl.SSLSocket; BENCHMARKS.md, "Round 4"). The clients' side is the same
in both: senders encrypt with a TLSStream, members' bytes are read and dropped undecrypted. It
prints CPU time per message (the kernel's included), in all and the server's reads and writes
alone, the best of 5 rounds; under `valgrind --tool=callgrind` (user space only) compare
`--turns` 10 and 30 (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import tempfile
import time
from pathlib import Path

from securechat import certs, framing
from securechat.tls import READ_CHUNK, TLSStream, client_context, server_context

FRAME = framing.encode(
    {"type": "message", "room": "#lobby", "from": "user0042", "text": "x" * 100, "ts": 1.0}
)


def _stream_handshake_step(sock: socket.socket, tls: TLSStream) -> bool:
    """One step of a TLSStream's handshake over a non-blocking socket; True once it is done."""
    try:
        tls.feed(sock.recv(READ_CHUNK))
    except BlockingIOError:
        pass
    done = tls.do_handshake()
    out = tls.data_to_send()
    if out:
        sock.sendall(out)
    return done


class BioServer:
    """The server's way: a TLSStream over a non-blocking socket."""

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket) -> None:
        self.sock, self.tls = sock, TLSStream(ctx, server_side=True)

    def handshake_step(self) -> bool:
        return _stream_handshake_step(self.sock, self.tls)

    def read(self) -> bytes:
        self.tls.feed(self.sock.recv(READ_CHUNK))
        return self.tls.read()

    def write(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.send(self.tls.data_to_send())


class SocketServer:
    """The way tried: a non-blocking SSLSocket, read until it wants more."""

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket) -> None:
        self.sock = ctx.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False
        )

    def handshake_step(self) -> bool:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def read(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self.sock.recv(READ_CHUNK))
            except ssl.SSLWantReadError:
                return b"".join(chunks)

    def write(self, data: bytes) -> None:
        self.sock.send(data)


class Client:
    """A TLSStream client over the other end of a socket pair, driven by hand."""

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket) -> None:
        self.sock, self.tls = sock, TLSStream(ctx, server_side=False, server_hostname="127.0.0.1")

    def handshake_step(self) -> bool:
        return _stream_handshake_step(self.sock, self.tls)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.tls.data_to_send())

    def discard(self) -> None:
        fd = self.sock.fileno()
        try:
            while os.read(fd, READ_CHUNK):
                pass
        except BlockingIOError:
            pass


def pair(
    mode: str, sctx: ssl.SSLContext, cctx: ssl.SSLContext
) -> tuple[BioServer | SocketServer, Client]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    server: BioServer | SocketServer = (
        SocketServer(sctx, a) if mode == "socket" else BioServer(sctx, a)
    )
    client = Client(cctx, b)
    done = [False, False]
    while not all(done):
        done[1] = client.handshake_step() or done[1]
        done[0] = server.handshake_step() or done[0]
    # The server's first read takes whatever the handshake left (TLS 1.3 has no tickets here).
    return server, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("socket", "bio"), default="socket")
    parser.add_argument("-n", type=int, default=50, help="room members written each turn")
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--per-turn", type=int, default=40, help="messages a turn")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        certs.generate(Path(tmp), hosts=["127.0.0.1"])
        sctx = server_context(Path(tmp))[0]
        cctx = client_context(Path(tmp) / "ca.pem")
        senders = [pair(args.mode, sctx, cctx) for _ in range(args.senders)]
        members = [pair(args.mode, sctx, cctx) for _ in range(args.n)]
    each = args.per_turn // args.senders
    out = FRAME * (each * args.senders)
    best = reads = writes = float("inf")
    clock = time.process_time
    for _ in range(args.rounds):
        start = clock()
        read = write = 0.0
        for _ in range(args.turns):
            for _, client in senders:
                for _ in range(each):
                    client.send(FRAME)
            began = clock()
            for server, _ in senders:
                assert len(server.read()) == each * len(FRAME)
            wrote = clock()
            for server, _ in members:
                server.write(out)
            ended = clock()
            read, write = read + wrote - began, write + ended - wrote
            for _, client in members:
                client.discard()
        best = min(best, clock() - start)
        reads, writes = min(reads, read), min(writes, write)
    per = 1e6 / (args.turns * each * args.senders)
    print(
        f"{args.mode}: N={args.n}, {each * args.senders} messages a turn, CPU µs a message "
        f"(best of {args.rounds}): all {best * per:.2f}, the server's reads {reads * per:.2f}, "
        f"the server's writes {writes * per:.2f}"
    )


if __name__ == "__main__":
    main()
