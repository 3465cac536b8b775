"""trio SOCKS server: accepts clients, drives the sans-I/O codec, connects, relays bytes.

All protocol decisions live in :mod:`rdmaproxy.socks.codec`; this module only does I/O:

1. accept a TCP client (one task per client, in a nursery the server owns);
2. run the handshake under ``handshake_timeout`` (a client that stalls is dropped);
3. ask a :class:`Connector` for the destination (``DirectTCPConnector`` dials TCP itself; the
   RDMA connector opens a stream through a peer);
4. send the success reply and relay both directions with TCP half-close semantics: EOF in one
   direction is forwarded with ``send_eof()`` while the other keeps flowing; a reset (or any
   error) on either side aborts both (SO_LINGER 0 → the TCP peer sees RST).

No exception escapes a client task: failures are logged (logger ``rdmaproxy.socks``) with the
client address, at INFO for what clients and networks normally do and WARNING for the unexpected.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import logging
import math
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NoReturn, Protocol, TypeVar, runtime_checkable

import attrs
import trio

from .codec import (
    NEED_DATA,
    UNSPECIFIED_BOUND,
    AuthRequest,
    BoundAddress,
    ConnectRequest,
    Destination,
    MethodSelected,
    ProtocolError,
    Socks5Reply,
    SocksServerConnection,
)
from .users import UserTable

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "ConnectFailed",
    "Connector",
    "DirectTCPConnector",
    "Direction",
    "OpenedLeg",
    "SocksServer",
    "StreamHooks",
    "abort_stream",
    "classify_connect_error",
    "serve_socks",
]

logger = logging.getLogger("rdmaproxy.socks")

DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_BUFFER_SIZE: Final = 64 * 1024
DEFAULT_LINGER_TIMEOUT: Final = 1.0
"""After an error reply: how long to drain the client before closing (so the reply is not lost
to an RST caused by unread input)."""
_LINGER_MAX_BYTES: Final = 256 * 1024

ClientAddress = tuple[str, int]


class Direction(enum.Enum):
    UPSTREAM = "client->remote"
    DOWNSTREAM = "remote->client"


class ConnectFailed(Exception):
    """Raised by a :class:`Connector`; ``code`` is sent to the client as the SOCKS reply."""

    def __init__(self, code: Socks5Reply, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (reply {self.code.name})"


@attrs.frozen
class OpenedLeg:
    """The remote leg of a proxied stream, as returned by a :class:`Connector`.

    ``abort`` tells the server how to abort this leg (e.g. send an RDMA ``RST``) when the client
    side resets; when None, :func:`abort_stream` is used (SO_LINGER 0 for a socket stream).
    """

    stream: trio.abc.HalfCloseableStream
    bound: BoundAddress
    abort: Callable[[], Awaitable[None]] | None = None


class Connector(Protocol):
    async def connect(self, dest: Destination, client: ClientAddress) -> OpenedLeg:
        """Open the remote leg to ``dest`` for ``client``, or raise :class:`ConnectFailed`."""
        ...


H = TypeVar("H")


class StreamHooks(Protocol[H]):
    """Optional observer of client streams (e.g. the global sockets registry).

    ``on_open`` is called when a client's CONNECT request has been parsed (before the connect);
    its result is passed back to ``on_bytes`` (after each chunk is forwarded) and ``on_close``
    (exactly once, when the client task ends, whatever the outcome).
    """

    def on_open(self, client: ClientAddress, dest: Destination) -> H: ...

    def on_bytes(self, handle: H, direction: Direction, n: int) -> None: ...

    def on_close(self, handle: H) -> None: ...


def _fmt_addr(addr: ClientAddress) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(stream: trio.SocketStream) -> ClientAddress:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    if isinstance(name, tuple) and len(name) >= 2:
        return (str(name[0]), int(name[1]))
    return (str(name), 0)


async def abort_stream(stream: trio.abc.AsyncResource) -> None:
    """Close abortively: for a socket stream set SO_LINGER (1, 0) first so the peer gets RST."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


# --------------------------------------------------------------------------- direct TCP

