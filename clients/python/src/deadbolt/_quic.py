"""One QUIC connection (``quic://HOST:PORT``, ALPN ``deadbolt/1``): a
bidirectional stream per request, which writes one message and finishes;
the server writes one reply and finishes. A lost packet stalls only its
own request. Needs the ``quic`` extra (``pip install 'deadbolt[quic]'``,
which installs ``aioquic``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from ._connection import MESSAGE_BYTES_MAX, Lost, give_up_lock, ok_or_raise
from .errors import ProtocolError, error_for

try:
    from aioquic.asyncio.client import connect as quic_connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
except ImportError as missing:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "quic:// URLs need aioquic: pip install 'deadbolt[quic]' (or use ws://HOST:PORT/ws)"
    ) from missing

#: The ALPN of protocol version 1.
ALPN = "deadbolt/1"
#: The application error code a stream is reset with to cancel its request.
CANCELLED = 0


def parse_url(url: str) -> Tuple[str, int]:
    """``quic://HOST:PORT`` → (host, port)."""
    parts = urlsplit(url)
    if parts.scheme != "quic" or not parts.hostname or parts.port is None:
        raise ValueError(f"{url}: expected quic://HOST:PORT")
    return parts.hostname, parts.port


class _Protocol(QuicConnectionProtocol):
    """aioquic's protocol, also ending a stream's reader when the stream is
    reset, and remembering why the connection ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.terminated = asyncio.Event()
        self.why = "QUIC connection closed"

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamReset):
            reader = self._stream_readers.get(event.stream_id)
            if reader is not None:
                reader.feed_eof()
        elif isinstance(event, events.ConnectionTerminated):
            self.why = f"QUIC connection closed ({event.error_code}: {event.reason_phrase})"
            self.terminated.set()
        super().quic_event_received(event)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        self.terminated.set()


class QuicConnection:
    """An open QUIC connection to one server."""

    def __init__(self, url: str, protocol: _Protocol, stack: contextlib.AsyncExitStack) -> None:
        self.url = url
        self._protocol = protocol
        self._stack = stack
        self._own_ids = 0

    @classmethod
    async def open(cls, url: str, timeout: float, ca: Optional[str], insecure: bool) -> "QuicConnection":
        """Connects to ``url``, trusting the certificate in ``ca`` (or the
        system's, or anything with ``insecure``); raises :class:`Lost` if
        it cannot."""
        host, port = parse_url(url)
        configuration = QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], max_datagram_frame_size=None
        )
        configuration.idle_timeout = 30.0
        if insecure:
            configuration.verify_mode = ssl.CERT_NONE
        elif ca is not None:
            configuration.load_verify_locations(cafile=ca)
        stack = contextlib.AsyncExitStack()
        made: List[_Protocol] = []

        def create_protocol(*args: Any, **kwargs: Any) -> _Protocol:
            made.append(_Protocol(*args, **kwargs))
            return made[-1]

        try:
            opening = quic_connect(host, port, configuration=configuration, create_protocol=create_protocol)
            protocol = await asyncio.wait_for(stack.enter_async_context(opening), timeout)
        except Exception as error:  # noqa: BLE001 - refused, timed out, bad certificate...
            await stack.aclose()
            # aioquic's error says little; the connection's close says why.
            why = str(error) or type(error).__name__
            if made and made[0].terminated.is_set():
                why = made[0].why
            raise Lost(f"cannot connect to {url}: {why}", sent=False) from error
        assert isinstance(protocol, _Protocol)
        return cls(url, protocol, stack)

    @property
    def is_open(self) -> bool:
        """Whether the connection still works, as far as we know."""
        return not self._protocol.terminated.is_set()

    async def wait_closed(self) -> None:
        """Returns once the connection has closed."""
        await self._protocol.terminated.wait()

    async def request(self, request_id: int, op: str, fields: Dict[str, Any]) -> Dict[str, Any]:
        """Sends one request on a stream of its own and returns its ``ok``
        object; raises the server's error, or :class:`Lost`.

        Cancelling the awaiting task cancels a waiting ``lock`` on the
        server (see :func:`give_up_lock`), and resets the stream of any
        other request."""
        if not self.is_open:
            raise Lost(self._protocol.why, sent=False)
        data = json.dumps({"id": request_id, "op": op, **fields}, separators=(",", ":")).encode()
        if len(data) > MESSAGE_BYTES_MAX:
            raise error_for("too_large", f"a {op} message of more than {MESSAGE_BYTES_MAX} bytes")
        reader, writer = await self._protocol.create_stream()
        stream_id = writer.get_extra_info("stream_id")
        writer.write(data)
        writer.write_eof()
        reading = asyncio.ensure_future(self._read_message(reader))
        try:
            message = await asyncio.shield(reading)
        except asyncio.CancelledError:
            if op == "lock":
                await asyncio.shield(give_up_lock(self, request_id, str(fields.get("key")), reading))
            else:
                reading.cancel()
                self._reset(stream_id)
            raise
        return ok_or_raise(message)

    def own_id(self) -> int:
        """An id for a request the connection sends on its own (a cancel)."""
        self._own_ids += 1
        return (1 << 52) + self._own_ids

    async def _read_message(self, reader: asyncio.StreamReader) -> Dict[str, Any]:
        """Reads a stream's one reply, to the end of the stream."""
        reply = await reader.read()
        if not reply:
            raise Lost(self._protocol.why if not self.is_open else "the stream ended with no reply", sent=True)
        try:
            message = json.loads(reply)
        except ValueError as error:
            if not self.is_open:  # Cut short by the connection's end.
                raise Lost(self._protocol.why, sent=True) from error
            raise ProtocolError(f"unreadable reply from {self.url}: {reply[:200]!r}") from error
        if not isinstance(message, dict):
            raise ProtocolError(f"a reply that is not an object: {reply[:200]!r}")
        return message

    def _reset(self, stream_id: int) -> None:
        if not self.is_open:
            return
        quic = self._protocol._quic
        with contextlib.suppress(Exception):  # The stream may be finished already.
            quic.reset_stream(stream_id, CANCELLED)
            quic.stop_stream(stream_id, CANCELLED)
        self._protocol.transmit()

    async def close(self) -> None:
        """Closes the connection."""
        await self._stack.aclose()
        self._protocol.terminated.set()
