"""`run_proxy` in direct mode (no RDMA): in process, and as a real ``rdmaproxy serve``.

The subprocess tests run ``python -m rdmaproxy serve --socks 127.0.0.1:0`` with
RDMAPROXY_RUN_DIR pointing at a temporary directory, carry SOCKS5 streams (python-socks, curl)
to a local TCP server, read them back with ``rdmaproxy status`` and stop it with signals.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from python_socks import ProxyType
from python_socks.async_.trio.v2 import Proxy
from python_socks.sync import Proxy as SyncProxy

from rdmaproxy.admin import AdminSocketInUse, query_status
from rdmaproxy.app import RunningProxy, StartupError, run_proxy
from rdmaproxy.config import RUN_DIR_ENV, ServeConfig
from rdmaproxy.socks.codec import BoundAddress, Destination
from rdmaproxy.socks.server import ClientAddress, OpenedLeg
from rdmaproxy.socks.users import UserTable

TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rpd-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


async def echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def proxy(config: ServeConfig) -> AsyncIterator[RunningProxy]:
    async with trio.open_nursery() as nursery:
        running: RunningProxy = await nursery.start(
            functools.partial(run_proxy, config, handle_signals=False)
        )
        yield running
        nursery.cancel_scope.cancel()


async def via(socks_port: int, port: int, **kw: Any) -> trio.SocketStream:
    p = Proxy(ProxyType.SOCKS5, "127.0.0.1", socks_port, **kw)
    wrapped = await p.connect("127.0.0.1", port, timeout=TIMEOUT)
    stream = wrapped.trio_stream
    assert isinstance(stream, trio.SocketStream)
    return stream


async def status_of(path: Path) -> dict[str, Any]:
    return await trio.to_thread.run_sync(query_status, path)


async def wait_for(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


# ------------------------------------------------------------------------- in process


async def test_direct_stream_is_recorded_and_shown(run_dir: Path) -> None:
    admin = run_dir / "p.sock"
    config = ServeConfig(socks=(("127.0.0.1", 0),), admin_socket=admin, name="p")
    with trio.fail_after(TIMEOUT):
        async with echo_server() as echo, proxy(config) as running:
            assert running.admin_socket == admin
            (host, port), = running.socks
            assert host == "127.0.0.1" and port != 0
            registry = running.registry

            doc = await status_of(admin)
            assert doc["name"] == "p" and doc["pid"] == os.getpid() and doc["mode"] == "direct"
            assert doc["socks"] == [{"host": "127.0.0.1", "port": port}]
            assert doc["listen"] is None and doc["peers"] == [] and doc["pool"] is None
            assert doc["streams"] == [] and doc["totals"]["streams"] == 0

            stream = await via(port, echo)
            await stream.send_all(b"ping!")
            assert await stream.receive_some(100) == b"ping!"
            await wait_for(lambda: registry.totals()["bytes_remote_to_client"] == 5)
            doc = await status_of(admin)
            (row,) = doc["streams"]
            assert row["role"] == "direct" and row["state"] == "OPEN" and row["slot"] is None
            assert row["dest"] == {"host": "127.0.0.1", "port": echo}
            assert row["client"]["host"] == "127.0.0.1"
            assert row["bound"]["host"] == "127.0.0.1"
            assert row["bytes_client_to_remote"] == 5 and row["bytes_remote_to_client"] == 5
            assert doc["totals"]["streams"] == 1 and doc["totals"]["direct_streams"] == 1

            await stream.aclose()
            await wait_for(lambda: registry.totals()["streams"] == 0)
            assert (await status_of(admin))["streams"] == []
    assert not admin.exists()


async def test_refused_connect_leaves_no_row(run_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    config = ServeConfig(socks=(("127.0.0.1", 0),), admin_socket=run_dir / "p.sock")
    with trio.fail_after(TIMEOUT):
        async with proxy(config) as running:
            with pytest.raises(Exception, match="refused"):
                await via(running.socks[0][1], dead_port)
            await wait_for(lambda: len(running.registry.direct_streams()) == 0)


async def test_users_are_required(run_dir: Path) -> None:
    config = ServeConfig(
        socks=(("127.0.0.1", 0),),
        users=UserTable.from_plain({"alice": "wonderland"}),
    )
    with trio.fail_after(TIMEOUT):
        async with echo_server() as echo, proxy(config) as running:
            port = running.socks[0][1]
            assert running.admin_socket is None
            with pytest.raises(Exception, match=r"(?i)auth"):
                await via(port, echo, username="alice", password="wrong")
            stream = await via(port, echo, username="alice", password="wonderland")
            async with stream:
                await stream.send_all(b"x")
                assert await stream.receive_some(10) == b"x"


async def test_busy_socks_port_is_a_startup_error(run_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        admin = run_dir / "p.sock"
        config = ServeConfig(socks=(("127.0.0.1", port),), admin_socket=admin)
        with pytest.raises(StartupError, match=rf"--socks 127.0.0.1:{port}: cannot listen"):
            await run_proxy(config, handle_signals=False)
    assert not admin.exists()


async def test_second_proxy_on_the_same_admin_socket_is_refused(run_dir: Path) -> None:
    config = ServeConfig(socks=(("127.0.0.1", 0),), admin_socket=run_dir / "p.sock", name="one")
    with trio.fail_after(TIMEOUT):
        async with proxy(config):
            with pytest.raises(AdminSocketInUse, match=r"\(one, pid \d+\)"):
                await run_proxy(config, handle_signals=False)
            assert (await status_of(run_dir / "p.sock"))["name"] == "one"


class FakeNode:
    """Stands in for rdmaproxy.node.RdmaNode (the interface run_proxy relies on)."""

    instances: list[FakeNode] = []

    def __init__(self, config: ServeConfig, registry: Any) -> None:
        self.config = config
        self.registry = registry
        self.ran = False
        self.connects: list[Destination] = []
        FakeNode.instances.append(self)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.ran = True
        task_status.started()
        await trio.sleep_forever()

    def connector(self) -> Any:
        node = self

        class Conn:
            async def connect(self, dest: Destination, client: ClientAddress) -> OpenedLeg:
                node.connects.append(dest)
                stream = await trio.open_tcp_stream(dest.host, dest.port)
                return OpenedLeg(stream=stream, bound=BoundAddress("10.99.0.2", 1))

        return Conn()

    def status(self) -> dict[str, Any]:
        return {"device": "rxe0", "peers": [{"peer": "10.99.0.2:7471", "state": "connected"}]}


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> type[FakeNode]:
    module = types.ModuleType("rdmaproxy.node")
    module.RdmaNode = FakeNode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rdmaproxy.node", module)
    FakeNode.instances.clear()
    return FakeNode


async def test_with_peers_streams_go_through_the_node(
    run_dir: Path, fake_node: type[FakeNode]
) -> None:
    config = ServeConfig(
        socks=(("127.0.0.1", 0),),
        listen=("10.99.0.1", 7471),
        peers=(("10.99.0.2", 7471),),
        secret=b"s",
        pool_size=1 << 20,
        ring_size=64 << 10,
        admin_socket=run_dir / "a.sock",
    )
    with trio.fail_after(TIMEOUT):
        async with echo_server() as echo, proxy(config) as running:
            (node,) = fake_node.instances
            assert node.ran and node.registry is running.registry
            stream = await via(running.socks[0][1], echo)
            async with stream:
                await stream.send_all(b"hi")
                assert await stream.receive_some(10) == b"hi"
            assert [d.port for d in node.connects] == [echo]
            assert running.registry.direct_streams() == []  # the node records its own rows
            doc = await status_of(run_dir / "a.sock")
    assert doc["mode"] == "rdma"
    assert doc["listen"] == {"host": "10.99.0.1", "port": 7471}
    assert doc["peers"] == [{"peer": "10.99.0.2:7471", "state": "connected"}]
    assert doc["node"]["device"] == "rxe0"
    assert doc["pool"]["size"] == 1 << 20 and doc["pool"]["slots_total"] == 15


async def test_egress_only_node_serves_socks_directly(
    run_dir: Path, fake_node: type[FakeNode]
) -> None:
    config = ServeConfig(
        socks=(("127.0.0.1", 0),), listen=("10.99.0.2", 7471), secret=b"s", pool_size=1 << 20,
        ring_size=64 << 10,
    )  # fmt: skip
    with trio.fail_after(TIMEOUT):
        async with echo_server() as echo, proxy(config) as running:
            (node,) = fake_node.instances
            stream = await via(running.socks[0][1], echo)
            async with stream:
                await wait_for(lambda: len(running.registry.direct_streams()) == 1)
            assert node.connects == []


async def test_node_startup_failure_propagates_unwrapped(
    run_dir: Path, fake_node: type[FakeNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rdmaproxy.errors import PoolError

    async def failing_run(self: FakeNode, *, task_status: Any = None) -> None:
        raise PoolError("cannot lock the pinned pool")

    monkeypatch.setattr(FakeNode, "run", failing_run)
    admin = run_dir / "a.sock"
    config = ServeConfig(listen=("10.99.0.2", 7471), secret=b"s", admin_socket=admin)
    with pytest.raises(PoolError, match="cannot lock"):
        await run_proxy(config, handle_signals=False)
    assert not admin.exists()


async def test_node_failing_with_a_foreign_error_becomes_a_startup_error(
    run_dir: Path, fake_node: type[FakeNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_run(self: FakeNode, *, task_status: Any = None) -> None:
        raise LookupError("no RDMA device has IP 10.99.0.2")

    monkeypatch.setattr(FakeNode, "run", failing_run)
    config = ServeConfig(listen=("10.99.0.2", 7471), secret=b"s")
    with pytest.raises(
        StartupError,
        match=r"^RDMA node on --listen 10.99.0.2:7471 failed to start: LookupError: no RDMA",
    ):
        await run_proxy(config, handle_signals=False)


# ------------------------------------------------------------------- real subprocess


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@contextmanager
def threaded(server: socketserver.TCPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def env_for(run_dir: Path) -> dict[str, str]:
    return os.environ | {RUN_DIR_ENV: str(run_dir), "PYTHONPATH": str(REPO)}


def rdmaproxy(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rdmaproxy", *args],
        env=env_for(run_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@contextmanager
def serve(run_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """Start ``rdmaproxy serve --socks 127.0.0.1:0 --name t ARGS``; yield it and its status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdmaproxy", "serve", "--socks", "127.0.0.1:0", "--name", "t",
         *args],
        env=env_for(run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                doc = query_status(run_dir / "t.sock")
                break
            except Exception as exc:
                if proc.poll() is not None:
                    stderr = proc.stderr.read() if proc.stderr else ""
                    raise AssertionError(f"serve exited {proc.returncode}: {stderr}") from exc
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield proc, doc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def stop(proc: subprocess.Popen[str], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def test_serve_carries_a_stream_and_status_shows_it(run_dir: Path) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    with threaded(server) as echo, serve(run_dir) as (proc, doc):
        socks_port = doc["socks"][0]["port"]
        sock = SyncProxy(ProxyType.SOCKS5, "127.0.0.1", socks_port).connect(
            "127.0.0.1", echo, timeout=TIMEOUT
        )
        with sock:
            sock.sendall(b"hello over socks")
            assert sock.recv(100) == b"hello over socks"

            def shown() -> dict[str, Any]:
                out = rdmaproxy(run_dir, "status", "--json", "--name", "t")
                assert out.returncode == 0, out.stderr
                result: dict[str, Any] = json.loads(out.stdout)
                return result

            wait_until(lambda: shown()["totals"]["bytes_remote_to_client"] == 16)
            doc = shown()
            (row,) = doc["streams"]
            assert row["role"] == "direct" and row["state"] == "OPEN"
            assert row["dest"] == {"host": "127.0.0.1", "port": echo}
            assert doc["totals"]["streams"] == 1 and doc["totals"]["bytes_client_to_remote"] == 16

            text = rdmaproxy(run_dir, "status")
            assert text.returncode == 0, text.stderr
            lines = text.stdout.splitlines()
            assert lines[0].startswith(f"== t: pid {proc.pid}, direct, up ")
            assert f"socks:   127.0.0.1:{socks_port}" in lines
            totals = "totals:  1 streams (OPEN 1); client->remote 16 B"
            assert any(line.startswith(totals) for line in lines)
            (stream_line,) = [line for line in lines if f"127.0.0.1:{echo}" in line]
            assert stream_line.split()[:5] == ["-", "direct", "-", "-", "OPEN"]

            as_list = json.loads(rdmaproxy(run_dir, "status", "--json").stdout)
            assert [d["name"] for d in as_list] == ["t"]
            assert as_list[0]["admin_socket"] == str(run_dir / "t.sock")

        wait_until(lambda: query_status(run_dir / "t.sock")["streams"] == [])
        text = rdmaproxy(run_dir, "status", "--socket", str(run_dir / "t.sock"))
        assert "(no streams)" in text.stdout and "totals:  0 streams;" in text.stdout

        code, err = stop(proc, signal.SIGTERM)
    assert code == 0, err
    assert "received SIGTERM: shutting down" in err
    assert "SOCKS5 CONNECT 127.0.0.1" in err
    assert not (run_dir / "t.sock").exists() and not (run_dir / "t.sock.lock").exists()
    out = rdmaproxy(run_dir, "status")
    assert out.returncode == 1 and "no rdmaproxy is running" in out.stderr


def test_sigint_with_an_open_stream_exits_0(run_dir: Path) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    with threaded(server) as echo, serve(run_dir, "--log-level", "warning") as (proc, doc):
        sock = SyncProxy(ProxyType.SOCKS5, "127.0.0.1", doc["socks"][0]["port"]).connect(
            "127.0.0.1", echo, timeout=TIMEOUT
        )
        with sock:
            sock.sendall(b"x")
            assert sock.recv(10) == b"x"
            code, err = stop(proc, signal.SIGINT)
            assert code == 0, err
            assert err == ""  # warning level: the INFO lines are not shown
            sock.settimeout(TIMEOUT)
            try:
                assert sock.recv(10) == b""  # the stream was torn down
            except ConnectionResetError:
                pass
    assert not (run_dir / "t.sock").exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_through_the_proxy(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("served through rdmaproxy\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None  # type: ignore[method-assign]
    with threaded(Quiet(("127.0.0.1", 0), handler)) as web, serve(run_dir) as (proc, doc):
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "5", "--noproxy", "",
             "--socks5-hostname", f"127.0.0.1:{doc['socks'][0]['port']}",
             f"http://localhost:{web}/index.html"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout == "served through rdmaproxy\n"
        code, err = stop(proc, signal.SIGTERM)
    assert code == 0
    assert f"SOCKS5 CONNECT localhost:{web}" in err
