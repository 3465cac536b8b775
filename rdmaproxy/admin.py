"""The local admin socket of a running proxy, and its client (``rdmaproxy status``).

Protocol (AF_UNIX stream socket, one request per connection): the client sends
``status\\n``; the server answers with one JSON document followed by ``\\n`` and closes. An
unknown command is answered with ``{"error": "..."}``.

Ownership of a socket path is decided by an exclusive ``flock`` on ``<socket>.lock`` held for
the proxy's lifetime: a second proxy given the same path fails with `AdminSocketInUse`
instead of stealing it; a socket file left behind by a proxy that died (nothing listens on
it) is *stale* and is replaced. On shutdown the socket and lock files are removed.

The socket is created mode 0600 (owner only): status shows client and destination
addresses. Its directory is created (0755) when missing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, NoReturn

import trio

from rdmaproxy.errors import RdmaproxyError

__all__ = [
    "STATUS_COMMAND",
    "AdminError",
    "AdminSocket",
    "AdminSocketInUse",
    "ProxyNotRunning",
    "StaleSocket",
    "discover_sockets",
    "lock_path_for",
    "probe_socket",
    "query_status",
]

log = logging.getLogger("rdmaproxy.admin")

STATUS_COMMAND: Final = b"status\n"
#: How long the server waits for a request line and for the client to take the answer.
REQUEST_TIMEOUT: Final = 5.0
MAX_REQUEST: Final = 256
DEFAULT_QUERY_TIMEOUT: Final = 5.0

StatusProvider = Callable[[], Mapping[str, Any]]


class AdminError(RdmaproxyError):
    """A status query failed; the message names the socket and the reason."""


class ProxyNotRunning(AdminError):
    """No socket file at the path."""


class StaleSocket(ProxyNotRunning):
    """The socket file exists but nothing listens on it (its proxy died)."""


class AdminSocketInUse(RdmaproxyError):
    """Another live proxy owns the admin socket path."""


def lock_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


# --------------------------------------------------------------------------- client side


def probe_socket(path: Path, timeout: float = 1.0) -> bool:
    """True if something accepts connections on the Unix socket ``path``.

    False when the file is missing or refuses (stale); PermissionError and other OSErrors
    propagate (a live socket of another user answers EACCES).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                return False
            raise
    return True


