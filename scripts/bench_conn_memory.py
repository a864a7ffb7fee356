"""Where a held connection's memory goes on the server: OpenSSL's heap against Python's objects.

    PYTHONMALLOC=malloc python -m scripts.bench_conn_memory -n 2000   # from the repository root

N TLS 1.3 connections over socket pairs in this process, the server's side as the server makes
it (server/connection.py's TLSStream: an SSLObject over two memory BIOs, the context from
`tls.server_context`), each through its handshake and one frame each way. Then the clients are
closed, and what the server's sides still hold is counted per connection: the C heap in use
(glibc's mallinfo2, with every Python allocation sent to malloc by PYTHONMALLOC=malloc, so the
heap counts them too), Python's share of it (tracemalloc), the rest (OpenSSL and the memory
BIOs), and the resident memory. The server itself adds its own objects per connection
(`Connection`, `ServerSession`, the hub's entries: BENCHMARKS.md), and the allocator's
fragmentation from handshakes made on several threads at once; this isolates the TLS state.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import tempfile
import tracemalloc
from pathlib import Path

from scripts.bench_tls import FRAME, pair
from securechat import certs
from securechat.tls import client_context, server_context


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (small chunks and mmap'd ones)."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def snapshot() -> tuple[int, int, int]:
    gc.collect()
    return heap_in_use(), tracemalloc.get_traced_memory()[0], resident()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="connections")
    args = parser.parse_args()
    if os.environ.get("PYTHONMALLOC") != "malloc":
        parser.error("run with PYTHONMALLOC=malloc, so that the C heap counts Python's objects")
    with tempfile.TemporaryDirectory() as tmp:
        certs.generate(Path(tmp), hosts=["127.0.0.1"])
        sctx = server_context(Path(tmp))[0]
        cctx = client_context(Path(tmp) / "ca.pem")
    tracemalloc.start()
    before = snapshot()
    pairs = [pair("bio", sctx, cctx) for _ in range(args.n)]
    for server, client in pairs:
        client.send(FRAME)
        assert server.read() == FRAME
        server.write(FRAME)
        client.discard()
    servers = []
    for server, client in pairs:
        client.sock.close()
        servers.append(server)
    del pairs, server, client
    after = snapshot()
    heap, python, rss = (a - b for a, b in zip(after, before, strict=True))
    per = 1024 * args.n
    print(
        f"N={args.n} server-side TLS connections, KiB each: C heap in use {heap / per:.2f} "
        f"(Python objects {python / per:.2f}, OpenSSL and the BIOs {(heap - python) / per:.2f}); "
        f"resident {rss / per:.2f}"
    )
    assert len(servers) == args.n


if __name__ == "__main__":
    main()
