"""The errors a deadbolt client raises: one class per wire error code.

Every error the server answers is a :class:`DeadboltError` with its wire
``code`` and ``message``; catch a subclass (``Busy``, ``NotHeld``, ...) to
handle one code. Failures to reach a server at all, after the client's
retries, are :class:`ConnectionLost` (also a builtin ``ConnectionError``).
"""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "DeadboltError",
    "BadRequest",
    "Busy",
    "Timeout",
    "Cancelled",
    "NotHeld",
    "NoSuchSet",
    "TooLarge",
    "Overloaded",
    "Unauthorized",
    "ShuttingDown",
    "Unavailable",
    "Conflict",
    "Internal",
    "ConnectionLost",
    "ProtocolError",
    "error_for",
]


class DeadboltError(Exception):
    """An error answered by the server, or met on the way to it.

    ``code`` is the wire error code (``"busy"``, ``"not_held"``, ...), or
    ``"connection_lost"``/``"protocol"`` for errors of the client's own.
    """

    code: str = "unknown"

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(DeadboltError):
    """The request was malformed or a value out of bounds; nothing changed."""

    code = "bad_request"


class Busy(DeadboltError):
    """``lock`` that would not wait, on a held key."""

    code = "busy"


class Timeout(DeadboltError, TimeoutError):
    """``lock`` waited its whole ``wait`` without being granted."""

    code = "timeout"


class Cancelled(DeadboltError):
    """The waiting request was cancelled."""

    code = "cancelled"


class NotHeld(DeadboltError):
    """The token does not name the key's current grant (the lease ran out,
    or someone unlocked it)."""

    code = "not_held"


class NoSuchSet(DeadboltError):
    """The set was never set up, expired, or was torn down."""

    code = "no_such_set"


class TooLarge(DeadboltError):
    """The message or batch is over the server's limit."""

    code = "too_large"


class Overloaded(DeadboltError):
    """A capacity limit of the server was reached; nothing changed."""

    code = "overloaded"


class Unauthorized(DeadboltError):
    """Not allowed."""

    code = "unauthorized"


class ShuttingDown(DeadboltError):
    """The server is stopping."""

    code = "shutting_down"


class Unavailable(DeadboltError):
    """The server cannot keep a change right now (full disk, no quorum)."""

    code = "unavailable"


class Conflict(DeadboltError):
    """The request disagrees with the key's other requests."""

    code = "conflict"


class Internal(DeadboltError):
    """A server bug."""

    code = "internal"


class ConnectionLost(DeadboltError, ConnectionError):
    """No server could be reached, or the connection broke, and retrying
    with the same client id did not succeed within ``retry_for``."""

    code = "connection_lost"


class ProtocolError(DeadboltError):
    """The server sent something that is not a valid reply."""

    code = "protocol"


_BY_CODE: Dict[str, Type[DeadboltError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Busy,
        Timeout,
        Cancelled,
        NotHeld,
        NoSuchSet,
        TooLarge,
        Overloaded,
        Unauthorized,
        ShuttingDown,
        Unavailable,
        Conflict,
        Internal,
    )
}


def error_for(code: str, message: str) -> DeadboltError:
    """The exception for a wire error ``code`` (a plain
    :class:`DeadboltError` for a code this client does not know)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return DeadboltError(message, code)
    return cls(message)
