"""The admin socket (rdmaproxy.admin): server, client, ownership and discovery."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from rdmaproxy.admin import (
    AdminError,
    AdminSocket,
    AdminSocketInUse,
    ProxyNotRunning,
    StaleSocket,
    discover_sockets,
    lock_path_for,
    probe_socket,
    query_status,
)

TIMEOUT = 5.0


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory (Unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="rpa-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def stale_socket(path: Path) -> None:
    """Leave a socket file nobody listens on (what a killed proxy leaves behind)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


@asynccontextmanager
async def serving(path: Path, doc: Any = None) -> AsyncIterator[AdminSocket]:
    status = doc if callable(doc) else (lambda: doc if doc is not None else {"name": "t"})
    with AdminSocket.open(path) as admin:
        async with trio.open_nursery() as nursery:
            await nursery.start(admin.serve, status)
            yield admin
            nursery.cancel_scope.cancel()


async def query(path: Path) -> dict[str, Any]:
    return await trio.to_thread.run_sync(query_status, path)


async def raw_request(path: Path, request: bytes) -> bytes:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(request)
            await stream.send_eof()
            out = b""
            while data := await stream.receive_some(65536):
                out += data
            return out


async def test_status_roundtrip_and_cleanup(sockdir: Path) -> None:
    path = sockdir / "sub" / "p.sock"
    doc = {"name": "p", "pid": os.getpid(), "streams": [{"slot": None, "dest": "x"}]}
    with trio.fail_after(TIMEOUT):
        async with serving(path, doc) as admin:
            assert admin.path == path
            st = path.lstat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert lock_path_for(path).exists()
            assert await query(path) == doc
            assert await query(path) == doc  # one request per connection, many connections
            raw = await raw_request(path, b"status\n")
            assert raw.endswith(b"\n") and json.loads(raw) == doc
    assert admin.closed
    assert not path.exists() and not lock_path_for(path).exists()
    admin.close()  # idempotent


async def test_unknown_command_and_failing_provider(sockdir: Path) -> None:
    path = sockdir / "p.sock"

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    with trio.fail_after(TIMEOUT):
        async with serving(path, broken):
            answer = json.loads(await raw_request(path, b"reboot\n"))
            assert "unknown command 'reboot'" in answer["error"]
            with pytest.raises(AdminError, match=r"building the status failed.*boom"):
                await query(path)
            assert await raw_request(path, b"") == b""  # a probe gets nothing, no error


async def test_second_owner_is_refused_with_the_first_ones_pid(sockdir: Path) -> None:
    path = sockdir / "p.sock"
    with trio.fail_after(TIMEOUT):
        async with serving(path, {"name": "first", "pid": 4242}):
            with pytest.raises(AdminSocketInUse, match=r"\(first, pid 4242\) already serves"):
                await trio.to_thread.run_sync(AdminSocket.bind, path)
            assert await query(path) == {"name": "first", "pid": 4242}  # untouched


async def test_live_socket_without_lock_is_not_stolen(sockdir: Path) -> None:
    path = sockdir / "p.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen(1)
    try:
        with pytest.raises(AdminSocketInUse, match="another rdmaproxy already serves"):
            AdminSocket.bind(path)
        assert path.exists()
    finally:
        other.close()


async def test_stale_socket_is_replaced(sockdir: Path) -> None:
    path = sockdir / "p.sock"
    stale_socket(path)
    lock_path_for(path).write_text("")  # a killed proxy's lock file: not locked any more
    assert not probe_socket(path)
    with trio.fail_after(TIMEOUT):
        async with serving(path, {"name": "new"}):
            assert await query(path) == {"name": "new"}
    assert not path.exists()


def test_non_socket_at_the_path_is_refused(sockdir: Path) -> None:
    path = sockdir / "p.sock"
    path.write_text("precious")
    with pytest.raises(AdminError, match="exists and is not a socket"):
        AdminSocket.bind(path)
    assert path.read_text() == "precious"
    assert not lock_path_for(path).exists()  # released and removed


def test_missing_directory_is_created_and_foreign_directory_refused(sockdir: Path) -> None:
    path = sockdir / "a" / "b" / "p.sock"
    admin = AdminSocket.bind(path)
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    finally:
        admin.close()
    not_a_dir = sockdir / "file"
    not_a_dir.write_text("")
    with pytest.raises(AdminError, match="cannot create the admin socket directory"):
        AdminSocket.bind(not_a_dir / "p.sock")


def test_close_leaves_a_replacement_alone(sockdir: Path) -> None:
    path = sockdir / "p.sock"
    admin = AdminSocket.bind(path)
    path.unlink()  # someone removed ours and put another socket there
    stale_socket(path)
    admin.close()
    assert path.exists()


def test_query_errors(sockdir: Path) -> None:
    with pytest.raises(ProxyNotRunning, match="no such socket"):
        query_status(sockdir / "missing.sock")
    stale = sockdir / "stale.sock"
    stale_socket(stale)
    with pytest.raises(StaleSocket, match="stale socket, no proxy is listening"):
        query_status(stale)
    assert issubclass(StaleSocket, ProxyNotRunning) and issubclass(ProxyNotRunning, AdminError)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"error": "nope"}\n', "the proxy answered: nope"),
    ],
)
async def test_query_bad_answers(sockdir: Path, answer: bytes, why: str) -> None:
    path = sockdir / "odd.sock"

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(100)
            await stream.send_all(answer)

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(4)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(sock)])
            with pytest.raises(AdminError, match=why):
                await query(path)
            nursery.cancel_scope.cancel()


def test_query_timeout(sockdir: Path) -> None:
    path = sockdir / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(1)  # accepts (in the backlog) but never answers
    try:
        with pytest.raises(AdminError, match=r"no complete answer within 0.2 s"):
            query_status(path, timeout=0.2)
    finally:
        mute.close()


async def test_discover_sockets(sockdir: Path) -> None:
    a, b = sockdir / "a", sockdir / "b"
    a.mkdir()
    b.mkdir()
    stale_socket(a / "dead.sock")
    (a / "notes.sock").write_text("not a socket")
    (a / "x.sock.lock").write_text("")
    stale_found: list[Path] = []
    with trio.fail_after(TIMEOUT):
        async with serving(b / "two.sock"), serving(a / "one.sock"):
            found = await trio.to_thread.run_sync(
                lambda: discover_sockets(
                    [a, b, sockdir / "missing", a], on_stale=stale_found.append
                )
            )
    assert found == [a / "one.sock", b / "two.sock"]
    assert stale_found == [a / "dead.sock", a / "dead.sock"]  # each listing reports it
    assert discover_sockets([a, b]) == []  # both gone after shutdown
