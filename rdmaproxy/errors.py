"""Exception hierarchy shared by the pure core modules.

``ProtocolViolation`` marks anything a peer did that the protocol forbids (a malformed
control message, a cursor going backwards, an event that is illegal in the stream's state).
The caller's answer to a violation about one stream is to reset that stream; a violation
that cannot be attributed to a stream (bad HELLO, bad proof) ends the peer connection.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "PoolError",
    "ProtocolViolation",
    "RdmaproxyError",
]


class RdmaproxyError(Exception):
    """Base class of every error rdmaproxy raises on purpose."""


class ProtocolViolation(RdmaproxyError):
    """The peer (or, for local events, this process) broke the wire protocol."""


class ConfigError(RdmaproxyError):
    """A configuration input (option, file) is unusable; the message says which and why."""


class PoolError(RdmaproxyError):
    """The pinned pool could not be created or used."""
