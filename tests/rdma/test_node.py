"""Two RDMA nodes (ingress on rxe0, egress on rxe1) in one trio process, carrying real SOCKS
clients (python-socks) to real TCP targets: integrity, half-close both ways, resets, refusal
codes, peer authentication, and a registry/pool that is empty once streams end."""

from __future__ import annotations

import hashlib
import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from python_socks import ProxyError, ProxyType
from python_socks.async_.trio.v2 import Proxy
from rxe_topology import RxePair

from rdmaproxy.config import DEFAULT_ACK_TIMEOUT, ServeConfig
from rdmaproxy.node import RdmaNode
from rdmaproxy.pool import SlotAllocator
from rdmaproxy.registry import Registry
from rdmaproxy.socks.server import serve_socks
from rdmaproxy.socks.users import UserTable
from rdmaproxy.verbs._pyverbs import pv

MiB = 1 << 20
SECRET = b"test secret"


def make_config(
    listen: tuple[str, int], peers: list[tuple[str, int]], secret: bytes,
    pool_size: int = 32 * MiB, post_thread: bool | None = True,
) -> Any:
    # 64 KiB rings: the 3 MiB echo wraps each ring ~50 times; 32 MiB holds ~500 streams
    return ServeConfig(
        listen=listen, peers=tuple(peers), pool_size=pool_size, ring_size=64 * 1024,
        secret=secret, connect_timeout=10.0, post_thread=post_thread,
    )


def make_node(config: Any) -> RdmaNode:
    return RdmaNode(config, Registry(SlotAllocator(config.pool_size, config.ring_size)))


