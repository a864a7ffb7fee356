"""Servers under test: a fresh securechat or ngircd on loopback, and what /proc says of them.

Each starts in a temporary folder of its own, with certificates from our own generator (an ECDSA
P-256 CA and server certificate, the same for both), so every run measures a server with an empty
database and the same TLS cost.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 30.0

# Limits opened up for benchmarking: per-user rate, per-address and total connection caps. The
# message size, frame size, queue cap and every other check stay as they are in production.
SECURECHAT_BENCH_FLAGS = [
    "--rate", "1000000", "--burst", "1000000", "--max-per-address", "0",
    "--max-connections", "0", "--idle-timeout", "0",
]  # fmt: skip

NGIRCD_CONF = """\
[Global]
    Name = bench.local
    Info = securechat benchmark peer
    Listen = 127.0.0.1
    Ports =
    PidFile = {folder}/ngircd.pid
    MotdPhrase = bench
    ServerUID = {uid}
    ServerGID = {gid}

[Limits]
    MaxConnections = 0
    MaxConnectionsIP = 0
    MaxJoins = 0
    MaxNickLength = 30
    MaxListSize = 100000
    MaxPenaltyTime = 0
    PingTimeout = 600
    PongTimeout = 600

[Options]
    DNS = no
    Ident = no
    PAM = no
    MorePrivacy = no
    SyslogFacility =
    RequireAuthPing = no

[SSL]
    CertFile = {folder}/certs/server.pem
    KeyFile = {folder}/certs/server.key
    Ports = {port}
    CipherList = SECURE256:+SECURE128:-VERS-ALL:+VERS-TLS1.3
"""


@dataclass
class Target:
    kind: str  # "securechat" or "ngircd"
    host: str
    port: int
    ca: Path
    pid: int | None  # the server process, when we can see it
    process: subprocess.Popen[bytes] | None = None
    folder: Path | None = None
    sources: tuple[str, ...] = ()  # local addresses the clients connect from (default: any)

    def as_json(self) -> dict[str, object]:
        spec: dict[str, object] = {"kind": self.kind, "host": self.host, "port": self.port}
        return {**spec, "ca": str(self.ca), "sources": list(self.sources)}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _pin(cpus: list[int] | None):  # type: ignore[no-untyped-def]
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def make_certs(folder: Path) -> Path:
    certs = folder / "certs"
    subprocess.run(
        [sys.executable, "-m", "securechat", "gen-certs", "--out", str(certs)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return certs


def start_securechat(
    folder: Path, cpus: list[int] | None, extra: list[str], profile: str = ""
) -> Target:
    """A fresh securechat server; with `profile`, its threads under cProfile (profile.py)."""
    certs = make_certs(folder)
    launcher = ["scripts.loadgen.profile", profile] if profile else ["securechat"]
    cmd = [
        sys.executable, "-m", *launcher, "server", "--port", "0", "--certs", str(certs),
        "--data", str(folder / "data"), "--log-level", "warning", *SECURECHAT_BENCH_FLAGS, *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, preexec_fn=_pin(cpus))
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(r"listening on (\S+):(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"securechat server did not start: {line!r}")
    return Target("securechat", match[1], int(match[2]), certs / "ca.pem", proc.pid, proc, folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ngircd_binary() -> str | None:
    found = shutil.which("ngircd")
    return found or ("/usr/sbin/ngircd" if os.access("/usr/sbin/ngircd", os.X_OK) else None)


def start_ngircd(folder: Path, cpus: list[int] | None) -> Target:
    binary = ngircd_binary()
    if binary is None:
        raise RuntimeError("ngircd is not installed (Debian: apt-get install ngircd)")
    certs = make_certs(folder)
    port = free_port()
    conf = folder / "ngircd.conf"
    conf.write_text(NGIRCD_CONF.format(folder=folder, port=port, uid=os.getuid(), gid=os.getgid()))
    proc = subprocess.Popen(
        [binary, "-n", "-f", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_pin(cpus),
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ngircd exited with {proc.returncode}; config: {conf}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)  # polling for the port, bounded by the deadline
    else:
        proc.kill()
        raise RuntimeError("ngircd did not open its port")
    return Target("ngircd", "127.0.0.1", port, certs / "ca.pem", proc.pid, proc, folder)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a whole process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
