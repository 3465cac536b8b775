"""`run_proxy`: the running ``rdmaproxy serve`` process, everything in one nursery.

Start-up order (each step's failure is reported before the next begins): signal handling,
the admin socket (fails if another live proxy owns it), the SOCKS listeners (bind errors name
``--socks``), then inside the nursery the RDMA node (when ``--listen`` is given), the SOCKS
server and the admin server.

Streams: with ``--peer`` the SOCKS server hands every CONNECT to the RDMA node's connector,
which records its stream legs in the registry itself. Otherwise (a direct proxy, or an
egress-only node that also serves SOCKS) destinations are dialled over TCP from here and the
streams are recorded as *direct* rows, so ``rdmaproxy status`` shows every stream.

SIGINT/SIGTERM: stop accepting, cancel every task (open streams are aborted), remove the admin
socket, return normally (the CLI exits 0).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from rdmaproxy import __version__
from rdmaproxy.admin import AdminSocket
from rdmaproxy.config import HostPort, ServeConfig, format_hostport
from rdmaproxy.errors import RdmaproxyError
from rdmaproxy.pool import SlotAllocator
from rdmaproxy.registry import DirectRow, Endpoint, Registry
from rdmaproxy.socks.codec import Destination
from rdmaproxy.socks.server import (
    ClientAddress,
    Connector,
    Direction,
    DirectTCPConnector,
    OpenedLeg,
    serve_socks,
)
from rdmaproxy.stream_state import State

if TYPE_CHECKING:
    from rdmaproxy.node import RdmaNode  # type: ignore[import-not-found]

__all__ = [
    "DirectStreamHooks",
    "RecordingConnector",
    "RunningProxy",
    "StartupError",
    "run_proxy",
]

log = logging.getLogger("rdmaproxy")


class StartupError(RdmaproxyError):
    """The proxy could not start (the message says what and why)."""


@attrs.frozen
class RunningProxy:
    """What `run_proxy` reports once it serves (``task_status.started``)."""

    #: Bound SOCKS addresses (real ports when port 0 was asked for).
    socks: tuple[HostPort, ...]
    admin_socket: Path | None
    registry: Registry


# ------------------------------------------------------------------------ direct streams

#: The direct row of the SOCKS client task running in this context (set by ``on_open``, read
#: by `RecordingConnector` in the same task: trio gives each task its own context).
_current_row: contextvars.ContextVar[DirectRow | None] = contextvars.ContextVar(
    "rdmaproxy_direct_row", default=None
)


@attrs.define
class DirectStreamHooks:
    """StreamHooks recording each SOCKS stream the proxy dials itself as a direct row."""

    registry: Registry
    clock: Callable[[], float] = time.time

    def on_open(self, client: ClientAddress, dest: Destination) -> DirectRow:
        row = self.registry.add_direct(dest=(dest.host, dest.port), client=client, now=self.clock())
        _current_row.set(row)
        return row

    def on_bytes(self, handle: DirectRow, direction: Direction, n: int) -> None:
        if direction is Direction.UPSTREAM:
            handle.bytes_client_to_remote += n
        else:
            handle.bytes_remote_to_client += n

    def on_close(self, handle: DirectRow) -> None:
        self.registry.remove_direct(handle.id)
        if handle.state is State.OPEN:
            log.info(
                "stream %s -> %s closed after %.1f s (client->remote %d B, remote->client %d B)",
                format_hostport(handle.client) if handle.client else "-",
                format_hostport(handle.dest),
                max(0.0, self.clock() - handle.opened_at),
                handle.bytes_client_to_remote,
                handle.bytes_remote_to_client,
            )


@attrs.define
class RecordingConnector:
    """Wraps a Connector: marks the task's direct row OPEN (with its bound address)."""

    inner: Connector

    async def connect(self, dest: Destination, client: ClientAddress) -> OpenedLeg:
        leg = await self.inner.connect(dest, client)
        row = _current_row.get()
        if row is not None:
            row.state = State.OPEN
            row.bound = (leg.bound.host, leg.bound.port)
        return leg


# ---------------------------------------------------------------------------- status


def _endpoint(hp: Endpoint | None) -> dict[str, Any] | None:
    return None if hp is None else {"host": hp[0], "port": hp[1]}


