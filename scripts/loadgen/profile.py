"""Run `securechat server` with cProfile on each I/O loop thread and on the store thread.

    python -m scripts.loadgen.profile OUT_PREFIX server --port 0 --certs ...
    python -m scripts.loadgen.native fanout -n 50 --profile /tmp/prof   # the usual way

Each profiled thread writes OUT_PREFIX.<thread name>.prof when it ends (the server ends its
threads on SIGTERM); read one with `python -m pstats`. cProfile slows the loop down about twice
over, so it tells where the time goes, not how fast the server is.
"""

from __future__ import annotations

import cProfile
import functools
import sys
import threading
from collections.abc import Callable
from typing import Any


def profiled(run: Callable[..., None], prefix: str) -> Callable[..., None]:
    @functools.wraps(run)
    def wrapper(self: Any, *args: Any) -> None:
        profile = cProfile.Profile()
        try:
            profile.runcall(run, self, *args)
        finally:
            profile.dump_stats(f"{prefix}.{threading.current_thread().name}.prof")

    return wrapper


def main() -> None:
    prefix, argv = sys.argv[1], sys.argv[2:]
    from securechat.server.loop import IOLoop
    from securechat.server.worker import StoreWorker

    IOLoop.run = profiled(IOLoop.run, prefix)  # type: ignore[method-assign]
    StoreWorker._run = profiled(StoreWorker._run, prefix)  # type: ignore[method-assign]
    from securechat.cli import main as cli

    sys.argv = ["securechat", *argv]
    cli()


if __name__ == "__main__":
    main()
