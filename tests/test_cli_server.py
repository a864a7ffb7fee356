"""`securechat server` as a real subprocess: startup, errors, logs and graceful shutdown."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from securechat.client import Client
from securechat.client.events import Closed, Joined, Message

from .conftest import REPO, wait_for


class ServerProcess:
    """A `securechat server` subprocess whose stderr (the log) is read line by line."""

    def __init__(self, *args: str, cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "securechat", "server", "--port", "0", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread = threading.Thread(
            target=self._pump, args=(self.proc.stderr,), daemon=True
        )
        self._pump_thread.start()
        self.address: tuple[str, int] | None = None
        first = self.proc.stdout.readline()  # blocks until listening, or EOF on failure
        if first.startswith("securechat server listening on "):
            host, _, port = first.rsplit(" ", 1)[1].strip().rpartition(":")
            self.address = (host, int(port))

    def _pump(self, stream) -> None:
        for line in stream:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_log(self, fragment: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        for line in self.log:
            if fragment in line:
                return line
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            if fragment in line:
                return line
        raise AssertionError(f"log never said {fragment!r}: {''.join(self.log)}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._pump_thread.join(timeout)  # the log is complete once stderr reaches EOF
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


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
    server = ServerProcess(
        "--certs",
        str(certs_dir),
        "--data",
        str(tmp_path / "data"),
        "--log-level",
        "debug",
        cwd=tmp_path,
    )
    assert server.address is not None, "".join(server.log)
    host, port = server.address
    secret = "the launch code is 0000"
    try:
        alice = Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem")
        bob = Client.connect(host, port, make_identity("bob"), "bob", certs_dir / "ca.pem")
        alice.join("#ops").result(5)
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
    db = (tmp_path / "data" / "securechat.db").read_bytes()
    assert secret.encode() not in db