@attrs.define
class _Status:
    config: ServeConfig
    registry: Registry
    started_at: float
    socks: tuple[HostPort, ...] = ()
    node: RdmaNode | None = None

    def __call__(self) -> dict[str, Any]:
        config = self.config
        node_status: dict[str, Any] | None = None
        if self.node is not None:
            try:
                node_status = dict(self.node.status())
            except Exception as exc:
                log.warning("status of the RDMA node failed", exc_info=True)
                node_status = {"error": repr(exc)}
        pool: dict[str, Any] | None = None
        if config.rdma:
            pool = (node_status or {}).get("pool") or {
                "size": config.pool_size,
                "ring_size": config.ring_size,
                "slots_total": self.registry.allocator.n_slots,
                "slots_used": self.registry.allocator.in_use,
                "slots_free": self.registry.allocator.free_count,
            }
        return {
            "name": config.name,
            "pid": os.getpid(),
            "version": __version__,
            "mode": config.mode,
            "started_at": self.started_at,
            "now": time.time(),
            "socks": [_endpoint(hp) for hp in self.socks],
            "listen": _endpoint(config.listen),
            "peers": list((node_status or {}).get("peers", [])),
            "pool": pool,
            "node": node_status,
            "totals": self.registry.totals(),
            "streams": self.registry.snapshot(now=time.time()),
        }


# ------------------------------------------------------------------------------ running


async def _open_socks_listeners(addresses: Sequence[HostPort]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    try:
        for host, port in addresses:
            try:
                listeners.extend(await trio.open_tcp_listeners(port, host=host))
            except OSError as exc:
                raise StartupError(
                    f"--socks {format_hostport((host, port))}: cannot listen: "
                    f"{exc.strerror or exc}"
                ) from None
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners


def _bound(listener: trio.SocketListener) -> HostPort:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))


async def _watch_signals(signals: AsyncIterator[int], cancel_scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        cancel_scope.cancel()
        return


def _only_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single non-Cancelled exception inside ``group`` (nested), else None."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


async def _start_node(config: ServeConfig, registry: Registry, nursery: trio.Nursery) -> RdmaNode:
    """Start the RDMA node; a failure that is not an RdmaproxyError (no pyverbs, no device
    for the address, an OSError) becomes a one-line StartupError (traceback at DEBUG)."""
    where = "-" if config.listen is None else format_hostport(config.listen)
    try:
        from rdmaproxy.node import RdmaNode  # type: ignore[import-not-found]

        node = RdmaNode(config, registry)
        await nursery.start(node.run)
    except RdmaproxyError:
        raise
    except Exception as exc:
        log.debug("the RDMA node failed to start", exc_info=True)
        raise StartupError(
            f"RDMA node on --listen {where} failed to start: {type(exc).__name__}: {exc}"
        ) from exc
    return node


async def run_proxy(
    config: ServeConfig,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[RunningProxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until cancelled or SIGINT/SIGTERM (``handle_signals``, main thread only).

    Start-up failures raise (RdmaproxyError subclasses carry a one-line message); a single
    exception from inside the nursery is re-raised unwrapped.
    """
    registry = Registry(SlotAllocator(config.pool_size, config.ring_size))
    status = _Status(config, registry, started_at=time.time())
    with contextlib.ExitStack() as stack:
        signals = None
        if handle_signals:
            signals = stack.enter_context(trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM))
        admin: AdminSocket | None = None
        if config.admin_socket is not None:
            # In a thread: finding out who owns a busy socket means querying it (blocking).
            admin = await trio.to_thread.run_sync(AdminSocket.bind, config.admin_socket)
            stack.callback(admin.close)
        listeners = await _open_socks_listeners(config.socks)
        status.socks = tuple(_bound(listener) for listener in listeners)
        try:
            async with trio.open_nursery() as nursery:
                if signals is not None:
                    nursery.start_soon(_watch_signals, signals, nursery.cancel_scope)
                connector: Connector
                hooks: DirectStreamHooks | None = None
                if config.rdma:
                    status.node = await _start_node(config, registry, nursery)
                if status.node is not None and config.peers:
                    connector = status.node.connector()
                else:
                    hooks = DirectStreamHooks(registry)
                    connector = RecordingConnector(
                        DirectTCPConnector(connect_timeout=config.connect_timeout)
                    )
                if listeners:
                    await nursery.start(
                        functools.partial(
                            serve_socks,
                            connector,
                            listeners=listeners,
                            users=config.users,
                            handshake_timeout=config.handshake_timeout,
                            hooks=hooks,
                        )
                    )
                    for hp in status.socks:
                        log.info(
                            "SOCKS on %s (%s%s)",
                            format_hostport(hp),
                            "via RDMA peers" if hooks is None else "direct TCP",
                            ", username/password required" if config.users else "",
                        )
                if admin is not None:
                    await nursery.start(admin.serve, status)
                    log.info("admin socket %s", admin.path)
                log.info("rdmaproxy %s %s (pid %d) ready", config.name, config.mode, os.getpid())
                task_status.started(
                    RunningProxy(
                        socks=status.socks,
                        admin_socket=None if admin is None else admin.path,
                        registry=registry,
                    )
                )
        except BaseExceptionGroup as group:
            leaf = _only_leaf(group)
            if leaf is not None:
                raise leaf from None
            raise
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
    log.info("rdmaproxy %s stopped", config.name)
