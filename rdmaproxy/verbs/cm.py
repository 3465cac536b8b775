"""Async rdma_cm for trio: listen, connect, accept, disconnect, with events dispatched from one
event channel whose fd is awaited with ``trio.lowlevel.wait_readable``.

Connections use our own RC queue pair (created on our own device context, see ``qp.py``), so the
active side moves the QP to RTR/RTS itself after CONNECT_RESPONSE and calls ``establish()``, and
the passive side moves it before ``accept()``.

pyverbs 44 facts this module is built around: events must be read before they are acked (reading
after ``ack_cm_event()`` segfaults) and an unacked event makes ``CMID.close()`` hang, so the
dispatcher reads what it needs and acks at once, never across an await; a child CMID made from
a CONNECT_REQUEST shares the listener's Context/PD wrappers, which closing the child would
break, so each child gets wrappers of its own; ``ConnParam`` needs ``data_len`` or it drops
private data.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import math
from collections.abc import Callable
from typing import Any

import attrs
import trio

from rdmaproxy.verbs import _native
from rdmaproxy.verbs._pyverbs import pv
from rdmaproxy.verbs.device import VerbsDevice

log = logging.getLogger("rdmaproxy.cm")

CONNECT_PRIVATE_DATA_MAX = 56
ACCEPT_PRIVATE_DATA_MAX = 196
RDMA_READ_DEPTH = 4
RESOLVE_TIMEOUT_MS = 2000  # per rdma_cm resolution step (as the rdma-core tools use)


class CMEventType(enum.IntEnum):
    ADDR_RESOLVED = 0
    ADDR_ERROR = 1
    ROUTE_RESOLVED = 2
    ROUTE_ERROR = 3
    CONNECT_REQUEST = 4
    CONNECT_RESPONSE = 5
    CONNECT_ERROR = 6
    UNREACHABLE = 7
    REJECTED = 8
    ESTABLISHED = 9
    DISCONNECTED = 10
    DEVICE_REMOVAL = 11
    MULTICAST_JOIN = 12
    MULTICAST_ERROR = 13
    ADDR_CHANGE = 14
    TIMEWAIT_EXIT = 15


class RDMAConnectError(ConnectionError):
    """An RDMA connection could not be made; the message says why in words."""


class RDMAConnectionRefused(RDMAConnectError):
    pass


@attrs.frozen
class CMEventInfo:
    type: CMEventType | int
    status: int
    private_data: bytes
    child: Any = None  # the new CMID of a CONNECT_REQUEST ...
    child_pointer: int = 0  # ... its rdma_cm_id pointer ...
    child_events: Any = None  # ... and the channel its own events arrive on


_PRIVATE_DATA_EVENTS = {
    CMEventType.CONNECT_REQUEST,
    CMEventType.CONNECT_RESPONSE,
    CMEventType.ESTABLISHED,
    CMEventType.REJECTED,
}


def _event_type(value: int) -> CMEventType | int:
    try:
        return CMEventType(value)
    except ValueError:
        return value


class ConnectionManager:
    """Owns one rdma_cm event channel and the task that dispatches its events to CM ids."""

    def __init__(self) -> None:
        self.channel: Any = pv().cmid.CMEventChannel()
        self.fd = _native.event_channel_fd(self.channel)
        _native.set_nonblocking(self.fd)
        self._routes: dict[int, trio.MemorySendChannel[CMEventInfo]] = {}
        self._ids: dict[int, Any] = {}  # every CMID we still have to close
        self._listeners: dict[int, Any] = {}
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------
    def _route(self, cm_id: int) -> trio.MemoryReceiveChannel[CMEventInfo]:
        send, receive = trio.open_memory_channel[CMEventInfo](math.inf)
        self._routes[cm_id] = send
        return receive

    def _unroute(self, cm_id: int) -> None:
        send = self._routes.pop(cm_id, None)
        if send is not None:
            send.close()
        self._listeners.pop(cm_id, None)

    def new_id(self) -> tuple[Any, int, trio.MemoryReceiveChannel[CMEventInfo]]:
        cmid = pv().cmid.CMID(creator=self.channel, port_space=pv().cm_enums.RDMA_PS_TCP)
        pointer = _native.cm_id_pointer(cmid)
        if _native.cm_id_channel_pointer(pointer) != _native.first_c_pointer(self.channel):
            raise _native.NativeLayoutError("rdma_cm_id does not point at our event channel")
        self._ids[pointer] = cmid
        return cmid, pointer, self._route(pointer)

    def release_id(self, cmid: Any, pointer: int) -> None:
        self._unroute(pointer)
        self._ids.pop(pointer, None)
        try:
            cmid.close()
        except pv().PyverbsError as exc:
            log.warning("closing CM id: %s", exc)

    def _read_event(self) -> tuple[int, CMEventInfo] | None:
        try:
            event = pv().cmid.CMEvent(self.channel)
        except pv().PyverbsRDMAError as exc:
            if getattr(exc, "error_code", None) in (errno.EAGAIN, errno.EWOULDBLOCK) or (
                "Resource temporarily unavailable" in str(exc)
            ):
                return None
            raise
        try:
            raw = _native.RawEvent(event)
            etype = _event_type(raw.event_type)
            data = event.private_data if etype in _PRIVATE_DATA_EVENTS else b""
            child = child_events = None
            target = raw.cm_id
            if etype == CMEventType.CONNECT_REQUEST:
                target = raw.listen_id
                listener = self._listeners.get(raw.listen_id)
                if listener is not None:
                    child = pv().cmid.CMID(creator=event, listen_id=listener)
                    # own wrappers, so that closing the child leaves the listener's intact
                    pv().device.Context(cmid=child)
                    pv().pd.PD(child)
                    child_events = self._route(raw.cm_id)
                    self._ids[raw.cm_id] = child
        finally:
            event.ack_cm_event()
        return target, CMEventInfo(etype, raw.status, data, child, raw.cm_id, child_events)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch events until cancelled."""
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            while (item := self._read_event()) is not None:
                target, info = item
                send = self._routes.get(target)
                log.debug("cm event %s status %d for id %#x", info.type, info.status, target)
                if send is None:
                    log.debug("dropping %s for an unknown CM id", info.type)
                    if info.child is not None:
                        self.release_id(info.child, info.child_pointer)
                    continue
                send.send_nowait(info)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pointer, cmid in list(self._ids.items()):
            self.release_id(cmid, pointer)
        for send in self._routes.values():
            send.close()
        self._routes.clear()
        self.channel.close()

    # -- active side ------------------------------------------------------------------------
    async def connect(
        self,
        device: VerbsDevice,
        qp: Any,
        dst: tuple[str, int],
        *,
        src_ip: str | None = None,
        private_data: bytes = b"",
        on_qp_init: Callable[[], None] | None = None,
        timeout: float = 10.0,
        ack_timeout: int | None = None,
    ) -> RCConnection:
        """Connect ``qp`` (an RC QP in RESET, on ``device``) to a listener at ``dst``.

        ``ack_timeout``: the QP's local ACK timeout exponent; None keeps rdma_cm's."""
        if len(private_data) > CONNECT_PRIVATE_DATA_MAX:
            raise ValueError(f"connect private data is limited to {CONNECT_PRIVATE_DATA_MAX} bytes")
        cmid, pointer, events = self.new_id()
        where = f"{dst[0]}:{dst[1]}"
        stage = "resolving the address"
        try:
            with trio.fail_after(timeout):
                ai = pv().cmid.AddrInfo(
                    src=src_ip, dst=dst[0], dst_service=str(dst[1]),
                    port_space=pv().cm_enums.RDMA_PS_TCP,
                )
                cmid.resolve_addr(ai, RESOLVE_TIMEOUT_MS)
                await _expect(events, CMEventType.ADDR_RESOLVED, f"resolving {where}")
                stage = "resolving the route"
                cmid.resolve_route(RESOLVE_TIMEOUT_MS)
                await _expect(events, CMEventType.ROUTE_RESOLVED, f"resolving a route to {where}")
                if cmid.dev_name != device.name:
                    raise RDMAConnectError(
                        f"{where} is reached through RDMA device {cmid.dev_name}, "
                        f"not {device.name}; bind the source address of that device"
                    )
                _modify_qp(cmid, qp, pv().enums.IBV_QPS_INIT)
                if on_qp_init is not None:
                    on_qp_init()
                stage = "waiting for the connect response"
                cmid.connect(_conn_param(qp, private_data))
                info = await _expect(events, CMEventType.CONNECT_RESPONSE, f"connecting to {where}")
                _modify_qp(cmid, qp, pv().enums.IBV_QPS_RTR)
                _modify_qp(cmid, qp, pv().enums.IBV_QPS_RTS, ack_timeout)
                cmid.establish()
        except trio.TooSlowError:
            self.release_id(cmid, pointer)
            raise RDMAConnectError(
                f"timed out after {timeout:g}s connecting to {where} ({stage})"
            ) from None
        except BaseException:
            self.release_id(cmid, pointer)
            raise
        return RCConnection(self, cmid, pointer, events, qp, info.private_data, where)

    # -- passive side -----------------------------------------------------------------------
    def listen(self, ip: str, port: int, backlog: int = 64) -> Listener:
        cmid, pointer, events = self.new_id()
        try:
            ai = pv().cmid.AddrInfo(
                src=ip, src_service=str(port), port_space=pv().cm_enums.RDMA_PS_TCP,
                flags=pv().cm_enums.RAI_PASSIVE,
            )
            cmid.bind_addr(ai)
            cmid.listen(backlog)
        except pv().PyverbsError as exc:
            self.release_id(cmid, pointer)
            raise RDMAConnectError(f"cannot listen for RDMA connections on {ip}:{port}: {exc}") \
                from exc
        self._listeners[pointer] = cmid
        return Listener(self, cmid, pointer, events, ip, port)


