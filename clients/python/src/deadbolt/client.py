"""The asyncio client: connection handling, retries, locks and sets.

It mirrors the Rust client (``core/src/client``) and the browser client
(``/deadbolt.js``): a random 128-bit client id kept for the client's whole
life, ``hello`` on every new connection, and every request retried on a
new connection after a lost one, which the protocol makes safe (a retried
``lock`` returns the same token, a retried ``insert`` the same ``first``).
A server that answers ``unavailable`` or ``shutting_down`` is left for the
next URL; ``overloaded`` is retried on the same connection. All of it
within ``retry_for`` seconds of the first failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import secrets
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Generator,
    Iterable,
    List,
    Optional,
    Sequence,
    TYPE_CHECKING,
    Tuple,
    Union,
)

from ._connection import Connection, Lost, lost_error
from .errors import (
    Busy,
    DeadboltError,
    NotHeld,
    Overloaded,
    ShuttingDown,
    Timeout,
    Unavailable,
)

log = logging.getLogger("deadbolt")

if TYPE_CHECKING:
    from ._quic import QuicConnection

    AnyConnection = Union[Connection, QuicConnection]
else:
    AnyConnection = Any

#: A duration: seconds (int or float) or a ``timedelta``.
Seconds = Union[float, int, timedelta]

#: Keys per ``insert`` request of :meth:`DistinctSet.insert_many`.
INSERT_BATCH_KEYS = 1000
#: Bytes of keys per ``insert`` request of :meth:`DistinctSet.insert_many`.
INSERT_BATCH_BYTES = 256 * 1024
#: Keys per ``members`` page.
MEMBERS_PAGE = 1000


def _seconds(value: Seconds, what: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{what} must be a number of seconds or a timedelta, got {value!r}")
    return float(value)


def _millis(seconds: float) -> int:
    return max(0, int(round(seconds * 1000)))


def _ttl_ms(ttl: Seconds) -> int:
    ttl_ms = _millis(_seconds(ttl, "ttl"))
    if ttl_ms < 1:
        raise ValueError(f"ttl must be at least 1 ms, got {ttl!r}")
    return ttl_ms


#: The most holders a counting semaphore admits (SPEC section 7).
LOCK_LIMIT_MAX = 10_000
#: The longest lock delay, in seconds (SPEC section 7).
LOCK_DELAY_MAX = 60.0


@dataclass(frozen=True)
class _Kind:
    """How a ``lock`` holds its key (SPEC section 7): shared or exclusive,
    the semaphore's limit, and the lock delay; checked when asked for, so a
    bad value is refused before anything is sent."""

    shared: bool = False
    limit: int = 1
    lock_delay_ms: int = 0

    @staticmethod
    def of(shared: bool, limit: int, lock_delay: Seconds) -> "_Kind":
        if not isinstance(limit, int) or not 1 <= limit <= LOCK_LIMIT_MAX:
            raise ValueError(f"limit must be 1..={LOCK_LIMIT_MAX}, got {limit!r}")
        if shared and limit != 1:
            raise ValueError("a shared lock takes no limit (it admits any number of readers)")
        delay = _seconds(lock_delay, "lock_delay")
        if not 0 <= delay <= LOCK_DELAY_MAX:
            raise ValueError(f"lock_delay must be 0..={LOCK_DELAY_MAX:g} s, got {lock_delay!r}")
        return _Kind(shared, limit, _millis(delay))

    def fields(self) -> Dict[str, Any]:
        """The request's fields for this kind; defaults are left out, so a
        plain mutex is understood by servers before SPEC section 7."""
        fields: Dict[str, Any] = {}
        if self.shared:
            fields["mode"] = "shared"
        if self.limit != 1:
            fields["limit"] = self.limit
        if self.lock_delay_ms:
            fields["lock_delay_ms"] = self.lock_delay_ms
        return fields


def random_client_id() -> str:
    """A random 128-bit client id in hex."""
    return secrets.token_hex(16)


def _holder(holder: Dict[str, Any]) -> Holder:
    return Holder(
        holder["client"],
        holder.get("token"),
        holder["remaining_ms"],
        holder.get("mode", "exclusive"),
    )


def _drift(ttl: float) -> float:
    """The margin for clock-rate drift between client and server (1 % of
    the lease + 2 ms, as Redlock and the Rust client do)."""
    return ttl / 100 + 0.002


@dataclass(frozen=True)
class Inserted:
    """The answer to one ``insert``: the key's 1-based index in arrival
    order (the same for every inserter), and whether this client owns it."""

    index: int
    first: bool


@dataclass(frozen=True)
class Member:
    """One member of a distinct set."""

    index: int
    key: str


@dataclass(frozen=True)
class SetUp:
    """The answer to ``set_up``."""

    created: bool
    size: int


@dataclass(frozen=True)
class SetInfo:
    """The answer to ``inspect_set``."""

    size: int
    remaining_ms: int


@dataclass(frozen=True)
class Holder:
    """A holder of a lock, as ``inspect`` sees it. ``token`` is ``None``
    when a server with ``--auth`` hides it (it shows a token only to its
    holder's client id and to admins)."""

    client: str
    token: Optional[int]
    remaining_ms: int
    mode: str = "exclusive"


@dataclass(frozen=True)
class LockInfo:
    """The answer to ``inspect``: the holder (``None`` if free) and how
    many wait."""

    holder: Optional[Holder]
    waiters: int
    #: Every holder, oldest grant first (several for a shared lock or a
    #: semaphore).
    holders: List[Holder] = field(default_factory=list)
    #: How many exclusive holders the key admits (its semaphore limit).
    limit: int = 1


@dataclass
class _Timed:
    """A reply, when the attempt that got it was sent, and on what."""

    reply: Dict[str, Any]
    sent_at: float
    connection: "AnyConnection"
    earlier_may_have_run: bool


class Client:
    """A deadbolt client. Make one with :func:`connect`.

    One client is one client id: locks it takes and keys it inserts first
    are owned by that id, across reconnects. Use it from one event loop.
    """

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        *,
        client_id: Optional[str] = None,
        retry_for: Seconds = 30.0,
        retry_delay: Seconds = 0.02,
        retry_delay_max: Seconds = 1.0,
        connect_timeout: Seconds = 5.0,
        ca: Optional[str] = None,
        insecure: bool = False,
        auth: Optional[str] = None,
    ) -> None:
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("no server URL")
        for url in urls:
            if url.startswith("quic://"):
                from . import _quic  # Raises ImportError naming the extra if aioquic is missing.

                _quic.parse_url(url)
            elif not url.startswith(("ws://", "wss://")):
                raise ValueError(f"{url}: expected ws://HOST:PORT/ws or quic://HOST:PORT")
        self.urls: List[str] = list(urls)
        self.client_id: str = client_id or random_client_id()
        if not 1 <= len(self.client_id.encode()) <= 64:
            raise ValueError("a client id is 1..=64 bytes")
        self.retry_for = _seconds(retry_for, "retry_for")
        self._retry_delay = _seconds(retry_delay, "retry_delay")
        self._retry_delay_max = _seconds(retry_delay_max, "retry_delay_max")
        self._connect_timeout = _seconds(connect_timeout, "connect_timeout")
        self._ca = ca
        self._insecure = insecure
        # The principal's secret, for a server started with --auth; never
        # shown (not in repr).
        self._auth = auth
        self._at = 0
        self._current: Optional[AnyConnection] = None
        self._reconnecting = asyncio.Lock()
        self._ids = itertools.count(1)
        self._releasing: Dict[str, int] = {}
        self._released = asyncio.Event()
        self._closed = False
        #: Locks whose renewal runs, stopped when the client closes.
        self._renewing: "weakref.WeakSet[Lock]" = weakref.WeakSet()
        self._background: "set[asyncio.Task[None]]" = set()

    def __repr__(self) -> str:
        return f"<deadbolt.Client {self.client_id} {','.join(self.urls)}>"

    # Connections.

    async def _connection(self) -> AnyConnection:
        """The open connection, opening one (and saying ``hello``) if needed."""
        if self._closed:
            raise DeadboltError("the client is closed", "closed")
        current = self._current
        if current is not None and current.is_open:
            return current
        async with self._reconnecting:
            current = self._current
            if current is not None and current.is_open:
                return current
            self._current = await self._open()
            return self._current

    async def _open_one(self, url: str) -> AnyConnection:
        if url.startswith("quic://"):
            from ._quic import QuicConnection

            return await QuicConnection.open(url, self._connect_timeout, self._ca, self._insecure)
        return await Connection.open(url, self._connect_timeout, self._ca, self._insecure)

    async def _open(self) -> AnyConnection:
        """Opens a connection to the first URL that answers, from the one
        that last did, and says ``hello`` on it."""
        last: Optional[Lost] = None
        for step in range(len(self.urls)):
            at = (self._at + step) % len(self.urls)
            try:
                connection = await self._open_one(self.urls[at])
            except Lost as error:
                last = error
                continue
            try:
                hello = {"client": self.client_id}
                if self._auth:
                    hello["auth"] = self._auth
                await connection.request(next(self._ids), "hello", hello)
            except (Unavailable, ShuttingDown):
                await connection.close()
                self._at = (at + 1) % len(self.urls)
                raise
            except BaseException:
                await connection.close()
                raise
            self._at = at
            return connection
        assert last is not None
        raise last

    def _forget(self, connection: Optional[AnyConnection]) -> None:
        if connection is not None and self._current is connection:
            self._current = None

    def _leave(self, connection: Optional[AnyConnection]) -> None:
        """The server behind ``connection`` cannot serve now: new requests
        go to a new connection, to the next URL."""
        if connection is not None and self._current is connection:
            self._current = None
            self._at = (self.urls.index(connection.url) + 1) % len(self.urls)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff, jittered from the client id: a fleet does
        not retry in step, yet one client's run is reproducible."""
        base = min(self._retry_delay * (1 << min(attempt, 16)), self._retry_delay_max)
        digest = hashlib.blake2b(f"{attempt}:{self.client_id}".encode(), digest_size=2).digest()
        return base / 2 + base * (int.from_bytes(digest, "big") % 1024) / 2048

    async def _call(self, op: str, make_fields: Callable[[bool], Dict[str, Any]]) -> _Timed:
        """Sends ``op`` with fields from ``make_fields(earlier_may_have_run)``
        (called anew for each attempt, told whether an earlier attempt may
        have been carried out), retrying while the retry budget lasts."""
        offline_since: Optional[float] = None
        attempt = 0
        may_have_run = False
        while True:
            connection: Optional[AnyConnection] = None
            failure: Union[Lost, DeadboltError]
            sent_at = time.monotonic()
            try:
                connection = await self._connection()
                sent_at = time.monotonic()
                reply = await connection.request(next(self._ids), op, make_fields(may_have_run))
                return _Timed(reply, sent_at, connection, may_have_run)
            except Lost as error:
                self._forget(connection)
                restarts, this_may_have_run, failure = error.sent, error.sent, error
            except ShuttingDown as error:
                self._leave(connection)
                restarts, this_may_have_run, failure = True, True, error
            except Unavailable as error:
                self._leave(connection)
                restarts, this_may_have_run, failure = False, True, error
            except Overloaded as error:
                restarts, this_may_have_run, failure = False, False, error
            now = time.monotonic()
            if offline_since is None or restarts:
                offline_since = now
            if now - offline_since >= self.retry_for:
                if isinstance(failure, Lost):
                    raise lost_error(failure, connection.url if connection else None) from None
                raise failure
            log.debug("retrying %s after %s (attempt %d)", op, failure, attempt)
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            may_have_run = may_have_run or this_may_have_run

    async def call(self, op: str, **fields: Any) -> Dict[str, Any]:
        """Sends any protocol op and returns its ``ok`` object, retrying as
        every call does (the protocol's ops are all safe to retry)."""
        timed = await self._call(op, lambda _: fields)
        return timed.reply

    async def close(self) -> None:
        """Closes the connection. Held locks stay held until their leases
        end (ephemeral ones are released by the server now)."""
        self._closed = True
        for lock in list(self._renewing):
            lock._stop()
        current, self._current = self._current, None
        if current is not None:
            await current.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Plain ops.

    async def ping(self) -> None:
        """A round trip to the server."""
        await self.call("ping")

    async def inspect(self, key: str) -> LockInfo:
        """Who holds ``key`` and how many wait for it."""
        reply = await self.call("inspect", key=key)
        holder = reply.get("holder")
        return LockInfo(
            holder=_holder(holder) if holder else None,
            waiters=reply.get("waiters", 0),
            holders=[_holder(h) for h in reply.get("holders", [])],
            limit=reply.get("limit", 1),
        )

    async def stats(self, top: int = 20) -> Dict[str, Any]:
        """The server's counters, sizes and top lists (see docs/protocol.md)."""
        return await self.call("stats", top=top)

    # Locks.

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
    ) -> "_LockCall":
        """Takes ``key`` with a lease of ``ttl`` seconds.

        Await it for a :class:`Lock`, or use it as ``async with client.lock(...)
        as lock:``, which releases the lock at the end. Waits as long as it
        takes, or at most ``wait`` seconds (then raises :class:`Timeout`;
        ``wait=0`` raises :class:`Busy` if the key is held). With
        ``auto_renew`` (the default) the lease is renewed every third of it
        until released. With ``ephemeral`` the server releases it as soon
        as this client's connection closes.

        ``shared=True`` holds it shared (a reader, beside other readers and
        no writer); ``limit=N`` makes the key a counting semaphore of N
        permits (every user of the key must give the same N, else
        :class:`Conflict`); ``lock_delay`` keeps the key from everyone for
        that long after this grant's lease *runs out* (not after an
        unlock), so that a paused holder's writes land first (SPEC section
        7).
        """
        _ttl_ms(ttl)  # A bad ttl or kind is refused now, not when awaited.
        kind = _Kind.of(shared, limit, lock_delay)
        return _LockCall(self._acquire(key, ttl, wait, ephemeral, auto_renew, kind))

    async def try_lock(
        self,
        key: str,
        ttl: Seconds,
        *,
        wait: Seconds = 0,
        ephemeral: bool = False,
        auto_renew: bool = True,
        shared: bool = False,
        limit: int = 1,
        lock_delay: Seconds = 0,
    ) -> Optional["Lock"]:
        """Takes ``key`` if it is free (or becomes free within ``wait``
        seconds); ``None`` if not. The kind of lock is as for :meth:`lock`."""
        kind = _Kind.of(shared, limit, lock_delay)
        try:
            return await self._acquire(key, ttl, wait, ephemeral, auto_renew, kind)
        except (Busy, Timeout):
            return None

    async def _acquire(
        self,
        key: str,
        ttl: Seconds,
        wait: Optional[Seconds],
        ephemeral: bool,
        auto_renew: bool,
        kind: _Kind = _Kind(),
    ) -> "Lock":
        ttl_ms = _ttl_ms(ttl)
        deadline = None if wait is None else time.monotonic() + _seconds(wait, "wait")
        await self._settled(key)

        def fields(_: bool) -> Dict[str, Any]:
            request: Dict[str, Any] = {"key": key, "ttl_ms": ttl_ms}
            if deadline is not None:
                request["wait_ms"] = _millis(max(0.0, deadline - time.monotonic()))
            if ephemeral:
                request["ephemeral"] = True
            request.update(kind.fields())
            return request

        while True:
            timed = await self._call("lock", fields)
            lock = await self._anchor(key, timed, ephemeral, auto_renew)
            if lock is not None:
                return lock
            # The grant ran out before it could be re-anchored (the wait was
            # longer than the lease): ask again, within the wait left.
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"{key}: granted, but the lease ran out before it could be used")

    async def _anchor(
        self, key: str, timed: _Timed, ephemeral: bool, auto_renew: bool
    ) -> Optional["Lock"]:
        """A lock with a sound lease view, or ``None`` if the grant was
        already gone. The lease is measured from when the granting request
        was sent; a grant after a long wait is re-anchored by an extend."""
        token = int(timed.reply["token"])
        ttl = int(timed.reply["ttl_ms"]) / 1000
        anchor = timed.sent_at
        if time.monotonic() - anchor > ttl / 10:
            try:
                anchor = await self._extend(key, token, ttl)
            except NotHeld:
                return None
            except BaseException:
                self._unlock_in_background(key, token)
                raise
        bound_to = timed.connection if ephemeral else None
        lock = Lock(self, key, token, ttl, anchor + ttl - _drift(ttl), bound_to, auto_renew)
        lock.proof = timed.reply.get("proof")
        return lock

    async def _extend(self, key: str, token: int, ttl: float) -> float:
        """``extend``; returns when the answered attempt was sent."""
        ttl_ms = max(1, _millis(ttl))
        timed = await self._call("extend", lambda _: {"key": key, "token": token, "ttl_ms": ttl_ms})
        return timed.sent_at

    async def extend(self, key: str, token: int, ttl: Seconds) -> None:
        """Restarts the lease of the grant ``token`` of ``key`` at ``ttl``."""
        await self._extend(key, token, _ttl_ms(ttl) / 1000)

    async def unlock(self, key: str, token: int) -> None:
        """Ends the grant ``token`` of ``key``, from any client.

        Raises :class:`NotHeld` if the grant had already ended, unless an
        earlier attempt of this call may have been carried out before its
        connection broke (then that attempt did it)."""
        earlier_may_have_run = False

        def fields(earlier: bool) -> Dict[str, Any]:
            nonlocal earlier_may_have_run
            earlier_may_have_run = earlier
            return {"key": key, "token": token}

        try:
            await self._call("unlock", fields)
        except NotHeld:
            if not earlier_may_have_run:
                raise

    def _unlock_in_background(self, key: str, token: int) -> None:
        """Releases a grant nobody holds a lock object for, best effort; a
        later ``lock`` of the key by this client waits for it (a re-lock
        would get the same grant, which this unlock would then end)."""
        loop = asyncio.get_running_loop()  # Raises RuntimeError if there is none.
        self._releasing[key] = self._releasing.get(key, 0) + 1

        async def release() -> None:
            try:
                await self.unlock(key, token)
            except DeadboltError as error:
                log.debug("background unlock of %s failed: %s", key, error)
            finally:
                self._releasing[key] -= 1
                if not self._releasing[key]:
                    del self._releasing[key]
                self._released.set()

        # Held until done: the loop keeps only a weak reference to a task.
        task = loop.create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settled(self, key: str) -> None:
        while key in self._releasing:
            self._released.clear()
            await self._released.wait()

    # Sets.

    def set(self, name: str) -> "DistinctSet":
        """A handle on the distinct set ``name``."""
        return DistinctSet(self, name)


