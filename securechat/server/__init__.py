"""The securechat server: listener, I/O loops, hub and store."""

from securechat.server.app import Server, ServerConfig

__all__ = ["Server", "ServerConfig"]