_ERRNO_REPLY: Final[dict[int, Socks5Reply]] = {
    errno.ECONNREFUSED: Socks5Reply.CONNECTION_REFUSED,
    errno.EHOSTUNREACH: Socks5Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Socks5Reply.HOST_UNREACHABLE,
    errno.ENETUNREACH: Socks5Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Socks5Reply.NETWORK_UNREACHABLE,
    errno.ETIMEDOUT: Socks5Reply.TTL_EXPIRED,
    errno.EPERM: Socks5Reply.NOT_ALLOWED,  # local firewall (netfilter DROP/REJECT on OUTPUT)
    errno.EACCES: Socks5Reply.NOT_ALLOWED,
}
# When several addresses were tried, report the most telling failure.
_REPLY_PRIORITY: Final = (
    Socks5Reply.CONNECTION_REFUSED,
    Socks5Reply.HOST_UNREACHABLE,
    Socks5Reply.NETWORK_UNREACHABLE,
    Socks5Reply.TTL_EXPIRED,
    Socks5Reply.NOT_ALLOWED,
    Socks5Reply.GENERAL_FAILURE,
)


def classify_connect_error(exc: OSError) -> tuple[Socks5Reply, str]:
    """Map a connect failure to a SOCKS5 reply code and a message.

    ``trio.open_tcp_stream`` raises one OSError whose ``__cause__`` groups the error of every
    address tried; the most telling one (refused > host > network unreachable > timeout) wins.
    """
    if isinstance(exc, socket.gaierror):
        return Socks5Reply.HOST_UNREACHABLE, f"name resolution failed: {exc.strerror or exc}"
    errors: list[OSError] = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        nested = [e for e in cause.exceptions if isinstance(e, OSError)]
        if nested:
            errors = nested
    classified = [
        (_ERRNO_REPLY.get(e.errno, Socks5Reply.GENERAL_FAILURE) if e.errno else None, e)
        for e in errors
    ]
    for code in _REPLY_PRIORITY:
        for got, err in classified:
            if got == code:
                return code, err.strerror or str(err)
    return Socks5Reply.GENERAL_FAILURE, str(exc)


