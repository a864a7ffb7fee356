"""One load-generator process: a selector loop over many non-blocking TLS clients.

The coordinator (__main__.py) starts a few of these and talks to each over a pipe, in JSON: open
these clients, send the sync message, run a timed phase, report. A client logs in for real
(TLS 1.3 handshake, the server's login), then only counts what arrives: deliveries, the
acknowledgements that let a sender keep a bounded window of sends in flight, and, on a few
"probe" clients, the send timestamps that give latency. Each process owns its sockets alone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import resource
import selectors
import socket
import ssl
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

from scripts.loadgen.peers import DirectMessages, Login, LoginFailed, Wire, wire_for

RECV = 256 * 1024
TIMED = re.compile(rb"t=(\d{20})")  # the sender's clock in a timed message
LOGIN_TIMEOUT = 60.0

WAITING, CONNECTING, HANDSHAKE, LOGGING_IN, READY, CLOSED = range(6)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Client:
    __slots__ = (
        "acked", "deadline", "dm", "lazy", "login", "next_send", "offset", "out", "probe",
        "raw", "sender", "sent", "sock", "state", "tail",
    )  # fmt: skip

    def __init__(self, login: Login, sender: bool, probe: bool, offset: float = 0.0) -> None:
        self.login = login
        self.offset = offset  # fraction of the sending interval to wait, so senders interleave
        self.sender = sender
        self.probe = probe
        self.state = WAITING
        self.raw: socket.socket | None = None
        self.sock: ssl.SSLSocket | None = None
        self.out = bytearray()
        self.tail = b""
        self.sent = 0  # messages sent in the timed phase
        self.acked = 0  # acknowledgements counted (a say's "ok", an IRC PONG)
        self.next_send = 0.0
        self.deadline = 0.0
        self.dm: DirectMessages | None = None
        self.lazy = False  # read in sweeps, not on every wake-up (see Worker._sweep)


class Worker:
    def __init__(self, pipe: Pipe, index: int, target: dict[str, Any]) -> None:
        self.pipe = pipe
        self.index = index
        self.wire: Wire = wire_for(target["kind"], target["workload"])
        self.addr = (target["host"], target["port"])
        self.ctx = ssl.create_default_context(cafile=target["ca"])
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.sni = target.get("sni", "localhost")
        self.sources: list[str] = target.get("sources") or []
        self.sel = selectors.DefaultSelector()
        self.sel.register(pipe.fileno(), selectors.EVENT_READ, None)
        self.clients: list[Client] = []
        self.waiting: list[Client] = []  # not yet connecting
        self.in_flight = 0
        self.concurrency = 100
        self.ready = 0
        self.failed: dict[str, int] = {}
        self.closed: dict[str, int] = {}
        self.first_ready = 0.0
        self.last_ready = 0.0
        self.opening = False
        self.deliveries = 0
        self.refused = 0
        self.latencies: list[int] = []
        self.sync_token: bytes | None = None
        self.unsynced = 0
        self.phase: dict[str, Any] | None = None
        self.lazy: list[Client] = []
        self.next_sweep = 0.0
        self.running = True
        self.pattern_len = max(
            len(p) for p in (self.wire.delivery, self.wire.ack, self.wire.ping, b"t=" + b"0" * 20)
        )

    # -- coordinator messages ---------------------------------------------------------------------

    def send_event(self, **event: Any) -> None:
        self.pipe.send_bytes(json.dumps(event).encode())

    def on_command(self) -> None:
        msg = json.loads(self.pipe.recv_bytes())
        cmd = msg["cmd"]
        if cmd == "open":
            self.concurrency = msg["concurrency"]
            for spec in msg["clients"]:
                login = Login(spec["name"], bytes.fromhex(spec["seed"]))
                client = Client(
                    login, spec.get("sender", False), spec.get("probe", False), spec.get("phase", 0)
                )
                if "partner" in spec:
                    pickle_key = bytes.fromhex(spec["pickle_key"])
                    client.dm = DirectMessages(login, spec["partner"], spec["olm"], pickle_key)
                    login.device = client.dm.device
                self.clients.append(client)
                self.waiting.append(client)
            self.waiting.reverse()
            self.opening = True
            self._start_more()
            self._check_opened()
        elif cmd == "sync":
            # Armed first, everywhere: a worker that learnt the token only after its members had
            # read it would wait for it forever.
            self.sync_token = msg["token"].encode()
            self.unsynced = sum(1 for c in self.clients if c.state == READY)
            self.send_event(ev="armed")
            self._check_synced()  # nobody left here to wait for
        elif cmd == "sync_send":
            sender = next(c for c in self.clients if c.state == READY)
            self._write(sender, self.wire.say(msg["token"]))
            if not self.wire.echoes:
                self.unsynced -= 1  # an IRC sender never sees its own message
            self._check_synced()
        elif cmd == "run":
            self._start_phase(msg)
        elif cmd == "stats":
            alive = sum(1 for c in self.clients if c.state == READY)
            self.send_event(ev="stats", alive=alive, closed=self.closed, failed=self.failed)
        elif cmd == "quit":
            self.running = False

    # -- opening clients --------------------------------------------------------------------------

    def _start_more(self) -> None:
        while self.waiting and self.in_flight < self.concurrency:
            client = self.waiting.pop()
            self.in_flight += 1
            self._connect(client)

    def _connect(self, c: Client) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        if self.sources:
            raw.bind((self.sources[id(c) % len(self.sources)], 0))
        c.raw = raw
        c.state = CONNECTING
        c.deadline = time.monotonic() + LOGIN_TIMEOUT
        err = raw.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self._fail(c, f"connect: {errno.errorcode.get(err, err)}")
            return
        self.sel.register(raw, selectors.EVENT_WRITE, c)

    def _fail(self, c: Client, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1
        self._drop(c)
        self.in_flight -= 1
        self._start_more()
        self._check_opened()

    def _drop(self, c: Client) -> None:
        c.state = CLOSED
        for s in (c.sock, c.raw):
            if s is not None:
                try:
                    self.sel.unregister(s)
                except (KeyError, ValueError):
                    pass
                s.close()
        c.sock = c.raw = None

    def _opening_step(self, c: Client, mask: int) -> None:
        try:
            if c.state == CONNECTING and not self._connected(c):
                return
            if c.state == HANDSHAKE:
                self._handshake_step(c)
            elif c.state == LOGGING_IN:
                self._login_step(c)
        except LoginFailed as exc:
            self._fail(c, f"refused: {exc}")
        except ssl.SSLError as exc:
            self._fail(c, f"tls: {exc.reason or exc}")
        except OSError as exc:
            self._fail(c, f"socket: {exc.strerror or exc}")

    def _connected(self, c: Client) -> bool:
        """The TCP connect finished: start TLS, or fail the client and say False."""
        assert c.raw is not None
        err = c.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(c, f"connect: {errno.errorcode.get(err, err)}")
            return False
        self.sel.unregister(c.raw)
        c.raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock = self.ctx.wrap_socket(
            c.raw, server_hostname=self.sni, do_handshake_on_connect=False
        )
        c.state = HANDSHAKE
        self.sel.register(c.sock, selectors.EVENT_READ, c)
        return True

    def _handshake_step(self, c: Client) -> None:
        assert c.sock is not None
        try:
            c.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        except ssl.SSLWantWriteError:
            self.sel.modify(c.sock, selectors.EVENT_WRITE, c)
            return
        der = c.sock.getpeercert(binary_form=True) or b""
        c.login.cert_sha256 = hashlib.sha256(der).digest()
        c.state = LOGGING_IN
        self.sel.modify(c.sock, selectors.EVENT_READ, c)
        self._write(c, self.wire.greeting(c.login))

    def _login_step(self, c: Client) -> None:
        data = self._recv_all(c)
        if data is None:
            return
        reply = self.wire.feed(c.login, data)
        if reply:
            self._write(c, reply)
        if c.login.done:
            c.state = READY
            self.ready += 1
            self.in_flight -= 1
            now = time.monotonic()
            self.first_ready = self.first_ready or now
            self.last_ready = now
            self._start_more()
            self._check_opened()

    def _check_opened(self) -> None:
        if self.opening and not self.waiting and self.in_flight == 0:
            self.opening = False
            self.send_event(
                ev="opened",
                cpu=cpu_seconds(),
                ready=self.ready,
                failed=self.failed,
                first=self.first_ready,
                last=self.last_ready,
            )

    def _check_deadlines(self, now: float) -> None:
        if not self.opening:
            return
        for c in self.clients:
            if c.state in (CONNECTING, HANDSHAKE, LOGGING_IN) and now > c.deadline:
                stage = ("connecting", "in the TLS handshake", "logging in")[c.state - CONNECTING]
                self._fail(c, f"timed out {stage}")

    # -- reading and writing ----------------------------------------------------------------------

    def _recv_all(self, c: Client) -> bytes | None:
        """Everything readable now; None once the client is closed."""
        assert c.sock is not None
        chunks = []
        while True:
            try:
                data = c.sock.recv(RECV)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except (ssl.SSLError, OSError) as exc:
                self._closed(c, f"{type(exc).__name__}: {exc}")
                return None
            if not data:
                if chunks:
                    break
                self._closed(c, "server closed the connection")
                return None
            chunks.append(data)
        return b"".join(chunks)

    def _closed(self, c: Client, why: str) -> None:
        if c.state == READY:
            self.ready -= 1
            self.closed[why[:80]] = self.closed.get(why[:80], 0) + 1
            if self.sync_token is not None:
                self.unsynced -= 1
                self._check_synced()
            self._drop(c)
        else:
            self._fail(c, why[:80])

    def _write(self, c: Client, data: bytes) -> None:
        c.out += data
        self._flush(c)

    def _flush(self, c: Client) -> None:
        sock = c.sock
        if sock is None:
            return
        out = c.out
        while out:
            try:
                sent = sock.send(out)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
            except (ssl.SSLError, OSError) as exc:
                self._closed(c, f"{type(exc).__name__}: {exc}")
                return
            del out[:sent]
        if not c.lazy:
            self.sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0), c)

    def _on_ready(self, c: Client) -> None:
        data = self._recv_all(c)
        if not data:
            return
        if c.dm is not None:
            self._on_dm_data(c, data)
            return
        wire = self.wire
        chunk = c.tail + data
        tail = c.tail
        count = chunk.count(wire.delivery) - tail.count(wire.delivery)
        acks = chunk.count(wire.ack) - tail.count(wire.ack)
        refused = chunk.count(wire.refusal) - tail.count(wire.refusal)
        if acks or refused:
            self.refused += refused
            if wire.echoes:  # a sender's own echo is no delivery; a refusal ends a request too
                count -= acks
                acks += refused
            c.acked += acks
        self.deliveries += count
        if wire.ping in chunk:
            self._write(c, wire.answer_pings(chunk))
        c.tail = chunk[-(self.pattern_len - 1) :]
        if c.probe and self.phase is not None:
            now = time.monotonic_ns()
            start, stop = self.phase["start_ns"], self.phase["stop_ns"]
            for m in TIMED.finditer(chunk):
                sent = int(m.group(1))
                if start <= sent < stop and m.start() >= len(tail):
                    self.latencies.append(now - sent)
        if self.sync_token is not None and self.sync_token in chunk:
            self.unsynced -= 1
            self._check_synced()
        if c.sender and self.phase is not None and self.phase["window"]:
            self._send_window(c)

    def _on_dm_data(self, c: Client, data: bytes) -> None:
        assert c.dm is not None
        bodies, acked, refused, answer = c.dm.receive(data)
        now = time.monotonic_ns()
        phase = self.phase
        if phase is not None:
            for body in bodies:
                match = TIMED.match(body.encode())
                if match and phase["start_ns"] <= int(match[1]) < phase["stop_ns"]:
                    self.latencies.append(now - int(match[1]))
                    self.deliveries += 1
        c.acked += acked + refused
        self.refused += refused
        if answer:
            self._write(c, answer)
        if phase is not None and phase["window"]:
            self._send_window(c)

    def _check_synced(self) -> None:
        if self.sync_token is not None and self.unsynced <= 0:
            self.sync_token = None
            self.send_event(ev="synced")

    # -- the timed phase --------------------------------------------------------------------------

    def _start_phase(self, msg: dict[str, Any]) -> None:
        to_ns = 1_000_000_000
        self.phase = {
            **msg,
            "start_ns": int(msg["start_at"] * to_ns),
            "stop_ns": int(msg["stop_at"] * to_ns),
            "marks": {},
        }
        self.latencies = []
        self.phase["cpu_start"] = None
        self.phase["count_start"] = None
        interval = 1.0 / msg["rate_per_sender"] if msg["rate_per_sender"] else 0.0
        self.phase["interval"] = interval
        if msg["lazy"]:
            self._go_lazy()
        for c in self.clients:
            if c.sender and c.state == READY:
                c.sent = 0
                c.acked = 0
                # The senders' ticks are spread over one interval, so the offered load is smooth.
                c.next_send = msg["start_at"] + interval * c.offset

    def _go_lazy(self) -> None:
        """Members that neither send nor measure latency are read in sweeps (every `lazy`
        seconds) instead of on each wake-up: at a paced rate each message would otherwise cost
        one read per member, and the load generator, not the server, would set the latency.
        The server's work is the same either way: it writes each message to each socket."""
        for c in self.clients:
            if c.state == READY and not (c.sender or c.probe or c.dm) and c.sock is not None:
                self.sel.unregister(c.sock)
                c.lazy = True
                self.lazy.append(c)

    def _sweep(self) -> None:
        for c in self.lazy:
            if c.state == READY:
                self._on_ready(c)
                self._flush(c)

    def _end_lazy(self) -> None:
        for c in self.lazy:
            c.lazy = False
            if c.state == READY and c.sock is not None:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
                self.sel.register(c.sock, events, c)
        self.lazy = []

    def _text(self) -> str:
        stamp = f"t={time.monotonic_ns():020d} "
        return stamp + "x" * max(0, self.phase["size"] - len(stamp))  # type: ignore[index]

    def _send_window(self, c: Client) -> None:
        """Flat out: keep `window` batches of messages in flight per sender."""
        phase = self.phase
        assert phase is not None
        now = time.monotonic()
        if not phase["start_at"] <= now < phase["stop_at"]:
            return
        if c.dm is not None:
            while c.sent - c.acked < phase["window"]:
                c.sent += 1
                self._write(c, c.dm.seal(self._text()))
            return
        wire = self.wire
        batch = max(1, min(phase["batch"], wire.max_burst // (phase["size"] + 40)))
        per_batch = wire.acks_per_batch(batch)
        while (c.sent // batch) * per_batch - c.acked < phase["window"] * per_batch:
            data = b"".join(wire.say(self._text()) for _ in range(batch))
            c.sent += batch
            self._write(c, data + wire.ack_marker())

    def _paced_sends(self, now: float) -> float:
        """At a fixed offered rate: send what is due; return the next due time."""
        phase = self.phase
        assert phase is not None
        nxt = phase["stop_at"]
        if now >= phase["stop_at"]:
            return nxt
        interval = phase["interval"]
        for c in self.clients:
            if not c.sender or c.state != READY:
                continue
            if c.next_send <= now:
                burst = []
                while c.next_send <= now:
                    burst.append(self.wire.say(self._text()))
                    c.next_send += interval
                    c.sent += 1
                self._write(c, b"".join(burst))
            nxt = min(nxt, c.next_send)
        return nxt

    def _phase_tick(self, now: float) -> float:
        """Move the timed phase along; return how long the loop may sleep."""
        phase = self.phase
        assert phase is not None
        if self.lazy and (now >= self.next_sweep or now >= phase["start_at"] > self.next_sweep):
            self._sweep()
            self.next_sweep = now + phase["lazy"]
        if phase["count_start"] is None and now >= phase["start_at"]:
            phase["count_start"] = self.deliveries
            phase["cpu_start"] = cpu_seconds()
            if phase["window"]:
                for c in self.clients:
                    if c.sender and c.state == READY:
                        self._send_window(c)
        if (
            phase["count_start"] is not None
            and "count_stop" not in phase
            and now >= phase["stop_at"]
        ):
            self._sweep()
            phase["count_stop"] = self.deliveries
            phase["cpu_stop"] = cpu_seconds()
        if "count_stop" in phase and now >= phase["stop_at"] + phase["grace"]:
            self._end_lazy()
            self._report()
            return 0.05
        if self.lazy:
            return min(self._wait(now), max(0.0, self.next_sweep - now))
        return self._wait(now)

    def _wait(self, now: float) -> float:
        phase = self.phase
        assert phase is not None
        if phase["count_start"] is None:
            return max(0.0, phase["start_at"] - now)
        if not phase["window"] and "count_stop" not in phase:
            return max(0.0, self._paced_sends(now) - now)
        return min(0.05, max(0.0, phase["stop_at"] - now)) if "count_stop" not in phase else 0.05

    def _report(self) -> None:
        phase = self.phase
        assert phase is not None
        senders = [c for c in self.clients if c.sender]
        self.send_event(
            ev="result",
            deliveries=phase["count_stop"] - phase["count_start"],
            sent=sum(c.sent for c in senders),
            acked=sum(c.acked for c in senders),
            refused=self.refused,
            latencies=self.latencies,
            cpu=phase["cpu_stop"] - phase["cpu_start"],
            alive=self.ready,
            closed=self.closed,
        )
        self.phase = None

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        last_check = time.monotonic()
        while self.running:
            now = time.monotonic()
            timeout = 0.25
            if self.phase is not None:
                timeout = min(timeout, self._phase_tick(now))
            for key, mask in self.sel.select(timeout):
                c = key.data
                if c is None:
                    self.on_command()
                    continue
                if c.state == READY:
                    if mask & selectors.EVENT_WRITE:
                        self._flush(c)
                    if mask & selectors.EVENT_READ and c.state == READY:
                        self._on_ready(c)
                elif c.state != CLOSED:
                    self._opening_step(c, mask)
            now = time.monotonic()
            if now - last_check > 1.0:
                last_check = now
                self._check_deadlines(now)
        for c in self.clients:
            self._drop(c)


def main(pipe: Pipe, index: int, target: dict[str, Any], cpus: list[int] | None) -> None:
    if cpus:
        import os

        os.sched_setaffinity(0, cpus)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    Worker(pipe, index, target).run()
