"""Shared fixtures: real certificates from our generator, a real server on an ephemeral
loopback port, identities with light KDF limits, and clients that are always closed."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from securechat import certs, identity
from securechat.client import Client
from securechat.client.events import Event, Parted
from securechat.server import Server, ServerConfig

REPO = Path(__file__).resolve().parents[1]
PASSPHRASE = b"correct horse battery staple"

# Property-based tests: "ci" (the default) keeps the suite quick; "long" is for a fuzzing session
# (SECURECHAT_HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz_*.py). No deadline: these
# machines are noisy, and a slow example is not a failure.
settings.register_profile("ci", max_examples=100, stateful_step_count=25, deadline=None)
settings.register_profile(
    "long",
    max_examples=5_000,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("SECURECHAT_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    certs.generate(out, hosts=(), clients=("alice-laptop",), days=30, reuse_ca=False, force=False)
    return out


@pytest.fixture(scope="session")
def other_certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA: its certificates must be refused everywhere."""
    out = tmp_path_factory.mktemp("other-certs")
    certs.generate(out, hosts=(), clients=("mallory",), days=30, reuse_ca=False, force=False)
    return out


def start_server(certs_dir: Path, data_dir: Path, **overrides: object) -> Server:
    config = ServerConfig(
        host="127.0.0.1", port=0, certs_dir=certs_dir, data_dir=data_dir, io_threads=2
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    return Server(config).start()


@pytest.fixture
def server(certs_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """A server with test defaults; @pytest.mark.server_config(name=value) overrides fields."""
    marker = request.node.get_closest_marker("server_config")
    srv = start_server(certs_dir, tmp_path / "data", **(marker.kwargs if marker else {}))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def make_identity(tmp_path: Path) -> Callable[[str], identity.Identity]:
    made: dict[str, identity.Identity] = {}

    def make(name: str) -> identity.Identity:
        if name not in made:
            made[name] = identity.create(
                tmp_path / "keys" / f"{name}.key", PASSPHRASE, kdf=identity.KDF_FAST_FOR_TESTS
            )
        return made[name]

    return make


@pytest.fixture(scope="session")
def _full_strength_keys(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("full-strength-keys")

    def template(name: str) -> Path:
        path = folder / f"{name}.key"
        if not path.exists():
            identity.create(path, PASSPHRASE)
        return path

    return template


@pytest.fixture
def cli_key(tmp_path: Path, _full_strength_keys: Callable[[str], Path]) -> Callable[[str], Path]:
    """Key files for `securechat` subprocesses, which refuse the light test KDF limits: each
    name's key is made once a session with the full limits and copied into tmp_path/keys."""

    def key(name: str) -> Path:
        path = tmp_path / "keys" / f"{name}.key"
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copyfile(_full_strength_keys(name), path)
            path.chmod(0o600)
        return path

    return key


Connect = Callable[[str, str], Client]


@pytest.fixture
def device(
    server: Server,
    certs_dir: Path,
    make_identity: Callable[[str], identity.Identity],
    tmp_path: Path,
) -> Iterator[Connect]:
    """`device("alice", "phone")` logs in a device of alice: her key file copied to a folder of
    its own (its device files live beside it), so each name is another installation."""
    clients: list[Client] = []

    def connect(user: str, name: str) -> Client:
        original = make_identity(user).path
        assert original is not None
        path = tmp_path / "devices" / f"{user}-{name}" / original.name
        if not path.exists():
            path.parent.mkdir(parents=True)
            shutil.copy2(original, path)
        ident = identity.load(path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS)
        host, port = server.address
        client = Client.connect(host, port, ident, user, certs_dir / "ca.pem")
        clients.append(client)
        return client

    try:
        yield connect
    finally:
        for client in clients:
            client.close()


def plant_device(
    server: Server, monkeypatch: pytest.MonkeyPatch, user: str, signer: identity.Identity
) -> Any:
    """A compromised server lists, beside `user`'s real devices, a device record of its own
    signed by `signer` (not `user`'s key); returns that record."""
    import json

    from securechat.e2e import records
    from securechat.e2e.device import Device
    from securechat.server.devicestore import DeviceEntry, StoredDevice

    forged = records.sign_device(signer, user, Device.create())
    entry = DeviceEntry(
        user, forged.device_id, json.dumps(forged.to_wire()), forged.curve25519, forged.ed25519, 1
    )
    real = server.store.list_devices
    monkeypatch.setattr(
        server.store,
        "list_devices",
        lambda name: (
            [*real(name), StoredDevice(entry, 1, None, None)] if name == user else real(name)
        ),
    )
    return forged


@pytest.fixture
def connect(
    server: Server, certs_dir: Path, make_identity: Callable[[str], identity.Identity]
) -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def connect_as(user: str, key_name: str | None = None, **kwargs: object) -> Client:
        host, port = server.address
        client = Client.connect(
            host, port, make_identity(key_name or user), user, certs_dir / "ca.pem", **kwargs
        )
        clients.append(client)
        return client

    try:
        yield connect_as
    finally:
        for client in clients:
            client.close()


def drop_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients stop acknowledging DMs (as if each connection dropped before its ack went out)
    until monkeypatch.undo()."""
    from securechat.client.connection import ClientConnection

    real_send = ClientConnection.send
    monkeypatch.setattr(
        ClientConnection,
        "send",
        lambda self, data: None if b'"ack"' in data else real_send(self, data),
    )


def rewrite_sent_frames(
    monkeypatch: pytest.MonkeyPatch,
    frame_type: str,
    rewrite: Callable[[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    """Make the server's hub (a hostile server) send, in place of each frame of `frame_type` it
    encodes, the frames rewrite(frame) returns (room messages, joins, parts, DMs...)."""
    from securechat import framing
    from securechat.server import hub as hub_module

    class HostileFraming:
        def __getattr__(self, name: str) -> Any:
            return getattr(framing, name)

        def encode(
            self, frame: dict[str, Any], max_frame: int = framing.MAX_FRAME_DEFAULT
        ) -> bytes:
            if frame.get("type") != frame_type:
                return framing.encode(frame, max_frame)
            return b"".join(framing.encode(f, max_frame) for f in rewrite(dict(frame)))

        def room_message(
            self,
            room: str,
            sender: str,
            text: str,
            ts: int,
            action: bool,
            max_frame: int = framing.MAX_FRAME_DEFAULT,
        ) -> bytes:
            # The hub's template for a room message: the frame it stands for, through encode.
            frame: dict[str, Any] = {"type": "message", "room": room, "from": sender}
            frame.update(text=text, ts=ts)
            if action:
                frame["action"] = True
            return self.encode(frame, max_frame)

    monkeypatch.setattr(hub_module, "framing", HostileFraming())


def wait_for(client: Client, predicate: Callable[[Event], bool], timeout: float = 10.0) -> Event:
    """The first event matching predicate; fails the test if none comes before the deadline."""
    deadline = time.monotonic() + timeout
    seen = []
    while (remaining := deadline - time.monotonic()) > 0:
        event = client.next_event(timeout=remaining)
        if event is None:
            break
        if predicate(event):
            return event
        seen.append(event)
    raise AssertionError(f"no matching event within {timeout}s; saw {seen!r}")


def join_plain(client: Client, room: str) -> dict[str, Any]:
    """Make `room` a plain room (TLS only: the server reads it) and join it, for tests of chat
    and delivery rather than of end-to-end encryption (a room made by a plain join is
    encrypted, and its messages must then come from the client's Megolm)."""
    return client._conn.request("join", room=room, create=True, plain=True).result(10)


def plain_room_kept(
    address: tuple[str, int], certs_dir: Path, ident: identity.Identity, room: str
) -> str:
    """Make `room` plain with one line of history (said by `ident`'s user, "keeper"), which keeps
    it plain once empty and across a restart on the same data folder, so that clients which
    join it with an ordinary join (a front end, a reconnect) find it plain. Returns the line."""
    line = f"{room} is a plain room"
    with Client.connect(*address, ident, "keeper", certs_dir / "ca.pem") as keeper:
        join_plain(keeper, room)
        keeper.send(room, line).result(10)
    return line


def close_and_see_it_part(client: Client, watcher: Client) -> None:
    """Close `client`, then wait until `watcher` (in #lobby) sees it part: close() may return
    before the server has logged it out, and a DM sent meanwhile would be delivered, not queued."""
    user = client.user
    client.close()
    wait_for(watcher, lambda e: isinstance(e, Parted) and e.user == user)


class KeyOffers:
    """A compromised server's key look-ups: `keys` requests for a name in `offer` are answered
    with the key the test sets there."""

    def __init__(self, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offer: dict[str, bytes] = {}
        real = server.store.public_key
        monkeypatch.setattr(
            server.store, "public_key", lambda user: self.offer.get(user) or real(user)
        )


@pytest.fixture
def key_offers(server: Server, monkeypatch: pytest.MonkeyPatch) -> KeyOffers:
    return KeyOffers(server, monkeypatch)


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[Path]:
    """Everything the server logs, at DEBUG, in a file: to show what never reaches a log."""
    log_file = tmp_path / "server.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("securechat")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield log_file
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