def query_status(path: Path | str, timeout: float = DEFAULT_QUERY_TIMEOUT) -> dict[str, Any]:
    """Ask the proxy at ``path`` for its status document (blocking; `AdminError` on failure)."""
    name = os.fspath(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(name)
        except FileNotFoundError:
            raise ProxyNotRunning(f"{name}: no such socket (is the proxy running?)") from None
        except ConnectionRefusedError:
            raise StaleSocket(
                f"{name}: stale socket, no proxy is listening (it died without cleaning up)"
            ) from None
        except PermissionError:
            raise AdminError(
                f"{name}: permission denied (the proxy runs as another user: try sudo)"
            ) from None
        except TimeoutError:
            raise AdminError(f"{name}: no answer within {timeout:g} s") from None
        except OSError as exc:
            raise AdminError(f"{name}: cannot connect: {exc.strerror or exc}") from None
        chunks: list[bytes] = []
        try:
            s.sendall(STATUS_COMMAND)
            while data := s.recv(1 << 16):
                chunks.append(data)
        except TimeoutError:
            raise AdminError(f"{name}: no complete answer within {timeout:g} s") from None
        except OSError as exc:
            raise AdminError(f"{name}: connection failed: {exc.strerror or exc}") from None
    raw = b"".join(chunks)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise AdminError(f"{name}: the answer is not JSON ({exc}); is this an rdmaproxy?") from None
    if not isinstance(doc, dict):
        raise AdminError(f"{name}: the answer is not a JSON object")
    if "error" in doc:
        raise AdminError(f"{name}: the proxy answered: {doc['error']}")
    return doc


def discover_sockets(
    run_dirs: Iterable[Path], *, on_stale: Callable[[Path], None] | None = None
) -> list[Path]:
    """Admin sockets (``*.sock``) in ``run_dirs`` with a live listener, in name order.

    Missing or unreadable directories are skipped. A socket nothing listens on is skipped and
    reported to ``on_stale``. Sockets that refuse us (another user's proxy) count as live:
    querying them explains the problem.
    """
    found: list[Path] = []
    for run_dir in run_dirs:
        try:
            entries = sorted(run_dir.glob("*.sock"))
        except OSError:
            continue
        for path in entries:
            try:
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    continue
                live = probe_socket(path)
            except FileNotFoundError:
                continue
            except OSError:
                live = True
            if live:
                if path not in found:
                    found.append(path)
            elif on_stale is not None:
                on_stale(path)
    return found


# --------------------------------------------------------------------------- server side


def _acquire_lock(lock_path: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock_path``, or None if someone else holds it.

    The file may be unlinked by its previous owner between our open and flock; we then hold a
    lock on a file no one else will see, so check that the path still names the locked inode.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            on_path = os.stat(lock_path)
        except FileNotFoundError:
            os.close(fd)
            continue
        held = os.fstat(fd)
        if (on_path.st_dev, on_path.st_ino) != (held.st_dev, held.st_ino):
            os.close(fd)
            continue
        return fd


def _prepare_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise AdminError(
            f"cannot create the admin socket directory {directory}: {exc.strerror or exc} "
            "(choose another with --admin-socket or RDMAPROXY_RUN_DIR)"
        ) from None
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise AdminError(f"admin socket directory {directory} is not a directory")
    if st.st_uid not in (os.getuid(), 0):
        raise AdminError(
            f"admin socket directory {directory} belongs to uid {st.st_uid}, not to you or "
            "root; refusing to use it (choose another with --admin-socket or RDMAPROXY_RUN_DIR)"
        )


def _other_owner(path: Path) -> str:
    """Best-effort description of the proxy holding ``path``."""
    try:
        doc = query_status(path, timeout=1.0)
    except AdminError:
        return "another rdmaproxy"
    return f"another rdmaproxy ({doc.get('name', '?')}, pid {doc.get('pid', '?')})"


class AdminSocket:
    """The bound admin socket of this process. Use `open` (a context manager)."""

    def __init__(self, path: Path, sock: socket.socket, lock_fd: int) -> None:
        self.path = path
        self._sock: socket.socket | None = sock
        self._lock_fd: int | None = lock_fd
        st = os.stat(path)
        self._inode = (st.st_dev, st.st_ino)

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: Path) -> Iterator[AdminSocket]:
        """Create the socket at ``path`` (replacing a stale one), yield it, remove it after."""
        admin = cls.bind(path)
        try:
            yield admin
        finally:
            admin.close()

    @classmethod
    def bind(cls, path: Path) -> AdminSocket:
        """Take ownership of ``path`` and listen on it; `close` undoes it."""
        path = Path(os.path.abspath(path))
        _prepare_dir(path.parent)
        lock_path = lock_path_for(path)
        try:
            lock_fd = _acquire_lock(lock_path)
        except OSError as exc:
            raise AdminError(f"cannot lock {lock_path}: {exc.strerror or exc}") from None
        if lock_fd is None:
            raise AdminSocketInUse(
                f"{_other_owner(path)} already serves the admin socket {path}; stop it or give "
                "this proxy another --name or --admin-socket"
            )
        try:
            sock = cls._bind_socket(path)
        except BaseException:
            with contextlib.suppress(OSError):
                lock_path.unlink()
            os.close(lock_fd)
            raise
        return cls(path, sock, lock_fd)

    @staticmethod
    def _bind_socket(path: Path) -> socket.socket:
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise AdminError(
                    f"admin socket path {path} exists and is not a socket; remove it or choose "
                    "another --admin-socket"
                )
            try:
                live = probe_socket(path)
            except OSError:
                live = True
            if live:  # a proxy that does not hold the lock (cannot happen between us)
                raise AdminSocketInUse(
                    f"{_other_owner(path)} already serves the admin socket {path}; stop it or "
                    "give this proxy another --name or --admin-socket"
                )
            log.info("replacing stale admin socket %s", path)
            path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise AdminError(
                f"cannot create the admin socket {path}: {exc.strerror or exc}"
            ) from None
        finally:
            os.umask(old_umask)
        return sock

    async def serve(
        self,
        status: StatusProvider,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Answer requests forever (one task per connection)."""
        if self._sock is None:
            raise RuntimeError("the admin socket is closed")
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock.dup()))
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._handle, stream, status)

    async def _handle(self, stream: trio.SocketStream, status: StatusProvider) -> None:
        async with stream:
            try:
                request = b""
                with trio.move_on_after(REQUEST_TIMEOUT):
                    while b"\n" not in request and len(request) < MAX_REQUEST:
                        data = await stream.receive_some(MAX_REQUEST)
                        if not data:
                            break
                        request += data
                command = request.split(b"\n", 1)[0].strip()
                if not command:
                    return  # a probe, or a client that sent nothing
                answer: Mapping[str, Any]
                if command == b"status":
                    try:
                        answer = status()
                    except Exception as exc:
                        log.warning("admin: building the status failed", exc_info=True)
                        answer = {"error": f"building the status failed: {exc!r}"}
                else:
                    shown = command[:40].decode("utf-8", "backslashreplace")
                    answer = {"error": f"unknown command {shown!r}; the only one is 'status'"}
                payload = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await stream.send_all(payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def close(self) -> None:
        """Stop listening, remove the socket file (if it is still ours) and the lock. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                st = os.stat(self.path)
            except OSError:
                pass
            else:
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                lock_path_for(self.path).unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def closed(self) -> bool:
        return self._sock is None
