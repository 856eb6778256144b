"""deadbolt: leased locks and distinct sets for fleets of unreliable workers.

The asyncio client::

    client = await deadbolt.connect("ws://127.0.0.1:7420/ws")
    async with client.lock("job/42", ttl=30) as lock:
        write(lock.token)

and :mod:`deadbolt.sync` for scripts without ``async``. Errors are
:class:`DeadboltError` subclasses, one per wire error code.
"""

from . import proof
from .client import (
    Client,
    DistinctSet,
    Holder,
    Inserted,
    Lock,
    LockInfo,
    Member,
    SetInfo,
    SetUp,
    connect,
    random_client_id,
)
from .errors import (
    BadRequest,
    Busy,
    Cancelled,
    Conflict,
    ConnectionLost,
    DeadboltError,
    Internal,
    NoSuchSet,
    NotHeld,
    Overloaded,
    ProtocolError,
    ShuttingDown,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DistinctSet",
    "Holder",
    "Inserted",
    "Lock",
    "LockInfo",
    "Member",
    "SetInfo",
    "SetUp",
    "connect",
    "random_client_id",
    "proof",
    "BadRequest",
    "Busy",
    "Cancelled",
    "Conflict",
    "ConnectionLost",
    "DeadboltError",
    "Internal",
    "NoSuchSet",
    "NotHeld",
    "Overloaded",
    "ProtocolError",
    "ShuttingDown",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
]