@attrs.define
class DirectTCPConnector:
    """Connects to the destination over plain TCP from this host."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    happy_eyeballs_delay: float = 0.25

    async def connect(self, dest: Destination, client: ClientAddress) -> OpenedLeg:
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(
                    dest.host, dest.port, happy_eyeballs_delay=self.happy_eyeballs_delay
                )
        except trio.TooSlowError:
            raise ConnectFailed(
                Socks5Reply.TTL_EXPIRED,
                f"connect to {dest} timed out after {self.connect_timeout:g} s",
            ) from None
        except UnicodeError as exc:  # trio encodes names with IDNA; e.g. a 64-byte label
            raise ConnectFailed(
                Socks5Reply.HOST_UNREACHABLE, f"invalid host name {dest.host!r}: {exc}"
            ) from None
        except OSError as exc:
            code, message = classify_connect_error(exc)
            raise ConnectFailed(code, f"connect to {dest}: {message}") from None
        try:
            bound = BoundAddress.from_sockaddr(stream.socket.getsockname())
        except (OSError, TypeError, ValueError):
            bound = UNSPECIFIED_BOUND
        return OpenedLeg(stream=stream, bound=bound)


# --------------------------------------------------------------------------- server


@attrs.frozen
class _RelayFailure:
    side: str  # "client" or "remote": whose stream raised
    direction: Direction
    exc: Exception


@attrs.define
class SocksServer:
    """Configuration plus the per-client handler; :meth:`serve` runs the accept loops."""

    connector: Connector
    users: UserTable | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    buffer_size: int = DEFAULT_BUFFER_SIZE
    hooks: StreamHooks[Any] | None = None
    linger_timeout: float = DEFAULT_LINGER_TIMEOUT

    def __attrs_post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be positive, not {self.buffer_size}")
        if not self.handshake_timeout > 0 or math.isnan(self.handshake_timeout):
            raise ValueError(f"handshake_timeout must be positive, not {self.handshake_timeout}")

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Accept on ``listeners`` forever; ``task_status.started(listeners)``."""
        async with trio.open_nursery() as nursery:
            await trio.serve_listeners(
                self.handle_client,
                list(listeners),
                handler_nursery=nursery,
                task_status=task_status,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def handle_client(self, client: trio.SocketStream) -> None:
        """Serve one client to completion. Never raises (except trio.Cancelled)."""
        peer = _peer_of(client)
        try:
            await self._serve_client(client, peer)
        except Exception:
            logger.warning("client %s: unexpected error", _fmt_addr(peer), exc_info=True)
        finally:
            await trio.aclose_forcefully(client)

    async def _serve_client(self, client: trio.SocketStream, peer: ClientAddress) -> None:
        who = _fmt_addr(peer)
        conn = SocksServerConnection(auth_required=self.users is not None)
        outcome: ConnectRequest | bytes | None = None
        try:
            with trio.move_on_after(self.handshake_timeout):
                outcome = await self._handshake(client, conn, who)
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__ or exc
            logger.info("client %s: connection lost during the handshake: %s", who, cause)
            return
        if outcome is None:
            logger.info(
                "client %s: handshake not completed within %g s, dropped",
                who,
                self.handshake_timeout,
            )
            await abort_stream(client)
            return
        if isinstance(outcome, bytes):
            await self._refuse(client, outcome)
            return

        request = outcome
        dest = request.destination
        hooks = self.hooks
        handle = hooks.on_open(peer, dest) if hooks is not None else None
        try:
            await self._connect_and_relay(client, conn, request, peer, handle)
        finally:
            if hooks is not None:
                hooks.on_close(handle)

    async def _handshake(
        self, client: trio.SocketStream, conn: SocksServerConnection, who: str
    ) -> ConnectRequest | bytes:
        """Run the codec until a request (returned) or a failure (its reply bytes returned)."""
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await client.receive_some(self.buffer_size))
            elif isinstance(event, MethodSelected):
                await client.send_all(event.reply)
            elif isinstance(event, AuthRequest):
                ok = self.users is not None and self.users.check(event.username, event.password)
                reply = conn.authenticate(ok)
                if not ok:
                    logger.info(
                        "client %s: authentication failed for user %r",
                        who,
                        event.username.decode("utf-8", "backslashreplace"),
                    )
                    return reply
                await client.send_all(reply)
            elif isinstance(event, ProtocolError):
                logger.info("client %s: %s", who, event.message)
                return event.reply
            else:
                return event

    async def _refuse(self, client: trio.SocketStream, reply: bytes) -> None:
        """Send an error reply, then close gracefully: FIN, drain input briefly, close.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        reply before the client reads it; draining first avoids that.
        """
        with trio.move_on_after(self.linger_timeout):
            try:
                if reply:
                    await client.send_all(reply)
                await client.send_eof()
                drained = 0
                while drained < _LINGER_MAX_BYTES:
                    data = await client.receive_some(self.buffer_size)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _connect_and_relay(
        self,
        client: trio.SocketStream,
        conn: SocksServerConnection,
        request: ConnectRequest,
        peer: ClientAddress,
        handle: object,
    ) -> None:
        who = _fmt_addr(peer)
        dest = request.destination
        try:
            leg = await self.connector.connect(dest, peer)
        except ConnectFailed as exc:
            logger.info("client %s: CONNECT %s failed: %s", who, dest, exc)
            await self._refuse(client, conn.reject(exc.code))
            return
        except Exception:
            logger.warning("client %s: connector failed for %s", who, dest, exc_info=True)
            await self._refuse(client, conn.reject(Socks5Reply.GENERAL_FAILURE))
            return

        logger.info("client %s: SOCKS%d CONNECT %s via %s", who, request.version, dest, leg.bound)
        graceful = False
        try:
            await client.send_all(conn.accept(leg.bound))
            trailing, client_eof = conn.trailing_data
            relay = Relay(self.hooks, handle, self.buffer_size)
            async with trio.open_nursery() as nursery:
                relay.cancel_scope = nursery.cancel_scope
                nursery.start_soon(
                    relay.pump, client, leg.stream, Direction.UPSTREAM, trailing, client_eof
                )
                nursery.start_soon(relay.pump, leg.stream, client, Direction.DOWNSTREAM, b"", False)
            if relay.failures:
                first = relay.failures[0]
                reset = isinstance(first.exc, trio.BrokenResourceError)
                logger.log(
                    logging.INFO if reset else logging.WARNING,
                    "client %s: %s side of %s failed (%s, after %s): %s; aborting both",
                    who,
                    first.side,
                    dest,
                    first.direction.value,
                    relay.describe_counts(),
                    first.exc.__cause__ or first.exc,
                    exc_info=not reset,
                )
            else:
                graceful = True
                logger.debug("client %s: %s closed (%s)", who, dest, relay.describe_counts())
        except trio.BrokenResourceError as exc:  # sending the success reply
            logger.info("client %s: lost before the reply: %s", who, exc.__cause__ or exc)
        finally:
            with trio.CancelScope(shield=True):
                if graceful:
                    with trio.move_on_after(self.linger_timeout):
                        await leg.stream.aclose()
                    await client.aclose()
                else:
                    await self._abort_leg(leg, who)
                    await abort_stream(client)

    async def _abort_leg(self, leg: OpenedLeg, who: str) -> None:
        if leg.abort is None:
            await abort_stream(leg.stream)
            return
        try:
            await leg.abort()
        except Exception:
            logger.warning("client %s: aborting the remote leg failed", who, exc_info=True)
            await trio.aclose_forcefully(leg.stream)


