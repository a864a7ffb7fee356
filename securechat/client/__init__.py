"""The securechat client: the Client API and the terminal front ends built on it."""

from securechat.client.api import Client, RequestError

__all__ = ["Client", "RequestError"]
