"""Posting send requests from a thread of their own, with the GIL released.

Soft-RoCE (rxe) does all the work of an RDMA WRITE inside ``ibv_post_send``: it builds, copies
and checksums every packet, and the responder's copy into the peer's memory runs in the
softirq of the same CPU. pyverbs keeps the GIL for the whole call, so the proxy's own work
(socket reads, completions, the event loop) stops while rxe copies. `ThreadedPoster` calls the
provider's ``post_send`` through ctypes, which releases the GIL, from one thread per queue
pair: the event loop goes on filling the next chunk while rxe copies the last one. On a real
RNIC the post is a doorbell and the thread gains little, so it is on by default only for
software devices (``VerbsDevice.copies_in_post``; ``--post-thread``/``--no-post-thread``
override); docs/performance.md has the measurements.

``ibv_post_send`` is a static inline in ``<infiniband/verbs.h>``:
``qp->context->ops.post_send(qp, wr, bad_wr)``. The layouts used here (``struct ibv_qp``,
``struct ibv_context``, ``struct ibv_send_wr``, ``struct ibv_sge``) are libibverbs' public ABI.
Each pointer read is checked against something observable (the QP number pyverbs reports, the
shared object the function lies in) so another layout fails loudly at link set-up.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from rdmaproxy.verbs import _native

# struct ibv_qp { ibv_context *context; void *qp_context; ibv_pd *pd; ibv_cq *send_cq, *recv_cq;
#                 ibv_srq *srq; uint32_t handle; uint32_t qp_num; ... }
_QP_CONTEXT, _QP_NUM = 0, 52
# struct ibv_context { ibv_device *device; struct ibv_context_ops ops; ... }: post_send is the
# 26th pointer of ops (after 25 others, most of them _compat_ slots kept for the ABI)
_CTX_POST_SEND = 8 + 25 * 8


class IbvSge(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint64), ("length", ctypes.c_uint32), ("lkey", ctypes.c_uint32))


class _Rdma(ctypes.Structure):
    _fields_ = (("remote_addr", ctypes.c_uint64), ("rkey", ctypes.c_uint32))


class _Atomic(ctypes.Structure):
    _fields_ = (("remote_addr", ctypes.c_uint64), ("compare_add", ctypes.c_uint64),
                ("swap", ctypes.c_uint64), ("rkey", ctypes.c_uint32))


class _WrUnion(ctypes.Union):
    _fields_ = (("rdma", _Rdma), ("atomic", _Atomic))


class _Tail(ctypes.Union):  # qp_type (xrc) and the bind_mw/tso union: unused, sized for the ABI
    _fields_ = (("raw", ctypes.c_uint64 * 7),)


class IbvSendWr(ctypes.Structure):
    pass


IbvSendWr._fields_ = (
    ("wr_id", ctypes.c_uint64),
    ("next", ctypes.POINTER(IbvSendWr)),
    ("sg_list", ctypes.POINTER(IbvSge)),
    ("num_sge", ctypes.c_int),
    ("opcode", ctypes.c_int),
    ("send_flags", ctypes.c_uint),
    ("imm_data", ctypes.c_uint32),  # network byte order, as pyverbs' SendWR stores it
    ("wr", _WrUnion),
    ("tail", _Tail),
)
assert ctypes.sizeof(IbvSendWr) == 128, ctypes.sizeof(IbvSendWr)

_PostSend = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(IbvSendWr),
    ctypes.POINTER(ctypes.POINTER(IbvSendWr)),
)


def _mapped_file(address: int) -> str:
    """The file /proc/self/maps shows at ``address`` ("" for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else ""
    return ""


def native_post_send(qp: Any) -> tuple[int, Callable[..., int]]:
    """The ``struct ibv_qp *`` of a pyverbs QP and its provider's ``post_send``, both checked."""
    qp_pointer = _native.first_c_pointer(qp)
    if not qp_pointer:
        raise _native.NativeLayoutError("QP holds no ibv_qp")
    qp_num = ctypes.c_uint32.from_address(qp_pointer + _QP_NUM).value
    if qp_num != qp.qp_num:
        raise _native.NativeLayoutError(f"ibv_qp layout mismatch: qp_num {qp_num} != {qp.qp_num}")
    context = ctypes.c_void_p.from_address(qp_pointer + _QP_CONTEXT).value or 0
    function = ctypes.c_void_p.from_address(context + _CTX_POST_SEND).value or 0
    where = _mapped_file(function)
    if "rdmav" not in where and "libibverbs" not in where:
        raise _native.NativeLayoutError(
            f"ibv_context_ops.post_send points into {where or 'no shared object'!r}"
        )
    return qp_pointer, _PostSend(function)


Batch = list[tuple[int, int, int, int, int, int, int, "tuple[int, int] | None"]]


class ThreadedPoster:
    """Posts batches of send requests in order, from one thread, without the GIL.

    `submit` returns at once; the caller keeps every buffer a request names alive until its
    completion (as with any post) and, for inline requests, until it has been posted, which
    the send window bounds. A failed post is reported through ``on_error`` (called in the
    thread; it must hand over to the event loop) and every later batch is dropped.
    """

    def __init__(self, qp: Any, on_error: Callable[[str], None]) -> None:
        self._qp_pointer, self._post_send = native_post_send(qp)
        self._on_error = on_error
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._failed = False
        # batches handed to the thread, and posted by it (each counter has one writer)
        self._submitted = self._posted = 0
        self._bad = ctypes.POINTER(IbvSendWr)()
        self._thread = threading.Thread(target=self._run, name=f"post-qp{qp.qp_num}", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch, *, small: bool = False) -> None:
        """Post ``batch`` (in order after everything submitted before it).

        A ``small`` batch (control messages, tail updates: little for rxe to copy) is posted
        right here when the thread has nothing left to post, which saves waking it.
        """
        request = _build(batch)
        if small and self._submitted == self._posted:
            self._post(request)
            return
        self._submitted += 1
        self._queue.put(request)

    def _post(self, request: tuple[Any, Any]) -> None:
        if self._failed:
            return
        rc = self._post_send(self._qp_pointer, request[0], ctypes.byref(self._bad))
        if rc:
            self._failed = True
            self._on_error(f"ibv_post_send: {_errno_text(rc)}")

    def _run(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            self._post(request)
            self._posted += 1  # after the post: a direct one may follow it, never pass it

    def close(self) -> None:
        """Drop what is still queued and stop the thread; returns once it is gone.

        The link calls this before it destroys the QP and deregisters the memory the requests
        name; it waits for at most the one post in progress."""
        self._failed = True
        self._queue.put(None)
        self._thread.join()


def _build(batch: Batch) -> tuple[Any, Any]:
    """A linked array of ``ibv_send_wr`` for ``batch``, with the ``ibv_sge`` array it points
    into (returned too: it must live until the post)."""
    n = len(batch)
    wrs = (IbvSendWr * n)()
    sges = (IbvSge * n)()
    for i, (opcode, wr_id, addr, length, lkey, flags, imm, remote) in enumerate(batch):
        sge = sges[i]
        sge.addr, sge.length, sge.lkey = addr, length, lkey
        wr = wrs[i]
        wr.wr_id, wr.opcode, wr.send_flags, wr.imm_data = wr_id, opcode, flags, imm
        wr.num_sge = 1
        wr.sg_list = ctypes.pointer(sge)
        if remote is not None:
            wr.wr.rdma.remote_addr, wr.wr.rdma.rkey = remote
        if i + 1 < n:
            wr.next = ctypes.pointer(wrs[i + 1])
    return wrs, sges


def _errno_text(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return "unknown error"
