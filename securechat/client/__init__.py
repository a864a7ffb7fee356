"""The securechat client: the Client API and the terminal front ends built on it."""

from securechat.client.api import Client, KeyChanged, RequestError

__all__ = ["Client", "KeyChanged", "RequestError"]