class _LockCall(Awaitable["Lock"]):
    """What :meth:`Client.lock` returns: await it, or ``async with`` it."""

    def __init__(self, acquire: Awaitable["Lock"]) -> None:
        self._acquire = acquire
        self._lock: Optional[Lock] = None

    def __await__(self) -> Generator[Any, None, "Lock"]:
        return self._acquire.__await__()

    async def __aenter__(self) -> "Lock":
        self._lock = await self._acquire
        return self._lock

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._lock is not None
        await self._lock.__aexit__(exc_type, exc, tb)


class Lock:
    """A held lock: its fencing ``token`` and a conservative view of its
    lease, which never outlasts the server's.

    Pass ``token`` to whatever the lock protects, and have that refuse any
    token lower than one it has seen. Release with :meth:`unlock` (or use
    ``async with``); :meth:`lost` resolves if the lock may no longer be
    held.
    """

    def __init__(
        self,
        client: Client,
        key: str,
        token: int,
        ttl: float,
        valid_until: float,
        bound_to: Optional["AnyConnection"],
        auto_renew: bool,
    ) -> None:
        self.key = key
        self.token = token
        #: The server's signed proof of the grant (``--sign-grants``), or
        #: ``None``: hand it to the protected resource, which checks it with
        #: :func:`deadbolt.proof.verify`. It states the grant's first lease.
        self.proof: Optional[str] = None
        self._client = client
        self._ttl = ttl
        self._valid_until = valid_until
        self._bound_to = bound_to
        self._lost = asyncio.Event()
        self._extending = asyncio.Lock()
        self._released = False
        self._tasks: List["asyncio.Task[None]"] = []
        loop = asyncio.get_running_loop()
        if bound_to is not None:
            self._tasks.append(loop.create_task(self._watch(bound_to)))
        if auto_renew:
            self._tasks.append(loop.create_task(self._renew()))
            client._renewing.add(self)

    def __repr__(self) -> str:
        return f"<deadbolt.Lock {self.key!r} token={self.token} valid_for={self.valid_for():.3f}s>"

    @property
    def ephemeral(self) -> bool:
        """Whether the lock ends with the connection that took it."""
        return self._bound_to is not None

    def valid_for(self) -> float:
        """Seconds the lock is certainly still held (0 once it may not be)."""
        if self._lost.is_set() or (self._bound_to is not None and not self._bound_to.is_open):
            return 0.0
        return max(0.0, self._valid_until - time.monotonic())

    def is_held(self) -> bool:
        """Whether the lock is certainly still held."""
        return self.valid_for() > 0

    async def lost(self) -> None:
        """Returns once the lock may no longer be held: its lease view ran
        out (renewal, if on, could not keep it up), the server said the
        grant is gone, or (ephemeral) its connection closed."""
        while True:
            left = self.valid_for()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=left)
                return
            except asyncio.TimeoutError:
                continue  # The lease may have been renewed meanwhile.

    async def extend(self, ttl: Optional[Seconds] = None) -> None:
        """Restarts the lease at ``ttl`` (default: the current one); renewal
        goes on at that period."""
        new_ttl = self._ttl if ttl is None else _ttl_ms(ttl) / 1000
        async with self._extending:
            try:
                sent_at = await self._client._extend(self.key, self.token, new_ttl)
            except NotHeld:
                self._lost.set()
                raise
            self._ttl = new_ttl
            self._valid_until = sent_at + new_ttl - _drift(new_ttl)

    async def unlock(self) -> None:
        """Stops renewal and releases the lock. :class:`NotHeld` means the
        lease had already run out: whatever the lock protected may have
        been touched by the next holder."""
        self._stop()
        self._released = True
        await self._client.unlock(self.key, self.token)

    def detach(self) -> int:
        """Lets go of the lock without releasing it (renewal stops; it is
        held until its lease ends or someone unlocks it by token, which
        this returns)."""
        self._stop()
        self._released = True
        return self.token

    def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    async def __aenter__(self) -> "Lock":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._released:
            return
        if exc_type is None:
            await self.unlock()
            return
        # Leaving on an error: release, but let the error be the one raised.
        try:
            await self.unlock()
        except DeadboltError as error:
            log.debug("unlock of %s after an error failed: %s", self.key, error)

    def __del__(self) -> None:
        # A lock dropped without unlock: release it in the background, as
        # the Rust client's guard does, if the loop is still running.
        if getattr(self, "_released", True):
            return
        try:
            self._stop()
            self._client._unlock_in_background(self.key, self.token)
        except RuntimeError:
            pass  # No running loop: the lease ends it.

    async def _watch(self, connection: "AnyConnection") -> None:
        await connection.wait_closed()
        self._lost.set()

    async def _renew(self) -> None:
        """Renews the lease every third of it until stopped or lost."""
        try:
            while not self._lost.is_set():
                renew_at = self._valid_until - self._ttl * 2 / 3
                await asyncio.sleep(max(0.0, renew_at - time.monotonic()))
                if not await self._renew_once():
                    log.warning("lock %s (token %d) lost: the lease could not be renewed", self.key, self.token)
                    self._lost.set()
                    return
        except asyncio.CancelledError:
            pass

    async def _renew_once(self) -> bool:
        """One renewal; False if the grant is gone or may be."""
        while True:
            async with self._extending:
                if time.monotonic() < self._valid_until - self._ttl * 2 / 3:
                    return True  # An explicit extend moved the lease meanwhile.
                left = self._valid_until - time.monotonic()
                if left <= 0:
                    return False
                try:
                    sent_at = await asyncio.wait_for(
                        self._client._extend(self.key, self.token, self._ttl), timeout=left
                    )
                except NotHeld:
                    return False
                except asyncio.TimeoutError:
                    return False
                except DeadboltError as error:
                    log.debug("renewal of %s failed (%s); trying again", self.key, error)
                else:
                    self._valid_until = sent_at + self._ttl - _drift(self._ttl)
                    return True
            await asyncio.sleep(self._ttl / 20)


