"""`securechat server` as a real subprocess: startup, errors, logs and graceful shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from securechat.client import Client
from securechat.client.events import Closed, Joined, Message

from .cli_helpers import ServerProcess
from .conftest import REPO, join_plain, wait_for


def test_missing_certificates_name_gen_certs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "securechat",
            "server",
            "--port",
            "0",
            "--certs",
            str(tmp_path / "nope"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("securechat: error: missing ")
    assert "run `securechat gen-certs --out " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_option_has_an_environment_variable_shown_in_help() -> None:
    for command in ("server", "client", "gen-certs", "fingerprint"):
        out = subprocess.run(
            [sys.executable, "-m", "securechat", command, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        options = [
            line.split()[0]
            for line in out.splitlines()
            if line.strip().startswith("--") and not line.strip().startswith("--help")
        ]
        assert options, out
        flat = " ".join(out.split())  # click wraps long help lines
        assert flat.count("env var: SECURECHAT_") >= len(options), out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_gracefully_and_tells_clients(
    sig: int, certs_dir: Path, tmp_path: Path, make_identity
) -> None:
    server = ServerProcess(
        "--certs", str(certs_dir), "--data", str(tmp_path / "data"), cwd=tmp_path
    )
    assert server.address is not None, "".join(server.log)
    host, port = server.address
    with Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem") as alice:
        wait_for(alice, lambda e: isinstance(e, Joined))
        assert server.stop(sig) == 0
        assert wait_for(alice, lambda e: isinstance(e, Closed)) == Closed("server shutting down")
    assert f"{signal.Signals(sig).name} received; shutting down" in "".join(server.log)


def test_log_names_who_came_and_went_but_never_what_they_wrote(
    certs_dir: Path, tmp_path: Path, make_identity
) -> None:
    # With --history 0 the server keeps no room messages, so nothing anyone wrote is on its disk.
    server = ServerProcess(
        "--certs",
        str(certs_dir),
        "--data",
        str(tmp_path / "data"),
        "--log-level",
        "debug",
        "--history",
        "0",
        cwd=tmp_path,
    )
    assert server.address is not None, "".join(server.log)
    host, port = server.address
    secret = "the launch code is 0000"
    try:
        alice = Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem")
        bob = Client.connect(host, port, make_identity("bob"), "bob", certs_dir / "ca.pem")
        join_plain(alice, "#ops")
        bob.join("#ops").result(5)
        alice.send("#ops", secret).result(5)
        assert wait_for(bob, lambda e: isinstance(e, Message)).text == secret
        bob.close()
        server.wait_log("bob left")
        alice.close()
        server.wait_log("alice left")
    finally:
        assert server.stop() == 0
    log = "".join(server.log)
    assert "alice logged in from 127.0.0.1:" in log
    assert "bob logged in from 127.0.0.1:" in log
    assert secret not in log
    for path in (tmp_path / "data").iterdir():
        assert secret.encode() not in path.read_bytes(), path
