"""`securechat gui`: a connect dialog for whatever the options left out, then the chat window.

Unlocking the key (Argon2) and connecting run on the bridge's background thread; every failure
(wrong passphrase, unreachable server, certificate refused, name taken) is shown in the dialog in
the words of our own errors, never as a traceback.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from tkinter import ttk

from securechat import identity, settings
from securechat.client.chat_session import ChatOptions, ChatSession, resolve_user
from securechat.errors import SecureChatError
from securechat.gui.bridge import Bridge
from securechat.gui.window import ChatWindow

DEFAULT_KEY = Path.home() / ".securechat" / "me.key"


@dataclass
class GuiOptions:
    key_path: Path | None = None
    user: str | None = None
    host: str = settings.DEFAULT_HOST
    port: int = settings.DEFAULT_PORT
    ca: Path = settings.DEFAULT_CA
    history: bool = True
    passphrase: str = field(default="", repr=False)  # from SECURECHAT_PASSPHRASE, if set


class ConnectDialog:
    """The first screen: fields pre-filled from the options, the passphrase masked."""

    def __init__(self, root: tk.Tk, bridge: Bridge, opts: GuiOptions) -> None:
        self.root, self.bridge, self.opts = root, bridge, opts
        self.window: ChatWindow | None = None
        root.title("securechat: connect")
        self.frame = ttk.Frame(root, padding=16)
        self.frame.pack(fill="both", expand=True)
        self.fields: dict[str, ttk.Entry] = {}
        user = opts.user or (identity.peek_user(opts.key_path) if opts.key_path else None)
        rows = (
            ("key", "Identity key file", str(opts.key_path or DEFAULT_KEY), ""),
            ("user", "User name", user or "", ""),
            ("host", "Server", opts.host, ""),
            ("port", "Port", str(opts.port), ""),
            ("ca", "CA certificate", str(opts.ca), ""),
            ("passphrase", "Passphrase", opts.passphrase, "\u2022"),
        )
        for row, (name, label, value, show) in enumerate(rows):
            ttk.Label(self.frame, text=label).grid(row=row, column=0, sticky="w", pady=2)
            entry = ttk.Entry(self.frame, width=44, show=show)
            entry.insert(0, value)
            entry.grid(row=row, column=1, sticky="we", pady=2)
            entry.bind("<Return>", lambda _e: self.connect())
            self.fields[name] = entry
        self.error = tk.Label(
            self.frame, text="", foreground="#b00020", wraplength=440, justify="left"
        )
        self.error.grid(row=len(rows), column=0, columnspan=2, sticky="w", pady=(8, 0))
        self.button = ttk.Button(self.frame, text="Connect", command=self.connect)
        self.button.grid(row=len(rows) + 1, column=1, sticky="e", pady=(8, 0))
        empty = next((e for e in self.fields.values() if not e.get()), self.fields["passphrase"])
        empty.focus_set()
        root.protocol("WM_DELETE_WINDOW", self.cancel)
        if opts.key_path and user and self.fields["passphrase"].get():
            root.after(0, self.connect)  # the options and SECURECHAT_PASSPHRASE said it all

    def cancel(self) -> None:
        self.bridge.close()
        self.root.destroy()

    def value(self, name: str) -> str:
        return self.fields[name].get().strip()

    def show_error(self, message: str) -> None:
        self.error.configure(text=message)
        self.button.state(["!disabled"])

    def connect(self) -> None:
        """Unlock the key and log in, off the Tk thread; errors come back as plain words."""
        try:
            port = int(self.value("port"))
        except ValueError:
            self.show_error("the port must be a number")
            return
        key_path = Path(self.value("key")).expanduser()
        passphrase = self.fields["passphrase"].get().encode("utf-8")
        user_field, host, ca = (
            self.value("user") or None,
            self.value("host"),
            Path(self.value("ca")),
        )
        history_wanted = self.opts.history
        self.button.state(["disabled"])
        self.error.configure(text="connecting\u2026", foreground="#555555")

        def work() -> ChatSession:
            if not passphrase:
                raise SecureChatError("enter the passphrase of your identity key")
            user = resolve_user(key_path, user_field)
            me, _created = identity.load_or_create(key_path, lambda _new: passphrase)
            opts = ChatOptions(key_path, user, host, port, ca, history=history_wanted)
            return ChatSession.connect(opts, me, user)

        def failed(exc: Exception) -> None:
            self.error.configure(foreground="#b00020")
            self.show_error(str(exc) or "no answer from the server")

        self.bridge.run(work, self._connected(f"{host}:{port}"), failed)

    def _connected(self, where: str) -> Callable[[ChatSession], None]:
        def show(session: ChatSession) -> None:
            self.frame.destroy()
            self.window = ChatWindow(self.root, self.bridge, session, where)

        return show


def run(opts: GuiOptions) -> int:
    """Open the window and run until it is closed."""
    try:
        root = tk.Tk()
    except tk.TclError as exc:
        raise SecureChatError(f"cannot open a window: {exc} (is DISPLAY set?)") from None
    bridge = Bridge(root)
    ConnectDialog(root, bridge, opts)
    root.mainloop()
    return 0