class DistinctSet:
    """A handle on one distinct set. Cheap; make one with :meth:`Client.set`."""

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<deadbolt.DistinctSet {self.name!r}>"

    async def set_up(self, ttl: Seconds) -> SetUp:
        """Creates the set with time to live ``ttl``, or restarts its time
        to live; every worker may call it."""
        reply = await self._client.call("set_up", set=self.name, ttl_ms=_ttl_ms(ttl))
        return SetUp(bool(reply["created"]), int(reply["size"]))

    async def insert(self, key: str) -> Inserted:
        """Inserts ``key``: its index, and whether this client owns it."""
        reply = await self._client.call("insert", set=self.name, key=key)
        return Inserted(int(reply["index"]), bool(reply["first"]))

    async def insert_many(self, keys: Iterable[str]) -> List[Inserted]:
        """Inserts ``keys`` in order, in as few requests as the limits allow;
        one result per key, in the same order."""
        results: List[Inserted] = []
        batch: List[str] = []
        size = 0
        for key in keys:
            if batch and (len(batch) == INSERT_BATCH_KEYS or size + len(key) > INSERT_BATCH_BYTES):
                results.extend(await self._insert_batch(batch))
                batch, size = [], 0
            batch.append(key)
            size += len(key)
        if batch:
            results.extend(await self._insert_batch(batch))
        return results

    async def _insert_batch(self, keys: List[str]) -> List[Inserted]:
        reply = await self._client.call("insert", set=self.name, keys=keys)
        return [Inserted(int(r["index"]), bool(r["first"])) for r in reply["results"]]

    async def members(self, *, after: int = 0, page: int = MEMBERS_PAGE) -> AsyncIterator[Member]:
        """Every member in index order, after index ``after``, fetched a
        page at a time: ``async for member in s.members():``."""
        while True:
            reply = await self._client.call("members", set=self.name, after=after, limit=page)
            for member in reply["members"]:
                yield Member(int(member["index"]), str(member["key"]))
            following = reply.get("next")
            if following is None:
                return
            after = int(following)

    async def inspect(self) -> SetInfo:
        """The set's size and the time it has left to live."""
        reply = await self._client.call("inspect_set", set=self.name)
        return SetInfo(int(reply["size"]), int(reply["remaining_ms"]))

    async def tear_down(self) -> int:
        """Removes the set now; returns how many members it had."""
        reply = await self._client.call("tear_down", set=self.name)
        return int(reply["size"])


