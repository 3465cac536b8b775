"""The trio SOCKS server over real TCP on loopback, with real SOCKS clients (python-socks)."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from python_socks import ProxyError, ProxyType
from python_socks.async_.trio.v2 import Proxy
from python_socks.sync import Proxy as SyncProxy

from rdmaproxy.socks.codec import BoundAddress, Destination, Socks5Reply
from rdmaproxy.socks.server import (
    ConnectFailed,
    Direction,
    DirectTCPConnector,
    OpenedLeg,
    SocksServer,
    abort_stream,
    classify_connect_error,
    serve_socks,
)
from rdmaproxy.socks.users import UserTable

TIMEOUT = 2.0  # every test body runs under this
USERS = UserTable.from_plain({"alice": "wonderland"})

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6_loopback()


# --------------------------------------------------------------------------- fixtures


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo until EOF, then send EOF back."""
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


@asynccontextmanager
async def tcp_server(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """Run ``handler`` for each connection on ``host``; yield the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=host))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def socks_server(**kwargs: Any) -> AsyncIterator[int]:
    """Run serve_socks on 127.0.0.1 (DirectTCPConnector unless given); yield its port."""
    kwargs.setdefault("connector", DirectTCPConnector(connect_timeout=1.0))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve_socks(
                host="127.0.0.1", port=0, task_status=task_status, **kwargs
            )
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def echo_and_proxy(**kwargs: Any) -> AsyncIterator[tuple[int, int]]:
    async with tcp_server(echo_handler) as echo_port, socks_server(**kwargs) as proxy_port:
        yield echo_port, proxy_port


def free_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def via_proxy(
    proxy_port: int,
    host: str,
    port: int,
    proxy_type: ProxyType = ProxyType.SOCKS5,
    *,
    rdns: bool | None = None,
    username: str | None = None,
    password: str | None = None,
) -> trio.SocketStream:
    proxy = Proxy(proxy_type, "127.0.0.1", proxy_port, username, password, rdns=rdns)
    wrapped = await proxy.connect(host, port, timeout=TIMEOUT)
    stream = wrapped.trio_stream
    assert isinstance(stream, trio.SocketStream)
    return stream


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


async def roundtrip(stream: trio.SocketStream, payload: bytes = b"hello, proxy") -> None:
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        assert await receive_all(stream) == payload


async def raw_connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        if not data:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


async def assert_closed_by_server(stream: trio.SocketStream) -> None:
    """The server ends the connection: EOF (FIN) or reset."""
    try:
        assert await receive_all(stream) == b""
    except trio.BrokenResourceError:
        pass


def s5_connect(host: str, port: int, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0, 1)) + socket.inet_aton(host) + struct.pack(">H", port)


# --------------------------------------------------------------------------- CONNECT successes


async def test_socks5_noauth_ipv4() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy() as (echo, proxy):
            await roundtrip(await via_proxy(proxy, "127.0.0.1", echo))


async def test_socks5_userpass_right_password() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy(users=USERS) as (echo, proxy):
            stream = await via_proxy(
                proxy, "127.0.0.1", echo, username="alice", password="wonderland"
            )
            await roundtrip(stream)


async def test_socks5_userpass_wrong_password_then_server_still_serves() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy(users=USERS) as (echo, proxy):
            with pytest.raises(ProxyError, match="authentication failure"):
                await via_proxy(proxy, "127.0.0.1", echo, username="alice", password="nope")
            with pytest.raises(ProxyError, match="authentication failure"):
                await via_proxy(proxy, "127.0.0.1", echo, username="bob", password="wonderland")
            with pytest.raises(ProxyError, match="No acceptable authentication methods"):
                await via_proxy(proxy, "127.0.0.1", echo)  # offers only "no auth"
            stream = await via_proxy(
                proxy, "127.0.0.1", echo, username="alice", password="wonderland"
            )
            await roundtrip(stream)


async def test_userpass_raw_failure_reply_then_close() -> None:
    with trio.fail_after(TIMEOUT):
        async with socks_server(users=USERS) as proxy:
            stream = await raw_connect(proxy)
            await stream.send_all(b"\x05\x01\x02")
            assert await receive_exactly(stream, 2) == b"\x05\x02"
            await stream.send_all(b"\x01\x05alice\x03bad")
            assert await receive_exactly(stream, 2) == b"\x01\x01"
            await assert_closed_by_server(stream)


async def test_socks4() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy() as (echo, proxy):
            await roundtrip(await via_proxy(proxy, "127.0.0.1", echo, ProxyType.SOCKS4))


async def test_socks4a_hostname() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy() as (echo, proxy):
            stream = await via_proxy(proxy, "localhost", echo, ProxyType.SOCKS4, rdns=True)
            await roundtrip(stream)


async def test_socks4_rejected_when_auth_required() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy(users=USERS) as (echo, proxy):
            with pytest.raises(ProxyError) as info:
                await via_proxy(proxy, "127.0.0.1", echo, ProxyType.SOCKS4)
            assert info.value.error_code == 0x5B


async def test_socks5_domain_name() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy() as (echo, proxy):
            await roundtrip(await via_proxy(proxy, "localhost", echo, rdns=True))


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
async def test_socks5_ipv6_destination() -> None:
    with trio.fail_after(TIMEOUT):
        async with tcp_server(echo_handler, "::1") as echo, socks_server() as proxy:
            stream = await via_proxy(proxy, "::1", echo)
            await roundtrip(stream)


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
async def test_ipv6_bound_address_in_reply() -> None:
    with trio.fail_after(TIMEOUT):
        async with tcp_server(echo_handler, "::1") as echo, socks_server() as proxy:
            stream = await raw_connect(proxy)
            await stream.send_all(
                b"\x05\x01\x00\x05\x01\x00\x04"
                + socket.inet_pton(socket.AF_INET6, "::1")
                + struct.pack(">H", echo)
            )
            reply = await receive_exactly(stream, 2 + 22)
            assert reply[:6] == b"\x05\x00\x05\x00\x00\x04"
            assert socket.inet_ntop(socket.AF_INET6, reply[6:22]) == "::1"
            await roundtrip(stream)


async def test_socks5_userpass_sync_client_in_thread() -> None:
    """python-socks' blocking client, run in a worker thread."""
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy(users=USERS) as (echo, proxy):

            def client() -> bytes:
                p = SyncProxy(ProxyType.SOCKS5, "127.0.0.1", proxy, "alice", "wonderland")
                sock = p.connect("127.0.0.1", echo, timeout=TIMEOUT)
                with sock:
                    sock.settimeout(TIMEOUT)
                    sock.sendall(b"sync hello")
                    sock.shutdown(socket.SHUT_WR)
                    chunks = []
                    while data := sock.recv(65536):
                        chunks.append(data)
                return b"".join(chunks)

            assert await trio.to_thread.run_sync(client) == b"sync hello"


async def test_success_reply_carries_egress_address() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy() as (echo, proxy):
            stream = await raw_connect(proxy)
            await stream.send_all(b"\x05\x01\x00" + s5_connect("127.0.0.1", echo))
            reply = await receive_exactly(stream, 12)
            assert reply[:6] == b"\x05\x00\x05\x00\x00\x01"
            assert reply[6:10] == socket.inet_aton("127.0.0.1")
            assert struct.unpack(">H", reply[10:12])[0] not in (0, echo)
            await roundtrip(stream)


async def test_pipelined_payload_before_reply_is_forwarded() -> None:
    """Greeting, request and payload in one write, before reading any reply."""
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy() as (echo, proxy):
            stream = await raw_connect(proxy)
            await stream.send_all(b"\x05\x01\x00" + s5_connect("127.0.0.1", echo) + b"early")
            await stream.send_eof()
            data = await receive_all(stream)
            assert data[:2] == b"\x05\x00" and data[2:4] == b"\x05\x00"
            assert data[12:] == b"early"


# --------------------------------------------------------------------------- CONNECT failures


async def test_refused_port_is_0x05() -> None:
    with trio.fail_after(TIMEOUT):
        async with socks_server() as proxy:
            with pytest.raises(ProxyError) as info:
                await via_proxy(proxy, "127.0.0.1", free_port())
            assert info.value.error_code == Socks5Reply.CONNECTION_REFUSED


async def test_refused_port_socks4_is_0x5b() -> None:
    with trio.fail_after(TIMEOUT):
        async with socks_server() as proxy:
            with pytest.raises(ProxyError) as info:
                await via_proxy(proxy, "127.0.0.1", free_port(), ProxyType.SOCKS4)
            assert info.value.error_code == 0x5B


async def test_unresolvable_host_is_0x04() -> None:
    with trio.fail_after(TIMEOUT):
        async with socks_server() as proxy:
            with pytest.raises(ProxyError) as info:
                await via_proxy(proxy, "nonexistent.invalid", 80, rdns=True)
            assert info.value.error_code == Socks5Reply.HOST_UNREACHABLE


async def test_bind_is_0x07() -> None:
    with trio.fail_after(TIMEOUT):
        async with socks_server() as proxy:
            stream = await raw_connect(proxy)
            await stream.send_all(b"\x05\x01\x00")
            assert await receive_exactly(stream, 2) == b"\x05\x00"
            await stream.send_all(s5_connect("127.0.0.1", 80, cmd=2))
            assert await receive_exactly(stream, 10) == b"\x05\x07\x00\x01" + bytes(6)
            await assert_closed_by_server(stream)


async def test_udp_associate_is_0x07() -> None:
    with trio.fail_after(TIMEOUT):
        async with socks_server() as proxy:
            stream = await raw_connect(proxy)
            await stream.send_all(b"\x05\x01\x00" + s5_connect("0.0.0.0", 0, cmd=3))
            assert await receive_exactly(stream, 12) == b"\x05\x00\x05\x07\x00\x01" + bytes(6)
            await assert_closed_by_server(stream)


async def test_socks4_bind_is_0x5b() -> None:
    with trio.fail_after(TIMEOUT):
        async with socks_server() as proxy:
            stream = await raw_connect(proxy)
            await stream.send_all(b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00")
            assert await receive_exactly(stream, 8) == b"\x00\x5b" + bytes(6)
            await assert_closed_by_server(stream)


@pytest.mark.parametrize(
    ("garbage", "reply"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b""),
        (b"\x05\x01\x00\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x01"),
        (b"\x05\x01\x00\x05\x01\x00\x09", b"\x05\x00\x05\x08"),
        (b"\x05\x01\x80", b"\x05\xff"),
        (os.urandom(4096), None),
    ],
)
async def test_garbage_gets_reply_and_close_and_server_keeps_serving(
    garbage: bytes, reply: bytes | None
) -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy() as (echo, proxy):
            stream = await raw_connect(proxy)
            await stream.send_all(garbage)
            try:
                data = await receive_all(stream)
            except trio.BrokenResourceError:
                data = None
            if reply is not None:
                assert data is not None and data.startswith(reply)
            await stream.aclose()
            await roundtrip(await via_proxy(proxy, "127.0.0.1", echo))


async def test_stalled_handshake_is_dropped() -> None:
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy(handshake_timeout=0.3) as (echo, proxy):
            start = trio.current_time()
            stalled = await raw_connect(proxy)
            await stalled.send_all(b"\x05\x01")  # incomplete greeting, then nothing
            await assert_closed_by_server(stalled)
            assert 0.25 < trio.current_time() - start < 1.5
            # A client that completed the greeting but stalls before its request, too.
            stalled = await raw_connect(proxy)
            await stalled.send_all(b"\x05\x01\x00")
            assert await receive_exactly(stalled, 2) == b"\x05\x00"
            await assert_closed_by_server(stalled)
            await roundtrip(await via_proxy(proxy, "127.0.0.1", echo))


@attrs.define
class _FailingConnector:
    exc: Exception

    async def connect(self, dest: Destination, client: tuple[str, int]) -> OpenedLeg:
        raise self.exc


async def test_connector_failures_become_replies() -> None:
    with trio.fail_after(TIMEOUT):
        connector = _FailingConnector(ConnectFailed(Socks5Reply.NOT_ALLOWED, "ruleset"))
        async with socks_server(connector=connector) as proxy:
            with pytest.raises(ProxyError) as info:
                await via_proxy(proxy, "192.0.2.1", 80)
            assert info.value.error_code == Socks5Reply.NOT_ALLOWED
            connector.exc = RuntimeError("bug in a connector")
            with pytest.raises(ProxyError) as info:
                await via_proxy(proxy, "192.0.2.1", 80)
            assert info.value.error_code == Socks5Reply.GENERAL_FAILURE


# --------------------------------------------------------------------------- relay semantics


async def test_one_mib_transfer_intact() -> None:
    payload = os.urandom(1 << 20)
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy(buffer_size=16384) as (echo, proxy):
            stream = await via_proxy(proxy, "127.0.0.1", echo)
            received = b""

            async def reader() -> None:
                nonlocal received
                received = await receive_all(stream)

            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for i in range(0, len(payload), 50_000):
                    await stream.send_all(payload[i : i + 50_000])
                await stream.send_eof()
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_half_close_from_client() -> None:
    """Client sends, shuts down writing, and still reads the whole echo."""
    payload = os.urandom(300_000)
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy() as (echo, proxy):
            stream = await via_proxy(proxy, "127.0.0.1", echo)
            async with stream, trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(payload)
                    stream.socket.shutdown(socket.SHUT_WR)

                nursery.start_soon(send)
                assert await receive_all(stream) == payload


async def test_half_close_from_remote_first() -> None:
    """The destination sends a banner and EOF; the client keeps sending afterwards."""
    payload = os.urandom(200_000)
    got = trio.Event()
    digest: list[bytes] = []

    async def banner_then_sink(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"banner")
            await stream.send_eof()
            digest.append(hashlib.sha256(await receive_all(stream)).digest())
            got.set()

    with trio.fail_after(TIMEOUT):
        async with tcp_server(banner_then_sink) as dest, socks_server() as proxy:
            stream = await via_proxy(proxy, "127.0.0.1", dest)
            async with stream:
                assert await receive_all(stream) == b"banner"  # EOF arrived
                await stream.send_all(payload)  # the other direction still flows
                await stream.send_eof()
                await got.wait()
                assert digest == [hashlib.sha256(payload).digest()]


async def test_reset_by_remote_resets_client() -> None:
    async def read_then_reset(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(100) == b"ping"
        await abort_stream(stream)

    with trio.fail_after(TIMEOUT):
        async with tcp_server(read_then_reset) as dest, socks_server() as proxy:
            stream = await via_proxy(proxy, "127.0.0.1", dest)
            async with stream:
                await stream.send_all(b"ping")
                with pytest.raises(trio.BrokenResourceError) as info:
                    await receive_all(stream)
                assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_reset_by_client_resets_remote() -> None:
    received = trio.Event()
    outcome: list[BaseException | bytes] = []
    done = trio.Event()

    async def read_and_wait(stream: trio.SocketStream) -> None:
        async with stream:
            assert await stream.receive_some(100) == b"ping"
            received.set()
            try:
                outcome.append(await stream.receive_some(100))
            except trio.BrokenResourceError as exc:
                outcome.append(exc)
            done.set()

    with trio.fail_after(TIMEOUT):
        async with tcp_server(read_and_wait) as dest, socks_server() as proxy:
            stream = await via_proxy(proxy, "127.0.0.1", dest)
            await stream.send_all(b"ping")
            await received.wait()
            await abort_stream(stream)
            await done.wait()
            assert len(outcome) == 1
            assert isinstance(outcome[0], trio.BrokenResourceError)
            assert isinstance(outcome[0].__cause__, ConnectionResetError)


@attrs.define
class RecordingHooks:
    opened: list[tuple[tuple[str, int], Destination]] = attrs.Factory(list)
    counts: dict[Direction, int] = attrs.Factory(lambda: dict.fromkeys(Direction, 0))
    closed: list[int] = attrs.Factory(list)
    _send: trio.MemorySendChannel[int] = attrs.field(init=False)
    receive_closed: trio.MemoryReceiveChannel[int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self.receive_closed = trio.open_memory_channel[int](10)

    def on_open(self, client: tuple[str, int], dest: Destination) -> int:
        self.opened.append((client, dest))
        return len(self.opened)

    def on_bytes(self, handle: int, direction: Direction, n: int) -> None:
        assert handle == len(self.opened)
        self.counts[direction] += n

    def on_close(self, handle: int) -> None:
        self.closed.append(handle)
        self._send.send_nowait(handle)


async def test_hooks_see_open_bytes_close() -> None:
    hooks = RecordingHooks()
    with trio.fail_after(TIMEOUT):
        async with echo_and_proxy(hooks=hooks) as (echo, proxy):
            stream = await via_proxy(proxy, "127.0.0.1", echo)
            client_addr = stream.socket.getsockname()[:2]
            await roundtrip(stream, b"x" * 1000)
            assert await hooks.receive_closed.receive() == 1
            # Refused connects are registered and unregistered, too.
            with pytest.raises(ProxyError):
                await via_proxy(proxy, "127.0.0.1", free_port())
            assert await hooks.receive_closed.receive() == 2
    assert hooks.opened[0] == (tuple(client_addr), Destination("127.0.0.1", echo, "ipv4"))
    assert hooks.counts == {Direction.UPSTREAM: 1000, Direction.DOWNSTREAM: 1000}
    assert hooks.closed == [1, 2]


# --------------------------------------------------------------------------- server plumbing


async def test_serve_on_given_listeners_and_handle_client_never_raises() -> None:
    with trio.fail_after(TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server = SocksServer(connector=DirectTCPConnector(), handshake_timeout=0.5)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            port = listeners[0].socket.getsockname()[1]
            stream = await raw_connect(port)
            await abort_stream(stream)  # reset during the handshake
            stream = await raw_connect(port)
            await stream.send_all(b"\x05")
            await abort_stream(stream)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()


def test_server_validates_config() -> None:
    with pytest.raises(ValueError):
        SocksServer(connector=DirectTCPConnector(), buffer_size=0)
    with pytest.raises(ValueError):
        SocksServer(connector=DirectTCPConnector(), handshake_timeout=0)


# --------------------------------------------------------------------------- DirectTCPConnector


async def test_direct_connector_timeout_is_ttl_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    async def hang(*args: object, **kwargs: object) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(trio, "open_tcp_stream", hang)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConnectFailed) as info:
            await DirectTCPConnector(connect_timeout=0.05).connect(
                Destination("192.0.2.1", 80, "ipv4"), ("127.0.0.1", 1)
            )
    assert info.value.code is Socks5Reply.TTL_EXPIRED


async def test_direct_connector_bound_address() -> None:
    with trio.fail_after(TIMEOUT):
        async with tcp_server(echo_handler) as echo:
            leg = await DirectTCPConnector().connect(
                Destination("127.0.0.1", echo, "ipv4"), ("127.0.0.1", 1)
            )
            async with leg.stream:
                assert isinstance(leg.stream, trio.SocketStream)
                assert leg.bound == BoundAddress.from_sockaddr(leg.stream.socket.getsockname())


async def test_direct_connector_invalid_idna_name() -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConnectFailed) as info:
            await DirectTCPConnector().connect(
                Destination("a" * 64 + ".example", 80, "domain"), ("127.0.0.1", 1)
            )
    assert info.value.code is Socks5Reply.HOST_UNREACHABLE


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (_oserror(errno.ECONNREFUSED), Socks5Reply.CONNECTION_REFUSED),
        (_oserror(errno.ENETUNREACH), Socks5Reply.NETWORK_UNREACHABLE),
        (_oserror(errno.EHOSTUNREACH), Socks5Reply.HOST_UNREACHABLE),
        (_oserror(errno.ETIMEDOUT), Socks5Reply.TTL_EXPIRED),
        (_oserror(errno.EPERM), Socks5Reply.NOT_ALLOWED),
        (_oserror(errno.EADDRNOTAVAIL), Socks5Reply.GENERAL_FAILURE),
        (OSError("no errno"), Socks5Reply.GENERAL_FAILURE),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), 0x04),
    ],
)
def test_classify_connect_error(exc: OSError, code: int) -> None:
    assert classify_connect_error(exc)[0] == code


def test_classify_connect_error_picks_most_telling_of_several_addresses() -> None:
    outer = OSError("all attempts to connect to localhost:1 failed")
    outer.__cause__ = ExceptionGroup(
        "x", [_oserror(errno.EADDRNOTAVAIL), _oserror(errno.ECONNREFUSED)]
    )
    code, message = classify_connect_error(outer)
    assert code is Socks5Reply.CONNECTION_REFUSED
    assert message == os.strerror(errno.ECONNREFUSED)


# trio's own conformance test for half-closeable streams, applied to the stream a SOCKS client
# gets: (client socket through the proxy, destination socket) must behave like a TCP pair.
async def test_proxied_pair_passes_trio_half_closeable_stream_checks() -> None:
    with trio.fail_after(10):
        async with socks_server() as proxy:

            async def make_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
                listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
                async with listener:
                    port = listener.socket.getsockname()[1]
                    async with trio.open_nursery() as nursery:
                        accepted: list[trio.SocketStream] = []

                        async def accept() -> None:
                            accepted.append(await listener.accept())

                        nursery.start_soon(accept)
                        client = await via_proxy(proxy, "127.0.0.1", port)
                return client, accepted[0]

            await trio.testing.check_half_closeable_stream(make_pair, None)
