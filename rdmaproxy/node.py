"""The RDMA side of a proxy: the pinned pool, peer connections and ring-backed streams.

One `RdmaNode` per process owns the device, the pinned pool (registered once), the rdma_cm
event loop, and one `PeerLink` per connected peer. A `PeerLink` owns one RC QP and a task that
dispatches its completions: control messages (SEND/RECV) and cursor updates (RDMA WRITE WITH
IMMEDIATE into our control blocks). Each stream is a `RingStream`, a trio HalfCloseableStream
whose bytes go out by RDMA WRITE into the peer's ring and come in from our own ring, so the
SOCKS relay (ingress) and the egress relay treat it like any TCP stream.

The protocol and the rules for cursors, FIN/CLOSED/RST and slot release are in docs/design.md;
the per-stream rules live in stream_state.py and are only driven from here.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from rdmaproxy import wire
from rdmaproxy.errors import ProtocolViolation
from rdmaproxy.pool import CTRL_BLOCK_SIZE, CTRL_PEER_TAIL_OFFSET, PinnedPool
from rdmaproxy.registry import Registry, StreamRow
from rdmaproxy.ring import ReceiverRing, SenderRing
from rdmaproxy.send_window import SendQueueFull, SendWindow
from rdmaproxy.socks.codec import BoundAddress, Destination, Socks5Reply
from rdmaproxy.socks.server import (
    ClientAddress,
    ConnectFailed,
    DirectTCPConnector,
    OpenedLeg,
    Relay,
    SpliceSocketError,
    abort_stream,
)
from rdmaproxy.stream_state import (
    LocalReset,
    PeerClosed,
    PeerFin,
    PeerOpened,
    PeerRefused,
    PeerReset,
    Role,
    SendClosed,
    SendFin,
    SendOpened,
    SendRefused,
    SendReset,
)
from rdmaproxy.verbs._native import NativeLayoutError
from rdmaproxy.verbs._pyverbs import pv
from rdmaproxy.verbs.cm import ConnectionManager, ConnectionRequest, RCConnection
from rdmaproxy.verbs.cq import AsyncCompletionQueue, CompletionError
from rdmaproxy.verbs.device import VerbsDevice
from rdmaproxy.verbs.poster import ThreadedPoster
from rdmaproxy.verbs.qp import (
    ReceiveSlots,
    RegisteredBuffer,
    SendQueue,
    SendSlots,
    create_rc_qp,
    register_memory,
)

if TYPE_CHECKING:
    from rdmaproxy.config import ServeConfig

log = logging.getLogger("rdmaproxy.node")

CTRL_SEND_SLOTS = 256
RECV_DEPTH = 512
SEND_DEPTH = 1024
#: Registered staging memory per peer link: socket reads land here, RDMA WRITEs leave from here.
STAGING_BYTES = 4 * 1024 * 1024
MIN_STAGING_CHUNKS = 8
#: At most this many send requests in a row go unsignaled (send_window.py).
SIGNAL_EVERY = 16
#: Chunks one splice_from_socket call may move before letting other tasks run.
SPLICE_BUDGET = 4
#: 8-byte slots for tail values not yet posted (see post_tail): as many as the send window
#: lets be outstanding, so a slot is never rewritten before the request that names it is
#: posted, even when a poster thread (--post-thread) posts it some time after it was queued.
TAIL_SCRATCH_SLOTS = SEND_DEPTH
RECV_WR_BASE = 1 << 62  # receive wr_ids; send wr_ids are sequence numbers far below it
_U64 = struct.Struct("<Q")


def _call_soon(token: trio.lowlevel.TrioToken, fn: Any, *args: Any) -> None:
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        pass


def _fmt(address: tuple[str, int]) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


class PeerGone(Exception):
    pass


class RingStream(trio.abc.HalfCloseableStream):
    """One stream's leg on this node, as a trio stream over the two rings.

    Besides the trio stream API (which copies), it splices with a TCP socket without a Python
    ``bytes`` in between: `splice_from_socket` reads the socket straight into registered
    staging memory and RDMA-writes it from there; `splice_to_socket` writes to the socket
    straight from the ring in the pinned pool. The relays use these (socks/server.py Relay).
    """

    def __init__(self, link: PeerLink, row: StreamRow) -> None:
        self.link = link
        self.row = row
        self.slot = row.slot
        node = link.node
        self.ring_offset = node.registry.allocator.ring_offset(self.slot)
        self.ctrl_offset = node.registry.allocator.ctrl_offset(self.slot)
        self.recv_ring = ReceiverRing(node.config.ring_size)
        self.send_ring = SenderRing(link.remote.ring_size)
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._socket_waits: set[trio.CancelScope] = set()
        self.asked_tail = False  # a DATA_WANT_TAIL is outstanding
        self._eager_fd: int | None = None  # socket of a splice_to_socket parked on our ring
        self._eager_count = 0  # bytes _deliver_eagerly wrote that the splice has not reported
        self.opened = trio.Event()
        self.refused_code: int | None = None
        self.broken: str | None = None  # reason once reset or lost
        self._send_lock = trio.StrictFIFOLock()
        node.pool_view[self.ctrl_offset : self.ctrl_offset + CTRL_BLOCK_SIZE] = bytes(
            CTRL_BLOCK_SIZE
        )

    # -- events from the link's dispatcher ----------------------------------------------------
    def peer_data(self, nbytes: int, want_tail: bool) -> None:
        """The peer wrote ``nbytes`` at our head (a DATA completion)."""
        self.recv_ring.set_head(self.recv_ring.head + nbytes, want_tail=want_tail)
        if want_tail:
            self._maybe_send_tail()
        if not self._deliver_eagerly():
            self._recv_lot.unpark_all()

    def peer_tail(self) -> None:
        pool_view = self.link.node.pool_view
        tail = _U64.unpack_from(pool_view, self.ctrl_offset + CTRL_PEER_TAIL_OFFSET)[0]
        self.send_ring.update_peer_tail(tail)
        self.asked_tail = False
        self._send_lot.unpark_all()

    def peer_fin(self, final_head: int) -> None:
        self.recv_ring.set_fin(final_head)
        self.row.machine.handle(PeerFin())
        self._recv_lot.unpark_all()

    def break_(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()
        for scope in self._socket_waits:
            scope.cancel()

    async def _wait_socket(self, wait: Any, sock: trio.socket.SocketType) -> None:
        """``wait(sock)`` (readable/writable), cut short when the stream breaks."""
        with trio.CancelScope() as scope:
            self._socket_waits.add(scope)
            try:
                await wait(sock)
            finally:
                self._socket_waits.discard(scope)
        if self.broken is not None:
            raise trio.BrokenResourceError(f"stream reset: {self.broken}")

    # -- sending ------------------------------------------------------------------------------
    def _check_sendable(self) -> None:
        if self.broken is not None:
            raise trio.BrokenResourceError(f"stream reset: {self.broken}")
        if not self.row.machine.can_send_data:
            raise trio.ClosedResourceError("stream's sending side is closed")

    async def _wait_ring_space(self, pending: int | None = None) -> None:
        """Until the peer's ring has room for the next WRITE (SenderRing.may_write)."""
        while True:
            self._check_sendable()
            if self.send_ring.may_write(self.link.chunk_size, pending):
                return
            if not self.asked_tail:  # never wait for space without having asked for it
                self.link.post_data(self, None, 0)
            await self._send_lot.park()

    def _writable_now(self) -> int:
        """Bytes the next WRITE may carry: one chunk, contiguous in the peer's ring."""
        return self.send_ring.writable_spans(self.link.chunk_size)[0].length

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        async with self._send_lock:
            while view:
                await self._wait_ring_space(len(view))
                chunk = await self.link.take_staging()
                try:
                    self._check_sendable()
                    n = min(len(view), self._writable_now())
                    self.link.staging_chunk(chunk)[:n] = view[:n]
                except BaseException:
                    self.link.give_back_staging(chunk)
                    raise
                self.link.post_data(self, chunk, n)
                view = view[n:]
        await trio.lowlevel.checkpoint()

    async def splice_from_socket(self, sock: trio.socket.SocketType) -> int:
        """Move what ``sock`` has into the peer's ring; 0 at the socket's EOF.

        Waits for a chunk of room in the peer's ring first (SenderRing.may_write; backpressure:
        a full ring leaves the socket unread, and no WRITE goes into a sliver of room), then
        reads chunk after chunk while the socket has data, up to SPLICE_BUDGET chunks per call
        so other streams get their turn. Socket failures raise SpliceSocketError; stream
        failures BrokenResourceError.
        """
        fd = sock.fileno()
        link = self.link
        moved = 0
        async with self._send_lock:
            while True:
                await self._wait_ring_space()
                chunk = await link.take_staging()
                with link.batch():  # the writes of this call: one doorbell
                    n = self._read_into_staging(fd, chunk)
                    if n is not None:
                        moved = n
                        # more while the socket fills whole chunks and nothing needs waiting for
                        budget = SPLICE_BUDGET - 1
                        while (budget and n == link.chunk_size and link.staging_free
                               and self.send_ring.may_write(link.chunk_size)):
                            budget -= 1
                            n = self._read_into_staging(fd, link.staging_free.pop())
                            if not n:
                                break
                            moved += n
                        break
                await self._wait_socket(trio.lowlevel.wait_readable, sock)
        await trio.lowlevel.checkpoint()
        return moved

    def _read_into_staging(self, fd: int, chunk: int) -> int | None:
        """Read the socket into staging ``chunk`` and post it; None if the socket had nothing.

        The chunk is given back unless a WRITE now holds it.
        """
        handed_over = False
        try:
            self._check_sendable()
            n = os.readv(fd, [self.link.staging_chunk(chunk)[: self._writable_now()]])
            if n:
                handed_over = True  # post_data owns the chunk now (and gives it back on failure)
                self.link.post_data(self, chunk, n)
            return n
        except BlockingIOError:
            return None
        except OSError as exc:
            raise SpliceSocketError(f"reading the socket: {exc}") from exc
        finally:
            if not handed_over:
                self.link.give_back_staging(chunk)

    async def wait_send_all_might_not_block(self) -> None:
        while self.send_ring.free == 0 and self.broken is None:
            await self._send_lot.park()

    async def send_eof(self) -> None:
        async with self._send_lock:
            if self.row.machine.fin_sent:
                return
            self._check_sendable()
            self.link.post_ctrl(wire.Fin(slot=self._peer_slot(), final_head=self.send_ring.head))
            self.row.machine.handle(SendFin())
        await trio.lowlevel.checkpoint()

    # -- receiving ----------------------------------------------------------------------------
    def _ring_views(self, max_bytes: int | None) -> list[memoryview]:
        pool_view = self.link.node.pool_view
        base = self.ring_offset
        return [pool_view[base + span.offset : base + span.offset + span.length]
                for span in self.recv_ring.readable_spans(max_bytes)]

    def _consumed(self, n: int) -> None:
        self.recv_ring.consume(n)
        self.row.record_delivered(n)
        self._after_drain()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            if self.broken is not None:
                raise trio.BrokenResourceError(f"stream reset: {self.broken}")
            if self.recv_ring.readable:
                views = self._ring_views(max_bytes)
                data = b"".join(views)
                for view in views:
                    view.release()
                self._consumed(len(data))
                await trio.lowlevel.checkpoint()
                return data
            if self.recv_ring.fin_received:
                self._after_drain()
                await trio.lowlevel.checkpoint()
                return b""
            await self._recv_lot.park()

    async def splice_to_socket(self, sock: trio.socket.SocketType) -> int:
        """Write what the ring holds to ``sock`` straight from the pool; 0 after the peer's FIN.

        While this waits for data, the dispatcher writes newly arrived data to ``sock`` itself
        (`_deliver_eagerly`), which saves waking this task per chunk; those bytes are counted
        in what the next call returns. Socket failures raise SpliceSocketError; stream
        failures BrokenResourceError.
        """
        fd = sock.fileno()
        while True:
            if self.broken is not None:
                raise trio.BrokenResourceError(f"stream reset: {self.broken}")
            if self.recv_ring.readable:
                try:
                    n = self._write_ring_to(fd)
                except BlockingIOError:
                    await self._wait_socket(trio.lowlevel.wait_writable, sock)
                    continue
                except OSError as exc:
                    raise SpliceSocketError(f"writing the socket: {exc}") from exc
                self._consumed(n)
                n += self._take_eager_count()
                if self.recv_ring.readable:  # more is waiting: let other tasks run first
                    await trio.lowlevel.checkpoint()
                return n  # else the next call parks, which lets them run
            if self._eager_count:
                return self._take_eager_count()
            if self.recv_ring.fin_received:
                self._after_drain()
                await trio.lowlevel.checkpoint()
                return 0
            self._eager_fd = fd
            try:
                await self._recv_lot.park()
            finally:
                self._eager_fd = None

    def _write_ring_to(self, fd: int) -> int:
        """One ``writev`` of everything readable, straight from the pool; OSError as raised."""
        views = self._ring_views(None)
        try:
            return os.writev(fd, views)
        finally:
            for view in views:
                view.release()

    def _take_eager_count(self) -> int:
        n, self._eager_count = self._eager_count, 0
        return n

    def _deliver_eagerly(self) -> bool:
        """Write new ring data to the parked splice's socket now; True if all of it went.

        Only while `splice_to_socket` is parked on an empty ring (so nobody else writes that
        socket); anything the socket does not take, or any error, is left to that task.
        """
        fd = self._eager_fd
        if fd is None or self.broken is not None:
            return False
        try:
            n = self._write_ring_to(fd)
        except OSError:
            return False
        self._consumed(n)
        self._eager_count += n
        return not self.recv_ring.readable

    def _after_drain(self) -> None:
        if self.recv_ring.fully_drained and self.row.machine.shutdown_write_pending:
            self._send_tail()
            self.link.post_ctrl(wire.Closed(slot=self._peer_slot()))
            self.row.machine.handle(SendClosed())
            self.link.node.release(self)
        else:
            self._maybe_send_tail()

    def _maybe_send_tail(self) -> None:
        if self.recv_ring.tail_update_due() and self.row.peer_slot is not None:
            self._send_tail()

    def _send_tail(self) -> None:
        self.link.post_tail(self, self.recv_ring.mark_tail_sent())

    # -- closing ------------------------------------------------------------------------------
    def _peer_slot(self) -> int:
        if self.row.peer_slot is None:
            raise trio.BrokenResourceError("stream is not open")
        return self.row.peer_slot

    async def aclose(self) -> None:
        machine = self.row.machine
        if self.broken is None and not (machine.fin_sent and machine.closed_sent):
            self.reset("closed before both directions ended")
        self.link.node.release(self)
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        self.reset("aborted by the other side of the relay")
        await trio.lowlevel.checkpoint()

    def reset(self, reason: str) -> None:
        if self.broken is not None:
            return
        machine = self.row.machine
        machine.handle(LocalReset(reason))
        if machine.must_send_rst:
            self.link.post_ctrl(wire.Rst(slot=self._peer_slot()))
            machine.handle(SendReset())
        self.break_(reason)
        self.link.node.release(self)