class SpliceSocketError(trio.BrokenResourceError):
    """The socket side of a splice failed (not the splicing stream itself)."""


@runtime_checkable
class SocketSplicer(Protocol):
    """A stream that moves bytes from/to a socket without a Python ``bytes`` in between.

    Both return the bytes moved, 0 at end of stream, and raise SpliceSocketError when the
    socket fails. The relay uses them instead of ``receive_some``/``send_all`` when the other
    side is a plain TCP socket stream (rdmaproxy.node.RingStream implements them).
    """

    async def splice_from_socket(self, sock: trio.socket.SocketType) -> int: ...

    async def splice_to_socket(self, sock: trio.socket.SocketType) -> int: ...


@attrs.define
class Relay:
    """Both directions of one proxied stream; the first failure cancels the other direction."""

    hooks: StreamHooks[Any] | None
    handle: object
    buffer_size: int
    cancel_scope: trio.CancelScope | None = None
    counts: dict[Direction, int] = attrs.Factory(lambda: dict.fromkeys(Direction, 0))
    failures: list[_RelayFailure] = attrs.Factory(list)

    def describe_counts(self) -> str:
        return ", ".join(f"{d.value} {n} B" for d, n in self.counts.items())

    async def pump(
        self,
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        direction: Direction,
        initial: bytes,
        src_eof: bool,
    ) -> None:
        """Copy src → dst (``initial`` first) until EOF, then ``dst.send_eof()``.

        Any exception is recorded and cancels the relay; nothing propagates.
        """
        src_side, dst_side = ("client", "remote")
        if direction is Direction.DOWNSTREAM:
            src_side, dst_side = dst_side, src_side
        failing_side = dst_side
        socket_side = dst_side
        try:
            if initial:
                await dst.send_all(initial)
                self._count(direction, len(initial))
            if not src_eof:
                move: Callable[[], Awaitable[int]] | None = None
                if isinstance(src, trio.SocketStream) and isinstance(dst, SocketSplicer):
                    move = functools.partial(dst.splice_from_socket, src.socket)
                    failing_side, socket_side = dst_side, src_side
                elif isinstance(dst, trio.SocketStream) and isinstance(src, SocketSplicer):
                    move = functools.partial(src.splice_to_socket, dst.socket)
                    failing_side, socket_side = src_side, dst_side
                if move is not None:
                    while n := await move():
                        self._count(direction, n)
                else:
                    while True:
                        failing_side = src_side
                        data = await src.receive_some(self.buffer_size)
                        if not data:
                            break
                        failing_side = dst_side
                        await dst.send_all(data)
                        self._count(direction, len(data))
            failing_side = dst_side
            await dst.send_eof()
        except SpliceSocketError as exc:
            self._fail(socket_side, direction, exc)
        except Exception as exc:
            self._fail(failing_side, direction, exc)

    def _count(self, direction: Direction, n: int) -> None:
        self.counts[direction] += n
        if self.hooks is not None:
            self.hooks.on_bytes(self.handle, direction, n)

    def _fail(self, side: str, direction: Direction, exc: Exception) -> None:
        self.failures.append(_RelayFailure(side, direction, exc))
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()


async def serve_socks(
    connector: Connector,
    *,
    host: str | None = "127.0.0.1",
    port: int = 1080,
    listeners: Sequence[trio.SocketListener] | None = None,
    users: UserTable | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    hooks: StreamHooks[Any] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve SOCKS on ``listeners``, or on new TCP listeners for ``host``:``port``.

    ``host=None`` listens on all interfaces; ``port=0`` picks a free port. ``task_status`` gets
    the list of listeners once accepting (use ``listeners[0].socket.getsockname()``).
    """
    if listeners is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    server = SocksServer(
        connector=connector,
        users=users,
        handshake_timeout=handshake_timeout,
        buffer_size=buffer_size,
        hooks=hooks,
    )
    await server.serve(listeners, task_status=task_status)