#: The server when neither ``urls`` nor ``$DEADBOLT_SERVER`` names one.
DEFAULT_URL = "ws://127.0.0.1:7420/ws"


async def connect(
    urls: Union[str, Sequence[str], None] = None,
    *,
    client_id: Optional[str] = None,
    retry_for: Seconds = 30.0,
    connect_timeout: Seconds = 5.0,
    ca: Optional[str] = None,
    insecure: bool = False,
    auth: Optional[str] = None,
) -> Client:
    """Connects to a deadbolt server and says ``hello``.

    ``urls`` is one ``ws://HOST:PORT/ws`` URL, or several (a list, or
    comma-separated) naming the nodes of a cluster: the client uses the
    first that answers and moves on when one cannot be reached or answers
    ``unavailable`` (default: ``$DEADBOLT_SERVER``, as for the command-line
    client, else ``ws://127.0.0.1:7420/ws``). ``client_id`` fixes the
    client id (default: ``$DEADBOLT_CLIENT_ID``, else a random 128-bit
    one), so that a rerun of a crashed job still owns its locks and
    ``first`` keys. ``retry_for`` bounds how long a request is retried
    while no server works.

    ``quic://HOST:PORT`` URLs need the ``quic`` extra (aioquic); ``ca`` is
    the certificate to trust for them (default: ``$DEADBOLT_CA``, else the
    system's; ``deadbolt serve`` writes its self-signed one as
    ``cert.pem`` in its data directory), and ``insecure`` skips the check,
    for development only. ``auth`` is the principal's secret for a server
    started with ``--auth`` (default: ``$DEADBOLT_AUTH``).
    """
    client = Client(
        urls or os.environ.get("DEADBOLT_SERVER") or DEFAULT_URL,
        client_id=client_id or os.environ.get("DEADBOLT_CLIENT_ID") or None,
        ca=ca or os.environ.get("DEADBOLT_CA") or None,
        retry_for=retry_for,
        connect_timeout=connect_timeout,
        insecure=insecure,
        auth=auth or os.environ.get("DEADBOLT_AUTH") or None,
    )
    await client._call("ping", lambda _: {})
    return client


__all__: Tuple[str, ...] = (
    "Client",
    "Lock",
    "DistinctSet",
    "Inserted",
    "Member",
    "SetUp",
    "SetInfo",
    "Holder",
    "LockInfo",
    "connect",
    "random_client_id",
)
