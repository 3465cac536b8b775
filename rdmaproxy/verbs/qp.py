"""RC queue pairs, memory registration and reusable work requests.

pyverbs objects are expensive to build and ``SGE``/``SendWR``/``RecvWR`` free their C memory
only in ``close()``, so work requests are built once and reused: a provider copies a work
request into its queue inside ``post_send``/``post_recv``, so one ``SendWR`` whose scatter
entry we rewrite serves every post. ``QPInitAttr`` defaults to ``sq_sig_all=1``; we signal
selectively.
"""

from __future__ import annotations

from typing import Any

from rdmaproxy.pool import PinnedPool
from rdmaproxy.verbs._pyverbs import pv
from rdmaproxy.verbs.cq import AsyncCompletionQueue
from rdmaproxy.verbs.device import VerbsDevice
from rdmaproxy.verbs.poster import Batch, ThreadedPoster

INLINE_MAX = 64
#: A batch carrying at most this many bytes is posted by the caller itself when the poster
#: thread is idle: rxe copies it in microseconds, less than waking the thread costs.
SMALL_BATCH_BYTES = 4096


def access_all() -> int:
    e = pv().enums
    return int(e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ)


def register_memory(
    device: VerbsDevice, address: int, length: int, access: int | None = None
) -> Any:
    """Register caller-provided memory (e.g. a locked pool) as one memory region."""
    return pv().mr.MR(device.pd, length, access_all() if access is None else access,
                      address=address)


def allocate_registered(device: VerbsDevice, length: int) -> Any:
    """A small memory region whose buffer pyverbs allocates (control-message slots)."""
    return pv().mr.MR(device.pd, length, access_all())


def create_rc_qp(
    device: VerbsDevice,
    cq: AsyncCompletionQueue,
    *,
    max_send_wr: int,
    max_recv_wr: int,
    max_inline: int = INLINE_MAX,
) -> Any:
    qpm = pv().qp
    cap = qpm.QPCap(
        max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=1, max_recv_sge=1,
        max_inline_data=max_inline,
    )
    init = qpm.QPInitAttr(
        qp_type=pv().enums.IBV_QPT_RC, scq=cq.cq, rcq=cq.cq, cap=cap, sq_sig_all=0
    )
    return qpm.QP(device.pd, init)


class RegisteredBuffer:
    """Anonymous memory registered as one MR, with a writable memoryview over it.

    Sockets read into ``view`` (``os.readv``) and work requests send from ``address``: the
    payload is never a Python ``bytes`` object.
    """

    def __init__(self, device: VerbsDevice, size: int) -> None:
        self._memory = PinnedPool(size, lock=False)  # registration pins the pages itself
        self.address = self._memory.address
        self.size = size
        self.view = memoryview(self._memory.buffer)
        self.mr: Any = register_memory(device, self.address, size)
        self.lkey: int = self.mr.lkey

    def close(self) -> None:
        self.mr.close()
        self.view.release()
        self._memory.close()


