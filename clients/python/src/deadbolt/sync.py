"""A synchronous wrapper for scripts: the asyncio client run on an event
loop in a background thread (which also renews leases while the script
works).

::

    from deadbolt import sync as deadbolt

    client = deadbolt.connect("ws://127.0.0.1:7420/ws")
    with client.lock("nightly-report", ttl=30) as lock:
        make_report(fencing_token=lock.token)
    client.close()
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any, Coroutine, Iterable, Iterator, List, Optional, Sequence, Type, TypeVar, Union

from . import client as aio
from .client import Inserted, LockInfo, Member, Seconds, SetInfo, SetUp

T = TypeVar("T")

__all__ = ["Client", "Lock", "DistinctSet", "connect"]


class _Loop:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="deadbolt", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Lock:
    """A held lock; see :class:`deadbolt.Lock`. Use as ``with`` or call
    :meth:`unlock`."""

    def __init__(self, loop: _Loop, lock: aio.Lock) -> None:
        self._loop = loop
        self._lock = lock
        self.key: str = lock.key
        self.token: int = lock.token
        #: The grant's signed proof (``--sign-grants``), or ``None``.
        self.proof: Optional[str] = lock.proof

    def valid_for(self) -> float:
        """Seconds the lock is certainly still held."""
        return self._lock.valid_for()

    def is_held(self) -> bool:
        """Whether the lock is certainly still held."""
        return self._lock.is_held()

    def wait_lost(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the lock may no longer be held (True), or for at
        most ``timeout`` seconds (False if it is still held then)."""
        try:
            self._loop.run(asyncio.wait_for(self._lock.lost(), timeout))
            return True
        except asyncio.TimeoutError:
            return False

    def extend(self, ttl: Optional[Seconds] = None) -> None:
        """Restarts the lease at ``ttl`` (default: the current one)."""
        self._loop.run(self._lock.extend(ttl))

    def unlock(self) -> None:
        """Stops renewal and releases the lock."""
        self._loop.run(self._lock.unlock())

    def detach(self) -> int:
        """Lets go without releasing; returns the token."""
        return self._lock.detach()

    def __enter__(self) -> "Lock":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self._loop.run(self._lock.__aexit__(exc_type, exc, tb))


class DistinctSet:
    """A handle on one distinct set; see :class:`deadbolt.DistinctSet`."""

    def __init__(self, loop: _Loop, inner: aio.DistinctSet) -> None:
        self._loop = loop
        self._set = inner
        self.name = inner.name

    def set_up(self, ttl: Seconds) -> SetUp:
        """Creates the set, or restarts its time to live."""
        return self._loop.run(self._set.set_up(ttl))

    def insert(self, key: str) -> Inserted:
        """Inserts ``key``: its index and whether this client owns it."""
        return self._loop.run(self._set.insert(key))

    def insert_many(self, keys: Iterable[str]) -> List[Inserted]:
        """Inserts ``keys`` in order, batched; one result per key."""
        return self._loop.run(self._set.insert_many(list(keys)))

    def members(self, *, after: int = 0, page: int = aio.MEMBERS_PAGE) -> Iterator[Member]:
        """Every member in index order, fetched a page at a time."""
        pages = self._set.members(after=after, page=page)

        async def next_member() -> Member:
            return await pages.__anext__()

        while True:
            try:
                yield self._loop.run(next_member())
            except StopAsyncIteration:
                return

    def inspect(self) -> SetInfo:
        """The set's size and time left to live."""
        return self._loop.run(self._set.inspect())

    def tear_down(self) -> int:
        """Removes the set now; returns its size."""
        return self._loop.run(self._set.tear_down())


class Client:
    """The synchronous client; make one with :func:`connect`."""

    def __init__(self, loop: _Loop, inner: aio.Client) -> None:
        self._loop = loop
        self._client = inner
        self.client_id: str = inner.client_id

    def lock(
        self,
        key: str,
        ttl: Seconds,
        *,
        wait: Optional[Seconds] = None,
        ephemeral: bool = False,
        auto_renew: bool = True,
        shared: bool = False,
        limit: int = 1,
        lock_delay: Seconds = 0,
    ) -> Lock:
        """Takes ``key``; see :meth:`deadbolt.Client.lock` (``shared``,
        ``limit`` and ``lock_delay`` as there)."""
        call = self._client.lock(
            key,
            ttl,
            wait=wait,
            ephemeral=ephemeral,
            auto_renew=auto_renew,
            shared=shared,
            limit=limit,
            lock_delay=lock_delay,
        )

        async def acquire() -> aio.Lock:
            return await call

        return Lock(self._loop, self._loop.run(acquire()))

    def try_lock(
        self,
        key: str,
        ttl: Seconds,
        *,
        wait: Seconds = 0,
        auto_renew: bool = True,
        shared: bool = False,
        limit: int = 1,
        lock_delay: Seconds = 0,
    ) -> Optional[Lock]:
        """Takes ``key`` if free within ``wait``; ``None`` if not."""
        call = self._client.try_lock(
            key, ttl, wait=wait, auto_renew=auto_renew, shared=shared, limit=limit, lock_delay=lock_delay
        )
        lock = self._loop.run(call)
        return None if lock is None else Lock(self._loop, lock)

    def unlock(self, key: str, token: int) -> None:
        """Ends the grant ``token`` of ``key``."""
        self._loop.run(self._client.unlock(key, token))

    def inspect(self, key: str) -> LockInfo:
        """Who holds ``key`` and how many wait."""
        return self._loop.run(self._client.inspect(key))

    def set(self, name: str) -> DistinctSet:
        """A handle on the distinct set ``name``."""
        return DistinctSet(self._loop, self._client.set(name))

    def close(self) -> None:
        """Closes the connection and stops the background loop."""
        try:
            self._loop.run(self._client.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    urls: Union[str, Sequence[str], None] = None,
    *,
    client_id: Optional[str] = None,
    retry_for: Seconds = 30.0,
    ca: Optional[str] = None,
    insecure: bool = False,
    auth: Optional[str] = None,
) -> Client:
    """Connects; see :func:`deadbolt.connect`."""
    loop = _Loop()
    try:
        connecting = aio.connect(
            urls, client_id=client_id, retry_for=retry_for, ca=ca, insecure=insecure, auth=auth
        )
        inner = loop.run(connecting)
    except BaseException:
        loop.stop()
        raise
    return Client(loop, inner)