def _same_host(address: str, listening_on: str) -> bool:
    """Whether ``address`` is (or, for a wildcard listener, may be) ``listening_on``."""
    try:
        a, b = ipaddress.ip_address(address), ipaddress.ip_address(listening_on)
    except ValueError:
        return False
    if b.is_unspecified:
        return True
    mapped = [x.ipv4_mapped if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped else x
              for x in (a, b)]
    return mapped[0] == mapped[1]


async def _expect(
    events: trio.MemoryReceiveChannel[CMEventInfo], wanted: CMEventType, doing: str
) -> CMEventInfo:
    info = await events.receive()
    if info.type == wanted:
        return info
    if info.type == CMEventType.REJECTED:
        raise RDMAConnectionRefused(
            f"{doing}: connection rejected (status {info.status}; is an rdmaproxy listening "
            "there, and does it accept us?)"
        )
    if info.type == CMEventType.UNREACHABLE:
        raise RDMAConnectError(f"{doing}: peer unreachable (status {info.status})")
    if info.type == CMEventType.ADDR_ERROR:
        raise RDMAConnectError(
            f"{doing}: no RDMA device can reach that address (status {info.status})"
        )
    name = info.type.name if isinstance(info.type, CMEventType) else str(info.type)
    raise RDMAConnectError(f"{doing}: unexpected event {name} (status {info.status})")


