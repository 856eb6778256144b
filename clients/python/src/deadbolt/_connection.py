"""One WebSocket connection: requests out, replies matched to them by id."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any, Dict, Optional, Protocol


from websockets.asyncio.client import ClientConnection, connect as ws_connect

from .errors import ConnectionLost, DeadboltError, ProtocolError, error_for

log = logging.getLogger("deadbolt")

#: The server's default message limit; a larger message would make it close
#: the connection (1009), so it is refused here instead.
MESSAGE_BYTES_MAX = 1 << 20


class Lost(Exception):
    """The connection broke (or could not be opened): internal, retried."""

    def __init__(self, why: str, *, sent: bool) -> None:
        super().__init__(why)
        #: Whether the request was sent, so that it may have been carried out.
        self.sent = sent


class Connection:
    """An open WebSocket to one server, any number of requests in flight.
    (The QUIC connection, ``_quic.QuicConnection``, has the same methods.)"""

    def __init__(self, ws: ClientConnection, url: str) -> None:
        self.url = url
        self._ws = ws
        self._pending: Dict[int, "asyncio.Future[Dict[str, Any]]"] = {}
        self._own_ids = 0
        self._closed = asyncio.Event()
        self._why = "connection closed"
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls, url: str, timeout: float, ca: Optional[str] = None, insecure: bool = False
    ) -> "Connection":
        """Opens a connection to ``url``; raises :class:`Lost` if it cannot.
        A ``wss://`` server's certificate is checked against ``ca`` (a PEM
        file; default: the system's), or not at all if ``insecure``."""
        context: Optional[ssl.SSLContext] = None
        if url.startswith("wss://"):
            context = ssl.create_default_context(cafile=ca)
            if insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        try:
            ws = await asyncio.wait_for(
                ws_connect(url, max_size=MESSAGE_BYTES_MAX * 2, open_timeout=None, ssl=context),
                timeout,
            )
        except Exception as error:  # noqa: BLE001 - refused, reset, timed out, not a WebSocket...
            why = str(error) or type(error).__name__
            raise Lost(f"cannot connect to {url}: {why}", sent=False) from error
        return cls(ws, url)

    @property
    def is_open(self) -> bool:
        """Whether the connection still works, as far as we know."""
        return not self._closed.is_set()

    async def wait_closed(self) -> None:
        """Returns once the connection has closed."""
        await self._closed.wait()

    async def request(self, request_id: int, op: str, fields: Dict[str, Any]) -> Dict[str, Any]:
        """Sends one request and returns its ``ok`` object; raises the
        server's error, or :class:`Lost` if the connection broke first.

        Cancelling the awaiting task cancels a waiting ``lock`` on the
        server (see :func:`give_up_lock`) before the cancellation goes on.
        """
        if not self.is_open:
            raise Lost(self._why, sent=False)
        text = json.dumps({"id": request_id, "op": op, **fields}, separators=(",", ":"))
        if len(text) > MESSAGE_BYTES_MAX // 4 and len(text.encode()) > MESSAGE_BYTES_MAX:
            raise error_for("too_large", f"a {op} message of more than {MESSAGE_BYTES_MAX} bytes")
        reply: "asyncio.Future[Dict[str, Any]]" = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        try:
            await self._ws.send(text)
        except Exception as error:  # noqa: BLE001 - any send failure is a lost connection
            self._pending.pop(request_id, None)
            raise Lost(f"cannot send: {error}", sent=True) from error
        try:
            message = await asyncio.shield(reply)
        except asyncio.CancelledError:
            if op == "lock":
                await asyncio.shield(give_up_lock(self, request_id, str(fields.get("key")), reply))
            self._pending.pop(request_id, None)
            raise
        return ok_or_raise(message)

    def own_id(self) -> int:
        """An id for a request the connection sends on its own (a cancel),
        far above the client's and below 2^53."""
        self._own_ids += 1
        return (1 << 52) + self._own_ids

    async def _read(self) -> None:
        try:
            async for data in self._ws:
                self._on_message(data)
            self._why = f"connection closed ({self._ws.close_code})"
        except Exception as error:  # noqa: BLE001 - any read failure ends the connection
            self._why = f"connection lost: {error}"
        finally:
            self._closed.set()
            pending, self._pending = self._pending, {}
            for reply in pending.values():
                if not reply.done():
                    reply.set_exception(Lost(self._why, sent=True))

    def _on_message(self, data: Any) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("unreadable message from %s: %.200r", self.url, data)
            return
        if not isinstance(message, dict):
            return
        request_id = message.get("id")
        # Replies to requests given up on find nobody.
        reply = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
        if reply is not None and not reply.done():
            reply.set_result(message)

    async def close(self) -> None:
        """Closes the connection (pending requests fail as lost)."""
        await self._ws.close()
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        self._closed.set()


#: How long giving up a waiting lock may take (its cancel's round trip).
GIVE_UP_TIMEOUT = 5.0


class _Requester(Protocol):
    def own_id(self) -> int: ...

    async def request(self, request_id: int, op: str, fields: Dict[str, Any]) -> Dict[str, Any]: ...


async def give_up_lock(
    connection: _Requester, request_id: int, key: str, reply: "asyncio.Future[Dict[str, Any]]"
) -> None:
    """The caller stopped waiting for ``lock`` request ``request_id``:
    cancels it on the server and waits for its answer, which is
    ``cancelled``, or a grant made while the cancel was on its way, which
    is given back at once. So when the caller's cancellation goes on, the
    key is not held by a grant nobody knows of (a later ``lock`` of this
    client would be answered that same grant, which a late release would
    then end)."""
    try:
        cancel = connection.request(connection.own_id(), "cancel", {"target": request_id})
        await asyncio.wait_for(cancel, GIVE_UP_TIMEOUT)
        message = await asyncio.wait_for(reply, GIVE_UP_TIMEOUT)
        token = (message.get("ok") or {}).get("token")
        if token is not None:
            unlock = connection.request(connection.own_id(), "unlock", {"key": key, "token": token})
            await asyncio.wait_for(unlock, GIVE_UP_TIMEOUT)
    except (Lost, DeadboltError, asyncio.TimeoutError) as error:
        # The connection is going (a grant on it ends with its lease).
        log.debug("giving up lock %s on %s: %s", request_id, key, error)


def ok_or_raise(message: Dict[str, Any]) -> Dict[str, Any]:
    """A reply's ``ok`` object, or its error raised."""
    err = message.get("err")
    if isinstance(err, dict):
        raise error_for(str(err.get("code")), str(err.get("message")))
    ok = message.get("ok")
    if not isinstance(ok, dict):
        raise ProtocolError(f"a reply with neither ok nor err: {message!r}")
    return ok


def lost_error(error: Lost, url: Optional[str]) -> ConnectionLost:
    """The public error for a connection failure the retries did not cure."""
    where = f" ({url})" if url else ""
    return ConnectionLost(f"{error}{where}")
