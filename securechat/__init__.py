"""securechat: self-hosted encrypted chat over TLS 1.3 with end-to-end sealed direct messages."""

__version__ = "0.1.0"