def _conn_param(qp: Any, private_data: bytes) -> Any:
    param = pv().cmid.ConnParam(
        resources=RDMA_READ_DEPTH, depth=RDMA_READ_DEPTH, retry=7, rnr_retry=7,
        qp_num=qp.qp_num, data_len=len(private_data),
    )
    if private_data:
        param.set_private_data(private_data)
    return param


def _modify_qp(cmid: Any, qp: Any, state: int, ack_timeout: int | None = None) -> None:
    """Move ``qp`` to ``state`` with rdma_cm's attributes, plus ours: access flags, RNR retry
    and, when given, the local ACK timeout (exponent) instead of rdma_cm's."""
    enums = pv().enums
    attr, mask = cmid.init_qp_attr(state)
    if state == enums.IBV_QPS_INIT:
        attr.qp_access_flags = (
            enums.IBV_ACCESS_LOCAL_WRITE
            | enums.IBV_ACCESS_REMOTE_WRITE
            | enums.IBV_ACCESS_REMOTE_READ
        )
        mask |= enums.IBV_QP_ACCESS_FLAGS
    elif state == enums.IBV_QPS_RTS:
        attr.rnr_retry = 7  # an RNR (no receive posted yet) delays, it never fails the QP
        mask |= enums.IBV_QP_RNR_RETRY
        if ack_timeout is not None:
            attr.timeout = ack_timeout
            mask |= enums.IBV_QP_TIMEOUT
    qp.modify(attr, mask)


