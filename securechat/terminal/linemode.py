"""Line mode, for scripts and bots: stdin is not a terminal.

Each input line is a message for the current room or a slash command. Every event and every
result is printed as exactly one line on stdout, in arrival order (newlines inside a message
are written as \\n, backslashes as \\\\); our own errors are lines starting with "!! " there too.
Diagnostics go to stderr. At end of input the client waits until the DMs queued for it have
arrived and the server has answered everything it sent, then leaves.

Exit status: 0 when everything was delivered; 1 when the server refused or did not answer a
request, or the connection was lost before the end of input.
"""

from __future__ import annotations

import sys
import threading
from functools import partial
from typing import TextIO

from securechat.client.chat_session import ChatSession, SessionEvent
from securechat.client.events import Closed
from securechat.terminal.controller import Controller, OwnerThread
from securechat.terminal.notices import Notice, as_text
from securechat.terminal.render import one_line

DRAIN_TIMEOUT = 30.0


def run(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    lock = threading.Lock()

    def output(notice: Notice) -> None:
        with lock:
            stdout.write(one_line(as_text(notice)) + "\n")
            stdout.flush()

    controller = Controller(session, output)
    owner = OwnerThread()  # input lines and events both go through the controller's thread
    finished = threading.Event()  # input ended (or /quit) or the connection closed
    lost: list[str] = []

    def pump_events() -> None:
        for event in session.events():
            if isinstance(event, Closed) and not controller.quit_requested:
                lost.append(event.reason)
            if not isinstance(event, SessionEvent):
                owner.call(partial(controller.on_event, event))
        finished.set()

    def read_input() -> None:
        try:
            for line in stdin:
                if not owner.call(partial(controller.handle_line, line.rstrip("\r\n"))):
                    break
        finally:
            # Whatever ended the input (even a bug), the client must not wait forever for it.
            controller.quit_requested = True
            finished.set()

    printer = threading.Thread(target=pump_events, name="events", daemon=True)
    printer.start()
    # stdin is read on its own thread so that a closed connection ends us even mid-read.
    threading.Thread(target=read_input, name="stdin", daemon=True).start()
    finished.wait()
    unanswered = False
    if not lost:
        controller.quit_requested = True
        client = session.client
        # A script that only reads (empty input) must still get the DMs that waited for it.
        client.wait_queue(DRAIN_TIMEOUT)
        if not client.wait_idle(DRAIN_TIMEOUT):
            print("securechat: some messages got no answer from the server", file=sys.stderr)
            unanswered = True
        session.close()
        printer.join(DRAIN_TIMEOUT)
    owner.close()
    if lost:
        print(f"securechat: connection lost: {lost[0]}", file=sys.stderr)
        return 1
    return 1 if controller.failures or unanswered else 0