class SendQueue:
    """Posts RDMA WRITE (with immediate), RDMA READ and SEND through reused work requests.

    Requests are queued with `add` and reach the device with `flush`: one ``ibv_post_send``
    (one doorbell) for up to ``batch_max`` of them. The WRs are linked once,
    ``wr[0] -> wr[1] -> ... -> wr[n-1]`` (pyverbs can set ``next_wr`` but never clear it),
    and a batch of ``k`` fills the last ``k`` and posts the chain from ``wr[n-k]``.
    """

    def __init__(self, qp: Any, batch_max: int = 8, poster: ThreadedPoster | None = None) -> None:
        wr = pv().wr
        self.qp = qp
        self.poster = poster
        self.batch_max = batch_max
        self._sges: list[Any] = [wr.SGE(0, 0, 0) for _ in range(batch_max)]
        self._wrs: list[Any] = [wr.SendWR(num_sge=1, sg=[sge]) for sge in self._sges]
        for request, sge in zip(self._wrs, self._sges, strict=True):
            # the WR's scatter entry becomes the SGE's memory: rewriting the SGE rewrites it
            request.sg_list = sge
        for request, following in zip(self._wrs, self._wrs[1:], strict=False):
            request.next_wr = following
        e = pv().enums
        self._signaled = int(e.IBV_SEND_SIGNALED)
        self._inline = int(e.IBV_SEND_INLINE)
        self._pending: Batch = []

    def add(
        self, opcode: int, wr_id: int, addr: int, length: int, lkey: int, *,
        signaled: bool, inline: bool = False, imm: int = 0,
        remote: tuple[int, int] | None = None,
    ) -> None:
        """Queue one request; a full batch is flushed at once."""
        flags = (self._signaled if signaled else 0) | (self._inline if inline else 0)
        self._pending.append((opcode, wr_id, addr, length, lkey, flags, imm, remote))
        if len(self._pending) == self.batch_max:
            self.flush()

    def flush(self) -> None:
        """Post every queued request with one ``ibv_post_send``."""
        pending = self._pending
        if not pending:
            return
        if self.poster is not None:
            small = sum(request[3] for request in pending) <= SMALL_BATCH_BYTES
            self.poster.submit(pending[:], small=small)
            pending.clear()
            return
        first = self.batch_max - len(pending)
        for i, (opcode, wr_id, addr, length, lkey, flags, imm, remote) in enumerate(pending):
            sge, wr = self._sges[first + i], self._wrs[first + i]
            sge.addr = addr
            sge.length = length
            sge.lkey = lkey
            wr.wr_id = wr_id
            wr.opcode = opcode
            wr.send_flags = flags
            wr.imm_data = imm
            if remote is not None:
                wr.set_wr_rdma(remote[1], remote[0])
        pending.clear()
        self.qp.post_send(self._wrs[first])

    def post(
        self, opcode: int, wr_id: int, addr: int, length: int, lkey: int, *,
        signaled: bool, inline: bool = False, imm: int = 0,
        remote: tuple[int, int] | None = None,
    ) -> None:
        """Post one request now (with any queued before it)."""
        self.add(opcode, wr_id, addr, length, lkey, signaled=signaled, inline=inline, imm=imm,
                 remote=remote)
        self.flush()

    def write(
        self, wr_id: int, addr: int, length: int, lkey: int, remote_addr: int, rkey: int, *,
        signaled: bool = False, inline: bool = False,
    ) -> None:
        self.post(pv().enums.IBV_WR_RDMA_WRITE, wr_id, addr, length, lkey, signaled=signaled,
                   inline=inline, remote=(remote_addr, rkey))

    def write_imm(
        self, wr_id: int, addr: int, length: int, lkey: int, remote_addr: int, rkey: int,
        imm: int, *, signaled: bool = False, inline: bool = False,
    ) -> None:
        self.post(pv().enums.IBV_WR_RDMA_WRITE_WITH_IMM, wr_id, addr, length, lkey,
                   signaled=signaled, inline=inline, imm=imm, remote=(remote_addr, rkey))

    def read(
        self, wr_id: int, addr: int, length: int, lkey: int, remote_addr: int, rkey: int, *,
        signaled: bool = True,
    ) -> None:
        self.post(pv().enums.IBV_WR_RDMA_READ, wr_id, addr, length, lkey, signaled=signaled,
                   remote=(remote_addr, rkey))

    def send(
        self, wr_id: int, addr: int, length: int, lkey: int, *, signaled: bool = True,
        inline: bool = False,
    ) -> None:
        self.post(pv().enums.IBV_WR_SEND, wr_id, addr, length, lkey, signaled=signaled,
                   inline=inline)

    def close(self) -> None:
        if self.poster is not None:
            self.poster.close()
        # Each WR's scatter list is now its SGE's memory: freeing the WR frees it (the WR's own
        # first list, 16 bytes, is left behind once per WR).
        for wr in self._wrs:
            wr.close()


class ReceiveSlots:
    """``count`` receive buffers of ``size`` bytes in one MR, each with its own RecvWR.

    ``wr_id`` of slot ``i`` is ``wr_id_base + i``.
    """

    def __init__(self, device: VerbsDevice, count: int, size: int, wr_id_base: int) -> None:
        self.count, self.size, self.wr_id_base = count, size, wr_id_base
        self.mr: Any = allocate_registered(device, count * size)
        base = self.mr.buf
        self._wrs = [
            pv().wr.RecvWR(
                wr_id=wr_id_base + i, num_sge=1,
                sg=[pv().wr.SGE(base + i * size, size, self.mr.lkey)],
            )
            for i in range(count)
        ]

    def owns(self, wr_id: int) -> bool:
        return self.wr_id_base <= wr_id < self.wr_id_base + self.count

    def post(self, qp: Any, wr_id: int) -> None:
        qp.post_recv(self._wrs[wr_id - self.wr_id_base])

    def post_all(self, qp: Any) -> None:
        for wr in self._wrs:
            qp.post_recv(wr)

    def read(self, wr_id: int, length: int) -> bytes:
        data: bytes = self.mr.read(length, (wr_id - self.wr_id_base) * self.size)
        return data

    def close(self) -> None:
        for wr in self._wrs:
            wr.close()
        self.mr.close()


class SendSlots:
    """``count`` registered send buffers of ``size`` bytes (control messages)."""

    def __init__(self, device: VerbsDevice, count: int, size: int) -> None:
        self.count, self.size = count, size
        self.mr: Any = allocate_registered(device, count * size)
        self.free = list(range(count))

    def address(self, slot: int) -> int:
        return int(self.mr.buf) + slot * self.size

    def fill(self, slot: int, data: bytes) -> None:
        self.mr.write(data, len(data), slot * self.size)

    def close(self) -> None:
        self.mr.close()
