"""The securechat client library: the Client API, with no terminal or window in it.

The front ends (securechat.terminal, securechat.gui) are built on it; bots use it directly.
"""

from securechat.client.api import Client, KeyChanged, RequestError

__all__ = ["Client", "KeyChanged", "RequestError"]
