"""End-to-end direct messages between devices: Olm sessions (vodozemac) under the identity key.

Every module here is free of sockets and threads: it takes records, keys and bytes in and gives
records, keys and bytes out. storage.py is the one module that reads and writes files.
"""
