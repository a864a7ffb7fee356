"""End-to-end encrypted rooms on Megolm (vodozemac): the I/O-free core.

Each module has one job: the inner room record (record), key-share payloads (keyshare), the room
mode and its no-downgrade rule (mode), rotation policy (rotation), who gets keys (membership),
outbound and inbound group sessions (outbound, inbound), forwarding between one's own devices
(forwarding), state at rest (keys), and the facade the client drives (rooms). No sockets, no
files, no threads here; Olm to-device messages go through the OlmPort interface (port).
"""