async def wait_for_peer(node: RdmaNode, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not any(link.ready.is_set() for link in node.links.values()):
            await trio.sleep(0.05)


@asynccontextmanager
async def proxied(
    rxe: RxePair, port: int, *, ingress_pool: int = 32 * MiB, users: UserTable | None = None,
    post_thread: bool | None = True,
) -> AsyncIterator[tuple[RdmaNode, RdmaNode, int]]:
    """(ingress node, egress node, SOCKS port of the ingress)."""
    egress = make_node(make_config((rxe.b.ip, port), [], SECRET, post_thread=post_thread))
    ingress = make_node(
        make_config((rxe.a.ip, port + 1), [(rxe.b.ip, port)], SECRET, pool_size=ingress_pool,
                    post_thread=post_thread)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(egress.run)
        await nursery.start(ingress.run)
        await wait_for_peer(ingress)
        listeners = await nursery.start(
            lambda task_status: serve_socks(ingress.connector(), host="127.0.0.1", port=0,
                                            users=users, task_status=task_status)
        )
        socks_port = listeners[0].socket.getsockname()[1]
        yield ingress, egress, socks_port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tcp_target(handler: Any) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


async def socks_connect(socks_port: int, host: str, port: int, **kw: Any) -> trio.SocketStream:
    proxy = Proxy(ProxyType.SOCKS5, "127.0.0.1", socks_port, rdns=True, **kw)
    wrapped = await proxy.connect(host, port, timeout=30)
    stream = wrapped.trio_stream
    assert isinstance(stream, trio.SocketStream)
    return stream


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


async def echo_round_trip(stream: trio.SocketStream, payload: bytes, timeout: float) -> bytes:
    """Send ``payload`` and half-close while reading the echo back to EOF; what came back."""
    received = bytearray()

    async def reader() -> None:
        received.extend(await receive_all(stream))

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await stream.send_all(payload)
            await stream.send_eof()  # half-close: the echo must still come back
    return bytes(received)


async def wait_idle(*nodes: RdmaNode) -> None:
    with trio.fail_after(20):
        while any(len(n.registry) or n.registry.allocator.in_use for n in nodes):
            await trio.sleep(0.05)


@pytest.mark.parametrize("post_thread", [True, False], ids=["thread-post", "pyverbs-post"])
async def test_echo_with_half_close_and_clean_release(
    rxe_pair: RxePair, rdma_port: int, post_thread: bool
) -> None:
    payload = os.urandom(3 * MiB + 12345)  # many ring wraps
    async with proxied(rxe_pair, rdma_port, post_thread=post_thread) as (
        ingress, egress, socks_port
    ):
        async with tcp_target(echo) as target_port:
            stream = await socks_connect(socks_port, "127.0.0.1", target_port)
            received = await echo_round_trip(stream, payload, 240)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            await stream.aclose()
            await wait_idle(ingress, egress)
            assert ingress.registry.allocator.free_count == ingress.registry.allocator.n_slots


async def test_target_closes_first_while_client_keeps_sending(
    rxe_pair: RxePair, rdma_port: int
) -> None:
    greeting = os.urandom(200_000)
    upload = os.urandom(500_000)
    got_upload = trio.Event()
    uploaded = bytearray()

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(greeting)
            await stream.send_eof()  # target half-closes first
            uploaded.extend(await receive_all(stream))
            got_upload.set()

    async with proxied(rxe_pair, rdma_port) as (ingress, egress, socks_port):
        async with tcp_target(handler) as target_port:
            stream = await socks_connect(socks_port, "localhost", target_port)
            with trio.fail_after(120):
                assert await receive_all(stream) == greeting  # EOF after every byte
                await stream.send_all(upload)
                await stream.send_eof()
                await got_upload.wait()
            assert bytes(uploaded) == upload
            await stream.aclose()
            await wait_idle(ingress, egress)


@pytest.mark.parametrize("post_thread", [True, False], ids=["thread-post", "pyverbs-post"])
async def test_many_concurrent_streams(
    rxe_pair: RxePair, rdma_port: int, post_thread: bool
) -> None:
    rng = random.Random(7)
    async with proxied(rxe_pair, rdma_port, post_thread=post_thread) as (
        ingress, egress, socks_port
    ):
        async with tcp_target(echo) as target_port:

            async def one(size: int) -> None:
                data = rng.randbytes(size)
                stream = await socks_connect(socks_port, "127.0.0.1", target_port)
                async with stream, trio.open_nursery() as nursery:
                    result = bytearray()

                    async def reader() -> None:
                        result.extend(await receive_all(stream))

                    nursery.start_soon(reader)
                    await stream.send_all(data)
                    await stream.send_eof()
                assert bytes(result) == data

            with trio.fail_after(240):
                async with trio.open_nursery() as nursery:
                    for _ in range(200):
                        nursery.start_soon(one, rng.randint(0, 200_000))
            await wait_idle(ingress, egress)


async def test_accepted_peers_are_named_by_their_address(
    rxe_pair: RxePair, rdma_port: int
) -> None:
    """The egress names the link it accepted after the connecting node's address (read from
    the rdma_cm_id's route), not only `in#N`."""
    async with proxied(rxe_pair, rdma_port) as (ingress, egress, _socks_port):
        with trio.fail_after(30):
            while not egress.links:
                await trio.sleep(0.05)
        (name,) = egress.links
        assert name.startswith("in#1 from ") and f"{rxe_pair.a.ip}:" in name, name
        assert [peer["peer"] for peer in egress.status()["peers"]] == [name]
        assert list(ingress.links) == [f"{rxe_pair.b.ip}:{rdma_port}"]


async def test_links_use_the_configured_ack_timeout(rxe_pair: RxePair, rdma_port: int) -> None:
    """Both ends of a peer link carry --ack-timeout (default 16), not rdma_cm's 19 (2.1 s
    before a lost packet is re-sent)."""
    async with proxied(rxe_pair, rdma_port) as (ingress, egress, _socks_port):
        with trio.fail_after(30):
            while not egress.links:
                await trio.sleep(0.05)
        enums = pv().enums
        for node in (ingress, egress):
            (link,) = node.links.values()
            attr, _init = link.qp.query(enums.IBV_QP_TIMEOUT | enums.IBV_QP_RETRY_CNT)
            assert attr.timeout == node.config.ack_timeout == DEFAULT_ACK_TIMEOUT


async def test_software_devices_post_from_a_thread_by_default(
    rxe_pair: RxePair, rdma_port: int
) -> None:
    """Without --post-thread/--no-post-thread, links on rxe (which copies inside post_send)
    post from a thread, and `status` says so, per node and per peer."""
    async with proxied(rxe_pair, rdma_port, post_thread=None) as (ingress, egress, socks_port):
        with trio.fail_after(30):
            while not egress.links:
                await trio.sleep(0.05)
        for node in (ingress, egress):
            assert node.config.post_thread is None and node.post_thread
            (link,) = node.links.values()
            assert link.sq.poster is not None
            doc = node.status()
            assert doc["post_thread"] is True
            assert [peer["posting"] for peer in doc["peers"]] == ["thread"]
        async with tcp_target(echo) as target_port:
            stream = await socks_connect(socks_port, "127.0.0.1", target_port)
            payload = os.urandom(300_000)
            assert await echo_round_trip(stream, payload, 60) == payload
            await stream.aclose()


async def test_reset_propagates_and_codes(rxe_pair: RxePair, rdma_port: int) -> None:
    async def rude(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await stream.aclose()  # RST

    async with proxied(rxe_pair, rdma_port) as (ingress, egress, socks_port):
        async with tcp_target(rude) as target_port:
            stream = await socks_connect(socks_port, "127.0.0.1", target_port)
            await stream.send_all(b"hello")
            with trio.fail_after(60), pytest.raises(trio.BrokenResourceError):
                while await stream.receive_some(100):
                    pass
            await stream.aclose()

        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed_port = unused.getsockname()[1]
        with pytest.raises(ProxyError) as refused:
            await socks_connect(socks_port, "127.0.0.1", closed_port)
        assert refused.value.error_code == 0x05
        with pytest.raises(ProxyError) as unknown:
            await socks_connect(socks_port, "no-such-host.invalid", 80)
        assert unknown.value.error_code == 0x04
        await wait_idle(ingress, egress)


async def test_peer_with_wrong_secret_is_refused(rxe_pair: RxePair, rdma_port: int) -> None:
    egress = make_node(make_config((rxe_pair.b.ip, rdma_port), [], SECRET))
    intruder = make_node(make_config((rxe_pair.a.ip, rdma_port + 1), [(rxe_pair.b.ip, rdma_port)],
                                     b"wrong secret"))
    async with trio.open_nursery() as nursery:
        await nursery.start(egress.run)
        await nursery.start(intruder.run)
        with pytest.raises(trio.TooSlowError):
            await wait_for_peer(intruder, timeout=8)
        assert not egress.links
        nursery.cancel_scope.cancel()


async def test_pool_exhaustion_refuses_new_streams_only(rxe_pair: RxePair, rdma_port: int) -> None:
    # 256 KiB of 64 KiB rings (after the control area): 3 streams fit on the ingress
    async with proxied(rxe_pair, rdma_port, ingress_pool=256 * 1024) as (ingress, egress, port):
        assert ingress.registry.allocator.n_slots == 3
        async with tcp_target(echo) as target_port:
            held = [await socks_connect(port, "127.0.0.1", target_port) for _ in range(3)]
            with pytest.raises(ProxyError) as full:
                await socks_connect(port, "127.0.0.1", target_port)
            assert full.value.error_code == 0x01
            with trio.fail_after(60):
                for stream in held:  # the existing streams go on
                    await stream.send_all(b"still here")
                    assert await stream.receive_some(100) == b"still here"
            for stream in held:
                await stream.aclose()
            await wait_idle(ingress, egress)
            again = await socks_connect(port, "127.0.0.1", target_port)  # memory came back
            await again.aclose()
            await wait_idle(ingress, egress)


async def test_username_password_through_rdma(rxe_pair: RxePair, rdma_port: int) -> None:
    users = UserTable.from_plain({"alice": "wonderland"})
    async with proxied(rxe_pair, rdma_port, users=users) as (ingress, egress, port):
        async with tcp_target(echo) as target_port:
            with pytest.raises(ProxyError):
                await socks_connect(port, "127.0.0.1", target_port, username="alice",
                                    password="wrong")
            stream = await socks_connect(port, "127.0.0.1", target_port, username="alice",
                                         password="wonderland")
            with trio.fail_after(60):
                await stream.send_all(b"authenticated")
                assert await stream.receive_some(100) == b"authenticated"
            await stream.aclose()
            await wait_idle(ingress, egress)


async def test_peer_connection_is_re_established(rxe_pair: RxePair, rdma_port: int) -> None:
    """The ingress starts before its peer (retries with backoff), notices when the peer goes
    away, and reconnects when it comes back."""
    ingress = make_node(make_config((rxe_pair.a.ip, rdma_port + 1),
                                    [(rxe_pair.b.ip, rdma_port)], SECRET))
    async with trio.open_nursery() as nursery:
        await nursery.start(ingress.run)
        await trio.sleep(2)  # a few refused attempts first
        assert not ingress.links
        for _round in range(2):
            egress = make_node(make_config((rxe_pair.b.ip, rdma_port), [], SECRET))
            async with trio.open_nursery() as egress_nursery:
                await egress_nursery.start(egress.run)
                await wait_for_peer(ingress, timeout=60)
                egress_nursery.cancel_scope.cancel()  # the peer goes away
            with trio.fail_after(60):
                while ingress.links:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_link_dropped_for_a_protocol_violation_comes_back(
    rxe_pair: RxePair, rdma_port: int
) -> None:
    """A peer that breaks the protocol loses its connection; the ingress reconnects and new
    streams flow again."""
    async with proxied(rxe_pair, rdma_port) as (ingress, egress, socks_port):
        async with tcp_target(echo) as target_port:
            (old,) = ingress.links.values()
            (egress_side,) = egress.links.values()
            egress_side.post_ctrl(egress_side.remote)  # a second HELLO is a violation
            with trio.fail_after(60):
                while not any(link is not old and link.ready.is_set() and link.dead is None
                              for link in ingress.links.values()):
                    await trio.sleep(0.05)
            assert old.dead is not None and "second HELLO" in old.dead
            stream = await socks_connect(socks_port, "127.0.0.1", target_port)
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await receive_all(stream) == b"ping"
            await stream.aclose()
            await wait_idle(ingress, egress)
