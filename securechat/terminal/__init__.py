"""The terminal front end: the interactive prompt and line mode, on the securechat.client API.

The slash-command language (commands, controller) lives here too; the GUI offers the same
commands and imports them from here. Nothing in securechat.client imports this package.
"""
