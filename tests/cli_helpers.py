"""Helpers for tests that run `securechat` as real subprocesses."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .conftest import PASSPHRASE, REPO


def cli_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SECURECHAT_PASSPHRASE": PASSPHRASE.decode(),
        **extra,
    }


class LineReader:
    """Collects a stream's lines on a thread; wait_for() waits with a deadline, never sleeps."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, fragment: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if fragment in line:
                return line
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            if fragment in line:
                return line
        raise AssertionError(f"never saw {fragment!r}; got {''.join(self.lines)!r}")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def text(self) -> str:
        return "".join(self.lines)


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
        self._log = LineReader(self.proc.stderr)
        self.address: tuple[str, int] | None = None
        first = self.proc.stdout.readline()  # blocks until listening, or EOF on failure
        if first.startswith("securechat server listening on "):
            host, _, port = first.rsplit(" ", 1)[1].strip().rpartition(":")
            self.address = (host, int(port))

    @property
    def log(self) -> list[str]:
        return self._log.lines

    def wait_log(self, fragment: str, timeout: float = 10.0) -> str:
        return self._log.wait_for(fragment, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.join(timeout)  # the log is complete once stderr reaches EOF
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


def client_args(
    key: Path, port: int, ca: Path, extra: tuple[str, ...], user: str | None
) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "securechat",
        "client",
        "--key",
        str(key),
        "--port",
        str(port),
        "--ca",
        str(ca),
        *extra,
    ]
    return [*args, "--user", user] if user else args


class LineClient:
    """`securechat client` in line mode: stdin is a pipe, stdout and stderr are read live."""

    def __init__(
        self, key: Path, port: int, ca: Path, *extra: str, user: str | None = None, cwd: Path = REPO
    ) -> None:
        args = client_args(key, port, ca, extra, user)
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out = LineReader(self.proc.stdout)
        self.err = LineReader(self.proc.stderr)

    def send(self, *lines: str) -> None:
        self.proc.stdin.write("".join(f"{line}\n" for line in lines))
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30.0) -> int:
        """Close stdin (end of input) and wait for the exit status."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        code = self.proc.wait(timeout)
        self.out.join(timeout)
        self.err.join(timeout)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def run_client(
    key: Path, port: int, ca: Path, stdin: str, *extra: str, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """A line-mode client fed `stdin` to its end."""
    args = client_args(key, port, ca, extra, user)
    return subprocess.run(
        args, cwd=REPO, env=cli_env(), input=stdin, capture_output=True, text=True, timeout=60
    )