class ConnectionRequest:
    """A CONNECT_REQUEST waiting to be accepted or rejected."""

    def __init__(self, manager: ConnectionManager, listener: Listener, info: CMEventInfo) -> None:
        self.manager = manager
        self.listener = listener
        self.cmid: Any = info.child
        self.pointer: int = info.child_pointer
        self.events: trio.MemoryReceiveChannel[CMEventInfo] = info.child_events
        self.private_data = info.private_data
        self._done = False

    @property
    def device_name(self) -> str:
        name: str = self.cmid.dev_name
        return name

    @property
    def remote_address(self) -> tuple[str, int] | None:
        """The connecting peer's (host, port), read from the ``rdma_cm_id``'s route, which
        pyverbs 44 does not expose; None unless the route's source is the listener's own
        address (the check that the layout is the one expected)."""
        src, dst = _native.cm_id_addresses(self.pointer)
        if src is None or dst is None or not _same_host(src[0], self.listener.host):
            return None
        return dst

    def reject(self, private_data: bytes = b"") -> None:
        self._done = True
        try:
            self.cmid.reject(private_data or None)
        finally:
            self.manager.release_id(self.cmid, self.pointer)

    async def accept(
        self,
        device: VerbsDevice,
        qp: Any,
        *,
        private_data: bytes = b"",
        on_qp_init: Callable[[], None] | None = None,
        timeout: float = 10.0,
        ack_timeout: int | None = None,
    ) -> RCConnection:
        if len(private_data) > ACCEPT_PRIVATE_DATA_MAX:
            raise ValueError(f"accept private data is limited to {ACCEPT_PRIVATE_DATA_MAX} bytes")
        self._done = True
        where = f"from {self.listener.where}"
        try:
            if self.cmid.dev_name != device.name:
                raise RDMAConnectError(
                    f"request arrived on device {self.cmid.dev_name}, not {device.name}"
                )
            _modify_qp(self.cmid, qp, pv().enums.IBV_QPS_INIT)
            if on_qp_init is not None:
                on_qp_init()
            _modify_qp(self.cmid, qp, pv().enums.IBV_QPS_RTR)
            _modify_qp(self.cmid, qp, pv().enums.IBV_QPS_RTS, ack_timeout)
            self.cmid.accept(_conn_param(qp, private_data))
            with trio.fail_after(timeout):
                await _expect(self.events, CMEventType.ESTABLISHED, f"accepting {where}")
        except trio.TooSlowError:
            self.manager.release_id(self.cmid, self.pointer)
            raise RDMAConnectError(f"timed out after {timeout:g}s accepting {where}") from None
        except BaseException:
            self.manager.release_id(self.cmid, self.pointer)
            raise
        return RCConnection(
            self.manager, self.cmid, self.pointer, self.events, qp, self.private_data, where
        )

    def discard(self) -> None:
        if not self._done:
            self.reject()


class Listener:
    def __init__(
        self,
        manager: ConnectionManager,
        cmid: Any,
        pointer: int,
        events: trio.MemoryReceiveChannel[CMEventInfo],
        host: str,
        port: int,
    ) -> None:
        self.manager, self.cmid, self.pointer, self.events = manager, cmid, pointer, events
        self.host = host
        self.where = f"{host}:{port}"

    async def next_request(self) -> ConnectionRequest:
        while True:
            info = await self.events.receive()
            if info.type == CMEventType.CONNECT_REQUEST and info.child is not None:
                return ConnectionRequest(self.manager, self, info)
            log.debug("listener %s: ignoring event %s", self.where, info.type)

    def close(self) -> None:
        self.manager.release_id(self.cmid, self.pointer)


class RCConnection:
    """An established RC connection: our QP plus the CM id that connected it."""

    def __init__(
        self,
        manager: ConnectionManager,
        cmid: Any,
        pointer: int,
        events: trio.MemoryReceiveChannel[CMEventInfo],
        qp: Any,
        remote_private_data: bytes,
        where: str,
    ) -> None:
        self.manager, self.cmid, self.pointer, self.events = manager, cmid, pointer, events
        self.qp = qp
        self.remote_private_data = remote_private_data
        self.where = where
        self._disconnect_sent = False
        self._closed = False

    async def wait_disconnected(self) -> CMEventInfo:
        """Return when the connection ends (DISCONNECTED, DEVICE_REMOVAL, ...)."""
        async for info in self.events:
            if info.type in (
                CMEventType.DISCONNECTED,
                CMEventType.DEVICE_REMOVAL,
                CMEventType.TIMEWAIT_EXIT,
                CMEventType.CONNECT_ERROR,
            ):
                return info
        return CMEventInfo(CMEventType.DISCONNECTED, 0, b"")

    def disconnect(self) -> None:
        """Start a disconnect (non-blocking); the QP moves to the error state."""
        if self._disconnect_sent or self._closed:
            return
        self._disconnect_sent = True
        try:
            self.cmid.disconnect()
        except pv().PyverbsError as exc:
            log.debug("disconnect %s: %s", self.where, exc)

    def close(self) -> None:
        """Release the CM id (close the QP, its CQ and MRs first)."""
        if self._closed:
            return
        self._closed = True
        self.manager.release_id(self.cmid, self.pointer)