class PeerLink:
    """One RC connection to a peer proxy, multiplexing many streams.

    Every send request goes through `_post`, which numbers it and decides whether it is
    signaled (send_window.py); what a request holds (a staging chunk, a control-message slot)
    comes back when a signaled request at or after it completes.
    """

    def __init__(self, node: RdmaNode, name: str) -> None:
        self.node = node
        self.name = name
        device = node.device
        self.cq = AsyncCompletionQueue(device, SEND_DEPTH + RECV_DEPTH)
        self.qp = create_rc_qp(device, self.cq, max_send_wr=SEND_DEPTH, max_recv_wr=RECV_DEPTH)
        self.sq = SendQueue(self.qp, batch_max=SPLICE_BUDGET * 2, poster=self._poster())
        self._batching = 0
        self.cancel_scope: trio.CancelScope | None = None
        self.window: SendWindow[int] = SendWindow(SEND_DEPTH, SIGNAL_EVERY)
        self.recvs = ReceiveSlots(device, RECV_DEPTH, wire.CTRL_MSG_MAX, RECV_WR_BASE)
        self.ctrl_out = SendSlots(device, CTRL_SEND_SLOTS, wire.CTRL_MSG_MAX)
        # chunk_size is capped at a quarter of the peer's ring once its HELLO is in (on_message):
        # four WRITEs in flight keep the pipe full while the first drains
        self.chunk_size = self.chunk_stride = node.config.chunk_size
        n_chunks = max(MIN_STAGING_CHUNKS, STAGING_BYTES // self.chunk_stride)
        self.staging = RegisteredBuffer(device, n_chunks * self.chunk_stride)
        self.scratch = RegisteredBuffer(device, 8 * TAIL_SCRATCH_SLOTS)  # tail values (inline)
        self._next_scratch = 0
        self.staging_free = list(range(n_chunks))
        self._staging_lot = trio.lowlevel.ParkingLot()
        self._opcodes = (int(pv().enums.IBV_WR_RDMA_WRITE_WITH_IMM), int(pv().enums.IBV_WR_SEND))
        self._recv_rdma_with_imm = int(pv().enums.IBV_WC_RECV_RDMA_WITH_IMM)
        self.conn: RCConnection | None = None
        self.remote: wire.Hello = wire.Hello(
            version=wire.PROTOCOL_VERSION, rkey=0, pool_addr=0, n_slots=0, ring_size=4096,
            proof=bytes(32),
        )
        self.streams: dict[int, RingStream] = {}
        # what this link posted: data WRITEs and their bytes, tail updates (rdmaproxy status)
        self.data_writes = self.data_bytes = self.tail_updates = 0
        self.ready = trio.Event()
        self.dead: str | None = None
        self.hello_done = trio.Event()
        # (nonce of the connector, nonce of the acceptor, the role whose proof we expect)
        self.nonces: tuple[bytes, bytes, wire.ProofRole] = (b"", b"", wire.ProofRole.ACCEPTOR)

    def _poster(self) -> ThreadedPoster | None:
        """A poster thread for this QP when the node posts from one (RdmaNode.post_thread);
        None (post through pyverbs) if not, or if the native layout check fails."""
        if not self.node.post_thread:
            return None
        token = trio.lowlevel.current_trio_token()
        try:
            return ThreadedPoster(
                self.qp, lambda reason: _call_soon(token, self._post_failed_later, reason))
        except NativeLayoutError as exc:
            log.warning("peer %s: posting through pyverbs, not a thread: %s", self.name, exc)
            return None

    # -- staging ------------------------------------------------------------------------------
    async def take_staging(self) -> int:
        while not self.staging_free:
            if self.dead is not None:
                raise trio.BrokenResourceError(f"peer {self.name} lost: {self.dead}")
            await self._staging_lot.park()
        return self.staging_free.pop()

    def give_back_staging(self, chunk: int) -> None:
        self.staging_free.append(chunk)
        self._staging_lot.unpark()

    def staging_chunk(self, chunk: int) -> memoryview:
        start = chunk * self.chunk_stride
        return self.staging.view[start : start + self.chunk_stride]

    # -- posting ------------------------------------------------------------------------------
    def _post(
        self, opcode: int, holds: int | None, addr: int, length: int, lkey: int, *,
        remote: tuple[int, int] | None = None, imm: int = 0, inline: bool = False,
    ) -> None:
        """Post one send request; ``holds``: staging chunk ``i`` as ``i``, ctrl slot ``j`` as
        ``-1 - j`` (given back when the request completes), or None."""
        if self.dead is not None:
            raise trio.BrokenResourceError(f"peer {self.name} lost: {self.dead}")
        short = len(self.staging_free) < SIGNAL_EVERY or len(self.ctrl_out.free) < SIGNAL_EVERY
        try:
            wr_id, signaled = self.window.post(holds, must_signal=short)
        except SendQueueFull as exc:  # staging and ctrl slots bound it far below the depth
            raise trio.BrokenResourceError(f"send queue to {self.name}: {exc}") from None
        try:
            self.sq.add(opcode, wr_id, addr, length, lkey, signaled=signaled, inline=inline,
                        imm=imm, remote=remote)  # flushes by itself when the batch is full
            if not self._batching:
                self.sq.flush()
        except Exception as exc:
            self._post_failed(exc)

    def _post_failed(self, exc: Exception) -> NoReturn:
        self._post_failed_later(str(exc))
        raise trio.BrokenResourceError(
            f"peer {self.name}: posting a work request failed: {exc}") from exc

    def _post_failed_later(self, reason: str) -> None:
        """A post failed (here, or in the poster thread): tear the link down; the connect
        loop reconnects."""
        self.fail(f"posting a work request failed: {reason}")
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Requests posted inside go to the device together, with one doorbell, at the end.

        Nothing inside may await: other tasks' requests would wait for the flush.
        """
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching:
                try:
                    self.sq.flush()
                except Exception as exc:
                    self._post_failed(exc)

    def post_data(self, stream: RingStream, chunk: int | None, n: int) -> None:
        """RDMA WRITE WITH IMMEDIATE ``n`` bytes of staging ``chunk`` at the peer's head.

        The completion's byte count tells the receiver how far its head moved (as rsocket
        does); DATA_WANT_TAIL asks for a tail update when less than a chunk stays free.
        ``chunk`` None with ``n`` 0 only asks for the tail. Takes the chunk back on failure.
        """
        ring = stream.send_ring
        peer_ring, peer_slot = stream.row.peer_ring_addr, stream.row.peer_slot
        assert peer_ring is not None and peer_slot is not None
        want_tail = ring.needs_tail(self.chunk_size, writing=n)
        kind = wire.ImmKind.DATA_WANT_TAIL if want_tail else wire.ImmKind.DATA
        addr = self.staging.address + (chunk or 0) * self.chunk_stride
        try:
            self._post(self._opcodes[0], chunk, addr, n, self.staging.lkey,
                       remote=(peer_ring + ring.head_offset, self.remote.rkey),
                       imm=wire.encode_imm(kind, peer_slot))
        except BaseException:
            if chunk is not None:
                self.give_back_staging(chunk)
            raise
        ring.advance_head(n)
        stream.row.record_sent(n)
        if n:
            self.data_writes += 1
            self.data_bytes += n
        if want_tail:
            stream.asked_tail = True

    def post_tail(self, stream: RingStream, tail: int) -> None:
        peer_slot = stream.row.peer_slot
        if peer_slot is None:
            return
        # Sent inline, so the value is copied when the request is posted, not now: each
        # request not yet posted needs its own 8 bytes (TAIL_SCRATCH_SLOTS says why enough).
        offset = 8 * self._next_scratch
        self._next_scratch = (self._next_scratch + 1) % TAIL_SCRATCH_SLOTS
        _U64.pack_into(self.scratch.view, offset, tail)
        remote = self.remote.pool_addr + CTRL_BLOCK_SIZE * peer_slot + CTRL_PEER_TAIL_OFFSET
        self._post(self._opcodes[0], None, self.scratch.address + offset, 8, self.scratch.lkey,
                   remote=(remote, self.remote.rkey),
                   imm=wire.encode_imm(wire.ImmKind.TAIL, peer_slot), inline=True)
        self.tail_updates += 1

    def post_ctrl(self, message: wire.Message) -> None:
        if self.dead is not None:
            raise trio.BrokenResourceError(f"peer {self.name} lost: {self.dead}")
        if not self.ctrl_out.free:
            raise trio.BrokenResourceError(f"control messages to {self.name} backed up")
        slot = self.ctrl_out.free.pop()
        data = message.encode()
        self.ctrl_out.fill(slot, data)
        try:
            self._post(self._opcodes[1], -1 - slot, self.ctrl_out.address(slot), len(data),
                       self.ctrl_out.mr.lkey)
        except BaseException:
            self.ctrl_out.free.append(slot)
            raise

    # -- completions --------------------------------------------------------------------------
    async def dispatch(self) -> None:
        success = pv().enums.IBV_WC_SUCCESS
        recvs = self.recvs
        while True:
            completions = await self.cq.wait(64)
            with self.batch():  # tail updates and replies from this batch: one doorbell
                for wc in completions:
                    if wc.status != success:
                        raise PeerGone(str(CompletionError(wc)))
                    wr_id = wc.wr_id
                    if recvs.owns(wr_id):
                        self._on_receive(wc)
                        recvs.post(self.qp, wr_id)
                    else:
                        self._on_send_done(wr_id)

    def _on_send_done(self, wr_id: int) -> None:
        try:
            freed = self.window.complete(wr_id)
        except ValueError as exc:
            raise PeerGone(f"send queue bookkeeping: {exc}") from None
        for token in freed:
            if token >= 0:
                self.give_back_staging(token)
            else:
                self.ctrl_out.free.append(-1 - token)

    def _on_receive(self, wc: Any) -> None:
        if wc.opcode == self._recv_rdma_with_imm:
            kind, slot = wire.decode_imm(wc.imm_data)
            stream = self.streams.get(slot)
            if stream is None:
                log.debug("peer %s: cursor update for unknown slot %d", self.name, slot)
                return
            if kind == wire.ImmKind.TAIL:
                stream.peer_tail()
            else:
                stream.peer_data(wc.byte_len, kind == wire.ImmKind.DATA_WANT_TAIL)
            return
        message = wire.decode_message(self.recvs.read(wc.wr_id, wc.byte_len))
        self.node.on_message(self, message)

    def fail(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason
        for stream in list(self.streams.values()):
            stream.break_(f"peer {self.name} lost: {reason}")
        self._staging_lot.unpark_all()

    def close(self) -> None:
        for resource in (self.sq, self.qp, self.cq, self.recvs, self.ctrl_out, self.staging,
                         self.scratch):
            try:
                resource.close()
            except Exception as exc:  # closing must go on
                log.debug("closing %s for %s: %s", type(resource).__name__, self.name, exc)
        if self.conn is not None:
            self.conn.close()


class RdmaConnector:
    """The SOCKS connector that opens streams over RDMA to a connected peer."""

    def __init__(self, node: RdmaNode) -> None:
        self.node = node

    async def connect(self, dest: Destination, client: ClientAddress) -> OpenedLeg:
        return await self.node.open_stream(dest, client)


class RdmaNode:
    def __init__(self, config: ServeConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.links: dict[str, PeerLink] = {}
        self._round_robin: Iterator[int] = itertools.count()
        self._accepted: Iterator[int] = itertools.count(1)
        self.device: Any = None
        self.pool: Any = None
        self.pool_view: memoryview = memoryview(b"")
        self.mr: Any = None
        self.cm: ConnectionManager | None = None
        self.peer_state: dict[str, str] = {}
        self._nursery: trio.Nursery | None = None
        #: Post send requests from a thread per QP (--post-thread; by default when the device
        #: copies inside post_send). Set once the device is open.
        self.post_thread = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        if config.listen is None:
            raise ValueError("an RDMA node needs --listen (its address picks the device)")
        ip, port = config.listen
        self.device = VerbsDevice.for_ip(ip)
        self.post_thread = (self.device.copies_in_post if config.post_thread is None
                            else config.post_thread)
        self.pool = PinnedPool(config.pool_size)
        self.pool_view = memoryview(self.pool.buffer)
        self.mr = register_memory(self.device, self.pool.address, self.pool.size)
        self.cm = ConnectionManager()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.cm.run)
                listener = self.cm.listen(ip, port)
                nursery.start_soon(self._accept_loop, listener)
                for peer in config.peers:
                    nursery.start_soon(self._connect_loop, peer)
                log.info("RDMA node on %s (device %s, pool %d MiB, %d rings of %d KiB, "
                         "posting from %s)", f"{ip}:{port}", self.device.name,
                         self.pool.size >> 20, self.registry.allocator.n_slots,
                         config.ring_size >> 10, "a thread" if self.post_thread else "pyverbs")
                task_status.started()
        finally:  # synchronous teardown, in the order verbs objects must be closed
            for link in list(self.links.values()):
                self._drop_link(link, "shutting down")
            self.cm.close()
            self.mr.close()
            self.pool_view.release()
            self.pool.close()
            self.device.close()

    def connector(self) -> RdmaConnector:
        return RdmaConnector(self)

    def status(self) -> dict[str, Any]:
        return {
            "device": None if self.device is None else self.device.name,
            "post_thread": self.post_thread,
            "listen": None if self.config.listen is None else _fmt(self.config.listen),
            "peers": [self._peer_status(name, state)
                      for name, state in sorted(self.peer_state.items())],
        }

    def _peer_status(self, name: str, state: str) -> dict[str, Any]:
        """One peer for `rdmaproxy status`; while its link is up, what that link has posted:
        data WRITEs, their bytes (so the mean WRITE size) and tail updates."""
        link = self.links.get(name)
        if link is None:
            return {"peer": name, "state": state, "streams": 0}
        return {"peer": name, "state": state, "streams": len(link.streams),
                "posting": "pyverbs" if link.sq.poster is None else "thread",
                "writes": link.data_writes, "bytes_written": link.data_bytes,
                "tail_updates": link.tail_updates}

    # -- connections --------------------------------------------------------------------------
    def _hello(self, link: PeerLink, nonce_c: bytes, nonce_a: bytes, role: wire.ProofRole) -> None:
        link.post_ctrl(wire.Hello(
            version=wire.PROTOCOL_VERSION, rkey=self.mr.rkey, pool_addr=self.pool.address,
            n_slots=self.registry.allocator.n_slots, ring_size=self.config.ring_size,
            proof=wire.compute_proof(self.config.secret or b"", role, nonce_c, nonce_a),
        ))

    async def _connect_loop(self, peer: tuple[str, int]) -> None:
        assert self.cm is not None and self.config.listen is not None
        name = _fmt(peer)
        delay = 0.5
        while True:
            self.peer_state[name] = "connecting"
            link = PeerLink(self, name)
            nonce = wire.make_nonce()
            try:
                link.conn = await self.cm.connect(
                    self.device, link.qp, peer, src_ip=self.config.listen[0],
                    private_data=wire.PrivateData(nonce=nonce).encode(),
                    on_qp_init=functools.partial(link.recvs.post_all, link.qp),
                    timeout=self.config.connect_timeout, ack_timeout=self.config.ack_timeout,
                )
                nonce_a = wire.decode_private_data(link.conn.remote_private_data).nonce
                delay = 0.5
                await self._serve_link(link, nonce, nonce_a, wire.ProofRole.CONNECTOR)
                log.warning("peer %s: connection lost (%s); reconnecting", name, link.dead)
            except (OSError, wire.WireError, PeerGone) as exc:
                log.warning("peer %s: %s; retrying in %.1fs", name, exc, delay)
                link.close()
            self.peer_state[name] = f"down, retry in {delay:.1f}s"
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _accept_loop(self, listener: Any) -> None:
        assert self._nursery is not None
        while True:
            request = await listener.next_request()
            self._nursery.start_soon(self._accept_one, request)

    async def _accept_one(self, request: ConnectionRequest) -> None:
        try:
            nonce_c = wire.decode_private_data(request.private_data).nonce
        except wire.WireError as exc:
            log.warning("refusing an RDMA connection: %s", exc)
            request.reject()
            return
        remote = request.remote_address
        name = f"in#{next(self._accepted)}"
        link = PeerLink(self, name if remote is None else f"{name} from {_fmt(remote)}")
        nonce_a = wire.make_nonce()
        try:
            link.conn = await request.accept(
                self.device, link.qp, private_data=wire.PrivateData(nonce=nonce_a).encode(),
                on_qp_init=lambda: link.recvs.post_all(link.qp),
                timeout=self.config.connect_timeout, ack_timeout=self.config.ack_timeout,
            )
        except OSError as exc:
            log.warning("accepting an RDMA connection failed: %s", exc)
            link.close()
            return
        await self._serve_link(link, nonce_c, nonce_a, wire.ProofRole.ACCEPTOR)

    async def _serve_link(
        self, link: PeerLink, nonce_c: bytes, nonce_a: bytes, role: wire.ProofRole
    ) -> None:
        """Run an established link until it dies; then reset its streams and release it."""
        assert link.conn is not None
        other = (wire.ProofRole.ACCEPTOR if role == wire.ProofRole.CONNECTOR
                 else wire.ProofRole.CONNECTOR)
        link.nonces = (nonce_c, nonce_a, other)
        try:
            async with trio.open_nursery() as nursery:
                link.cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._watch_disconnect, link, nursery.cancel_scope)
                nursery.start_soon(self._dispatch, link, nursery.cancel_scope)
                self._hello(link, nonce_c, nonce_a, role)
                with trio.fail_after(self.config.connect_timeout):
                    await link.hello_done.wait()
                if link.dead is not None:
                    nursery.cancel_scope.cancel()
                    return
                log.info("peer %s: up (%s)", link.name, role.value)
        except trio.TooSlowError:
            link.fail("no HELLO from the peer")
        finally:
            self._drop_link(link, link.dead or "closed")

    async def _watch_disconnect(self, link: PeerLink, scope: trio.CancelScope) -> None:
        assert link.conn is not None
        info = await link.conn.wait_disconnected()
        link.fail(f"rdma_cm {getattr(info.type, 'name', info.type)}")
        scope.cancel()

    async def _dispatch(self, link: PeerLink, scope: trio.CancelScope) -> None:
        try:
            await link.dispatch()
        except (PeerGone, ProtocolViolation, trio.BrokenResourceError) as exc:
            log.warning("peer %s: %s; dropping the connection", link.name, exc)
            link.fail(str(exc))
            scope.cancel()

    def _drop_link(self, link: PeerLink, reason: str) -> None:
        link.fail(reason)
        if self.links.get(link.name) is link:
            del self.links[link.name]
            self.peer_state[link.name] = f"down: {reason}"
        for row in self.registry.peer_lost(link.name):
            log.info("stream %d to %s reset: peer lost", row.slot, row.dest)
        link.streams.clear()
        if link.conn is not None:
            link.conn.disconnect()
        link.close()

    # -- messages -----------------------------------------------------------------------------
    def on_message(self, link: PeerLink, message: wire.Message) -> None:
        if isinstance(message, wire.Hello):
            nonce_c, nonce_a, role = link.nonces
            if link.ready.is_set():
                raise wire.WireError("a second HELLO")
            if not wire.verify_proof(self.config.secret or b"", role, nonce_c, nonce_a,
                                     message.proof):
                log.warning("peer %s: wrong secret; disconnecting", link.name)
                link.fail("peer failed authentication")
            else:
                # Ready at once, in the dispatcher: an OPEN may follow in the same batch.
                link.remote = message
                link.chunk_size = min(link.chunk_stride, message.ring_size // 4)
                link.ready.set()
                self.links[link.name] = link
                self.peer_state[link.name] = "up"
            link.hello_done.set()
            return
        if not link.ready.is_set():
            raise wire.WireError(f"{type(message).__name__} before authentication")
        if isinstance(message, wire.Open):
            self._on_open(link, message)
            return
        if isinstance(message, wire.Opened | wire.Refused):
            stream = link.streams.get(message.opener_slot)
        else:
            stream = link.streams.get(message.slot)  # type: ignore[attr-defined]
        if stream is None:
            log.debug("peer %s: %s for an unknown stream", link.name, message)
            return
        machine = stream.row.machine
        if isinstance(message, wire.Opened):
            self.registry.attach_peer(stream.slot, peer_slot=message.acceptor_slot,
                                      peer_ring_addr=message.ring_addr,
                                      peer_ring_size=link.remote.ring_size,
                                      bound=(message.bound.host, message.bound.port))
            machine.handle(PeerOpened())
            if machine.must_send_rst:  # abandoned while opening: now the RST can be sent
                link.post_ctrl(wire.Rst(slot=message.acceptor_slot))
                machine.handle(SendReset())
            stream.opened.set()
        elif isinstance(message, wire.Refused):
            machine.handle(PeerRefused(message.code))
            stream.refused_code = message.code
            stream.opened.set()
            self.release(stream)
        elif isinstance(message, wire.Fin):
            stream.peer_fin(message.final_head)
        elif isinstance(message, wire.Closed):
            machine.handle(PeerClosed())
            self.release(stream)
        elif isinstance(message, wire.Rst):
            machine.handle(PeerReset())
            if machine.must_send_rst:
                link.post_ctrl(wire.Rst(slot=stream._peer_slot()))
                machine.handle(SendReset())
            stream.break_("reset by the peer")
            self.release(stream)

    def release(self, stream: RingStream) -> None:
        if self.registry.release_if_done(stream.slot):
            stream.link.streams.pop(stream.slot, None)

    # -- opening streams ----------------------------------------------------------------------
    def _pick_link(self) -> PeerLink:
        links = [link for link in self.links.values() if link.ready.is_set() and not link.dead]
        if not links:
            raise ConnectFailed(Socks5Reply.NETWORK_UNREACHABLE, "no RDMA peer is connected")
        return links[next(self._round_robin) % len(links)]

    async def open_stream(self, dest: Destination, client: ClientAddress) -> OpenedLeg:
        link = self._pick_link()
        row = self.registry.add(role=Role.INGRESS, peer=link.name, dest=(dest.host, dest.port),
                                now=time.time(), client=client)
        if row is None:
            log.warning("pool exhausted (%d rings in use): refusing %s",
                        self.registry.allocator.in_use, dest)
            raise ConnectFailed(Socks5Reply.GENERAL_FAILURE, "RDMA ring pool exhausted")
        stream = RingStream(link, row)
        link.streams[row.slot] = stream
        ring_addr = self.pool.address + stream.ring_offset
        try:
            link.post_ctrl(wire.Open(opener_slot=row.slot, ring_addr=ring_addr,
                                     dest=wire.Address(dest.host, dest.port)))
        except trio.BrokenResourceError as exc:
            stream.reset(str(exc))
            raise ConnectFailed(Socks5Reply.GENERAL_FAILURE, str(exc)) from None
        with trio.move_on_after(self.config.connect_timeout + 5):
            await stream.opened.wait()
        if stream.broken is not None and not stream.opened.is_set():
            raise ConnectFailed(Socks5Reply.GENERAL_FAILURE, stream.broken)
        if not stream.opened.is_set():
            row.machine.handle(LocalReset("no answer to OPEN"))
            stream.break_("no answer to OPEN")
            raise ConnectFailed(Socks5Reply.TTL_EXPIRED, "the egress proxy did not answer")
        if stream.refused_code is not None:
            raise ConnectFailed(Socks5Reply(stream.refused_code),
                                f"egress proxy {link.name} refused {dest}")
        bound = BoundAddress("0.0.0.0", 0) if row.bound is None else BoundAddress(*row.bound)
        return OpenedLeg(stream=stream, bound=bound, abort=stream.abort)

    def _on_open(self, link: PeerLink, message: wire.Open) -> None:
        assert self._nursery is not None
        row = self.registry.add(role=Role.EGRESS, peer=link.name,
                                dest=(message.dest.host, message.dest.port), now=time.time(),
                                peer_slot=message.opener_slot, peer_ring_addr=message.ring_addr,
                                peer_ring_size=link.remote.ring_size)
        if row is None:
            log.warning("pool exhausted: refusing stream to %s from %s", message.dest, link.name)
            link.post_ctrl(wire.Refused(opener_slot=message.opener_slot,
                                        code=int(Socks5Reply.GENERAL_FAILURE)))
            return
        stream = RingStream(link, row)
        link.streams[row.slot] = stream
        self._nursery.start_soon(self._egress, stream, message)

    async def _egress(self, stream: RingStream, message: wire.Open) -> None:
        link, row = stream.link, stream.row
        dest = message.dest
        connector = DirectTCPConnector(connect_timeout=self.config.connect_timeout)
        if dest.atyp == wire.Atyp.IPV4:
            target = Destination(dest.host, dest.port, "ipv4")
        elif dest.atyp == wire.Atyp.IPV6:
            target = Destination(dest.host, dest.port, "ipv6")
        else:
            target = Destination(dest.host, dest.port, "domain")
        try:
            leg = await connector.connect(target, ("", 0))
        except ConnectFailed as exc:
            log.info("egress to %s failed: %s", dest, exc)
            if not link.dead:
                link.post_ctrl(wire.Refused(opener_slot=message.opener_slot, code=int(exc.code)))
            row.machine.handle(SendRefused())
            self.release(stream)
            return
        tcp = leg.stream
        row.bound = (leg.bound.host, leg.bound.port)
        try:
            link.post_ctrl(wire.Opened(opener_slot=message.opener_slot, acceptor_slot=row.slot,
                                       ring_addr=self.pool.address + stream.ring_offset,
                                       bound=wire.Address(leg.bound.host, leg.bound.port)))
            row.machine.handle(SendOpened())
        except trio.BrokenResourceError:
            await abort_stream(tcp)
            return
        await relay(tcp, stream, f"egress {dest}")


async def relay(tcp: trio.abc.HalfCloseableStream, ring: RingStream, what: str) -> None:
    """Pump TCP ↔ ring until both directions end; any failure aborts both."""
    from rdmaproxy.socks.server import Direction

    pump = Relay(None, None, 2 * ring.link.chunk_size)
    graceful = False
    try:
        async with trio.open_nursery() as nursery:
            pump.cancel_scope = nursery.cancel_scope
            nursery.start_soon(pump.pump, ring, tcp, Direction.DOWNSTREAM, b"", False)
            nursery.start_soon(pump.pump, tcp, ring, Direction.UPSTREAM, b"", False)
        graceful = not pump.failures
        if pump.failures:
            log.info("%s: %s", what, pump.failures[0].exc)
    finally:
        with trio.CancelScope(shield=True):
            if graceful:
                await tcp.aclose()
                await ring.aclose()
            else:
                if ring.broken is None:
                    await ring.abort()
                await abort_stream(tcp)
