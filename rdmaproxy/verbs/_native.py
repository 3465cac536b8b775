"""Small, self-checking peeks into pyverbs 44 objects that its Python API does not expose.

pyverbs 44 gives no access to an event channel's fd, nor to which ``rdma_cm_id`` an event
belongs to (needed to route the events of several connections that share one channel), nor to
the addresses of a connecting peer. They are plain C fields at fixed offsets. Every peek here
is verified against something observable (``/proc/self/fd`` link names, the event type pyverbs
reports, the route's source being the listener's own address), so a pyverbs with another
layout fails loudly, or falls back, instead of misbehaving.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import sys
from typing import Any

# Layout of a pyverbs 44 Cython object: PyObject_HEAD (16 bytes), PyverbsObject's __weakref__ and
# logger (2 pointers), the vtable pointer that PyverbsCM/CMEvent/CMEventChannel add, then the
# object's first C field (the pointer we want).
_FIRST_FIELD_OFFSET = 40

# struct rdma_cm_event { rdma_cm_id *id; rdma_cm_id *listen_id; int event; int status; ... }
_EV_ID, _EV_LISTEN_ID, _EV_TYPE, _EV_STATUS = 0, 8, 16, 20
# struct rdma_cm_id { ibv_context *verbs; rdma_event_channel *channel; void *context;
#                     ibv_qp *qp; struct rdma_route route; ... }; the route starts with
# struct rdma_addr { union { ...; sockaddr_storage src_storage; };
#                    union { ...; sockaddr_storage dst_storage; }; ... }
_ID_CHANNEL = 8
_ID_SRC_ADDR = 32
_ID_DST_ADDR = _ID_SRC_ADDR + 128  # sizeof(struct sockaddr_storage)


class NativeLayoutError(RuntimeError):
    """pyverbs' object layout is not the one this module was written for."""


def _pointer_at(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


def first_c_pointer(obj: Any) -> int:
    """The first C field (a pointer) of a pyverbs CMID/CMEvent/CMEventChannel object."""
    return _pointer_at(id(obj) + _FIRST_FIELD_OFFSET)


def fd_link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def open_fds() -> set[int]:
    """Open fds, leaving out the transient one listdir itself used (its link is gone by now)."""
    return {int(name) for name in os.listdir("/proc/self/fd") if fd_link(int(name))}


def new_fd_matching(before: set[int], marker: str) -> int:
    """The one fd opened since ``before`` whose /proc link contains ``marker``."""
    fresh = [fd for fd in open_fds() - before if marker in fd_link(fd)]
    if len(fresh) != 1:
        raise NativeLayoutError(f"expected exactly one new {marker!r} fd, found {fresh}")
    return fresh[0]


def set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def event_channel_fd(channel: Any) -> int:
    """The fd of a pyverbs CMEventChannel: struct rdma_event_channel { int fd; }.

    Checked against /proc: it must be an open character device (``/dev/infiniband/rdma_cm``).
    """
    pointer = first_c_pointer(channel)
    if not pointer:
        raise NativeLayoutError("CMEventChannel holds no rdma_event_channel")
    fd = ctypes.c_int.from_address(pointer).value
    link = fd_link(fd)
    if "rdma_cm" not in link:
        raise NativeLayoutError(f"rdma_event_channel fd {fd} is {link or 'not open'!r}")
    return fd


def cm_id_pointer(cmid: Any) -> int:
    """The ``rdma_cm_id *`` of a pyverbs CMID (0 once closed)."""
    return first_c_pointer(cmid)


def cm_id_channel_pointer(cm_id: int) -> int:
    return _pointer_at(cm_id + _ID_CHANNEL)


def parse_sockaddr(raw: bytes) -> tuple[str, int] | None:
    """(host, port) of a ``struct sockaddr_in``/``sockaddr_in6`` in ``raw``; None for any
    other family."""
    if len(raw) < 28:
        return None
    family = int.from_bytes(raw[0:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return None


def cm_id_addresses(cm_id: int) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """(source, destination) addresses of an ``rdma_cm_id``'s route; the caller checks the
    source against what it knows before it trusts the destination."""
    if not cm_id:
        return None, None
    return (parse_sockaddr(ctypes.string_at(cm_id + _ID_SRC_ADDR, 28)),
            parse_sockaddr(ctypes.string_at(cm_id + _ID_DST_ADDR, 28)))


class RawEvent:
    """The routing fields of a pending ``rdma_cm_event``, read before it is acked."""

    __slots__ = ("cm_id", "event_type", "listen_id", "status")

    def __init__(self, event: Any) -> None:
        pointer = first_c_pointer(event)
        if not pointer:
            raise NativeLayoutError("CMEvent holds no rdma_cm_event")
        self.event_type: int = ctypes.c_int.from_address(pointer + _EV_TYPE).value
        if self.event_type != event.event_type:
            raise NativeLayoutError(
                f"rdma_cm_event layout mismatch: type {self.event_type} != {event.event_type}"
            )
        self.cm_id: int = _pointer_at(pointer + _EV_ID)
        self.listen_id: int = _pointer_at(pointer + _EV_LISTEN_ID)
        self.status: int = ctypes.c_int.from_address(pointer + _EV_STATUS).value
