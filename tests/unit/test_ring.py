"""Unit and property tests of rdmaproxy.ring (pure ring arithmetic)."""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmaproxy.errors import ProtocolViolation
from rdmaproxy.ring import (
    U64_MAX,
    ReceiverRing,
    SenderRing,
    Span,
    validate_ring_size,
)

# ------------------------------------------------------------------------ ring size


@pytest.mark.parametrize("size", [8, 16, 4096, 1 << 20, 1 << 31])
def test_valid_ring_sizes(size: int) -> None:
    assert validate_ring_size(size) == size
    assert SenderRing(size).free == size


@pytest.mark.parametrize("size", [0, 1, 4, 7, 12, 4095, 3 << 20, -8])
def test_invalid_ring_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        SenderRing(size)
    with pytest.raises(ValueError, match="power of two"):
        ReceiverRing(size)


def test_ring_size_must_be_int() -> None:
    with pytest.raises(ValueError, match="integer"):
        validate_ring_size(16.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer"):
        validate_ring_size(True)


def test_inconsistent_construction() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        SenderRing(16, head=10, peer_tail=11)
    with pytest.raises(ValueError, match="inconsistent"):
        SenderRing(16, head=100, peer_tail=10)
    with pytest.raises(ValueError, match="inconsistent"):
        ReceiverRing(16, head=100, tail=10)
    with pytest.raises(ValueError, match=r"2\*\*64"):
        SenderRing(16, head=2**64, peer_tail=2**64)
    with pytest.raises(ValueError, match="last_sent_tail"):
        ReceiverRing(16, head=5, tail=5, last_sent_tail=6)


# ------------------------------------------------------------------------ sender


def test_sender_spans_without_wrap() -> None:
    s = SenderRing(16)
    assert s.writable_spans() == [Span(0, 16)]
    assert s.writable_spans(5) == [(0, 5)]
    assert s.advance_head(5) == 5
    assert s.free == 11
    assert s.in_flight == 5
    assert s.writable_spans() == [Span(5, 11)]
    assert s.writable_spans(0) == []


def test_sender_spans_wrap() -> None:
    s = SenderRing(16, head=12, peer_tail=4)  # 8 in flight, writes from offset 12
    assert s.free == 8
    assert s.head_offset == 12
    assert s.writable_spans() == [Span(12, 4), Span(0, 4)]
    assert s.writable_spans(3) == [Span(12, 3)]
    assert s.writable_spans(4) == [Span(12, 4)]
    assert s.writable_spans(5) == [Span(12, 4), Span(0, 1)]


def test_sender_spans_exactly_at_end() -> None:
    s = SenderRing(16, head=16, peer_tail=16)
    assert s.writable_spans() == [Span(0, 16)]
    s = SenderRing(16, head=32, peer_tail=20)
    assert s.writable_spans() == [Span(0, 4)]


def test_sender_full_ring() -> None:
    s = SenderRing(16)
    s.advance_head(16)
    assert s.free == 0
    assert s.writable_spans() == []
    with pytest.raises(ValueError, match="exceeds free"):
        s.advance_head(1)
    assert s.update_peer_tail(10) == 10
    assert s.writable_spans() == [Span(0, 10)]


def test_sender_advance_rejects_negative_and_bad_max() -> None:
    s = SenderRing(16)
    with pytest.raises(ValueError, match="negative"):
        s.advance_head(-1)
    with pytest.raises(ValueError, match="max_bytes"):
        s.writable_spans(-1)


def test_sender_peer_tail_validation() -> None:
    s = SenderRing(16, head=10, peer_tail=4)
    with pytest.raises(ProtocolViolation, match="backwards"):
        s.update_peer_tail(3)
    with pytest.raises(ProtocolViolation, match="beyond the head"):
        s.update_peer_tail(11)
    with pytest.raises(ProtocolViolation, match="u64"):
        s.update_peer_tail(-1)
    with pytest.raises(ProtocolViolation, match="u64"):
        s.update_peer_tail(2**64)
    assert s.update_peer_tail(4) == 0  # repeating is harmless
    assert s.update_peer_tail(10) == 6
    assert s.peer_tail == 10


def test_sender_needs_tail() -> None:
    s = SenderRing(64)
    assert not s.needs_tail(16)
    s.advance_head(48)
    assert not s.needs_tail(16)  # exactly one chunk free
    s.advance_head(1)
    assert s.needs_tail(16)
    s.advance_head(15)
    assert s.free == 0
    assert s.needs_tail(1)
    s2 = SenderRing(64)
    assert s2.needs_tail(16, writing=49) and not s2.needs_tail(16, writing=48)  # before a WRITE
    with pytest.raises(ValueError):
        s.needs_tail(0)


def test_sender_large_counters() -> None:
    base = 2**63 + 5
    s = SenderRing(4096, head=base, peer_tail=base)
    assert s.head_offset == base % 4096
    assert s.writable_spans() == [Span(base % 4096, 4096 - base % 4096), Span(0, base % 4096)]
    s.advance_head(4096)
    assert s.update_peer_tail(base + 4096) == 4096


def test_sender_head_overflow() -> None:
    s = SenderRing(16, head=U64_MAX - 3, peer_tail=U64_MAX - 3)
    with pytest.raises(OverflowError):
        s.advance_head(5)


# ------------------------------------------------------------------------ receiver


def test_receiver_spans_and_consume() -> None:
    r = ReceiverRing(16)
    assert r.readable_spans() == []
    assert r.set_head(10) == 10
    assert r.readable == 10
    assert r.readable_spans() == [Span(0, 10)]
    assert r.readable_spans(4) == [Span(0, 4)]
    assert r.consume(8) == 8
    assert r.set_head(20) == 10
    assert r.tail_offset == 8
    assert r.readable_spans() == [Span(8, 8), Span(0, 4)]
    assert r.readable_spans(9) == [Span(8, 8), Span(0, 1)]
    with pytest.raises(ValueError, match="exceeds readable"):
        r.consume(13)
    with pytest.raises(ValueError, match="negative"):
        r.consume(-1)
    r.consume(12)
    assert r.readable == 0


def test_receiver_head_validation() -> None:
    r = ReceiverRing(16, head=20, tail=10, last_sent_tail=10)
    with pytest.raises(ProtocolViolation, match="backwards"):
        r.set_head(19)
    with pytest.raises(ProtocolViolation, match="overruns"):
        r.set_head(27)  # 17 unconsumed > 16
    with pytest.raises(ProtocolViolation, match="u64"):
        r.set_head(2**64)
    assert r.set_head(26) == 6  # exactly full is fine
    assert r.set_head(26) == 0  # repeated head is fine


def test_receiver_fin() -> None:
    r = ReceiverRing(16)
    r.set_head(5)
    assert not r.fin_received
    assert r.set_fin(7) == 2  # FIN may announce bytes of its own
    assert r.fin_received and r.final_head == 7 and r.head == 7
    assert not r.fully_drained
    with pytest.raises(ProtocolViolation, match="after FIN"):
        r.set_head(8)
    assert r.set_head(7) == 0  # a late duplicate of the final head is harmless
    with pytest.raises(ProtocolViolation, match="second FIN"):
        r.set_fin(7)
    r.consume(7)
    assert r.fully_drained


def test_receiver_fin_validation() -> None:
    r = ReceiverRing(16, head=10, tail=0)
    with pytest.raises(ProtocolViolation, match="backwards"):
        r.set_fin(9)
    with pytest.raises(ProtocolViolation, match="overruns"):
        r.set_fin(17)
    assert not r.fin_received


# ------------------------------------------------------------------------ tail policy


def test_tail_policy_fraction() -> None:
    r = ReceiverRing(64)  # threshold 8 bytes
    r.set_head(64)
    assert not r.tail_update_due()
    r.consume(7)
    assert not r.tail_update_due()
    r.consume(1)
    assert r.tail_update_due()
    assert r.mark_tail_sent() == 8
    assert not r.tail_update_due()
    r.consume(10)
    assert r.tail_update_due()


def test_tail_policy_want_tail() -> None:
    """Asked, the receiver answers once its ring is empty, not after every drained sliver."""
    r = ReceiverRing(64)
    r.set_head(10, want_tail=True)
    assert r.want_tail
    assert not r.tail_update_due()  # nothing drained yet
    r.consume(1)
    assert not r.tail_update_due()  # 1 byte drained, 9 still in the ring
    r.consume(6)
    assert not r.tail_update_due()
    r.consume(3)
    assert r.tail_update_due()  # empty
    assert r.mark_tail_sent() == 10
    assert not r.want_tail
    r.set_head(11)
    r.consume(1)
    assert not r.tail_update_due()  # the request was answered


def test_tail_policy_want_tail_with_earlier_drain() -> None:
    """Bytes drained before the request arrived count: an empty ring answers at once."""
    r = ReceiverRing(64)
    r.set_head(7)
    r.consume(7)  # less than 1/8
    assert not r.tail_update_due()
    r.set_head(7, want_tail=True)  # a zero-length DATA_WANT_TAIL: it only asks
    assert r.tail_update_due()


def test_tail_policy_want_tail_still_answers_each_eighth() -> None:
    r = ReceiverRing(64)
    r.set_head(64, want_tail=True)
    r.consume(8)
    assert r.tail_update_due()  # (a): 1/8 of the ring, ring not empty


def test_tail_policy_final_drain() -> None:
    r = ReceiverRing(64)
    r.set_head(5)
    r.consume(5)
    assert not r.tail_update_due()
    r.set_fin(6)
    assert not r.tail_update_due()
    r.consume(1)
    assert r.tail_update_due()
    r.mark_tail_sent()
    assert not r.tail_update_due()


def test_tail_policy_fin_already_reported() -> None:
    r = ReceiverRing(64)
    r.set_head(8)
    r.consume(8)  # 1/8 drained
    assert r.tail_update_due()
    r.mark_tail_sent()
    r.set_fin(8)
    assert r.fully_drained
    assert not r.tail_update_due()  # final tail already known to the sender


# ------------------------------------------------------------------ simulated transfer


class _Pair:
    """A sender and a receiver joined by FIFO 'wires' (RC ordering) and a shared ring."""

    def __init__(self, ring_size: int, base: int, chunk: int, total: int, seed: int) -> None:
        self.ring_size = ring_size
        self.base = base
        self.chunk = chunk
        self.data = random.Random(seed).randbytes(total)
        self.mem = bytearray(ring_size)
        self.sender = SenderRing(ring_size, head=base, peer_tail=base)
        self.receiver = ReceiverRing(ring_size, head=base, tail=base)
        self.to_receiver: deque[tuple[str, int, bool]] = deque()
        self.to_sender: deque[int] = deque()
        self.out = bytearray()
        self.fin_sent = False
        self.tail_updates = 0

    @property
    def pending(self) -> int:
        return len(self.data) - (self.sender.head - self.base)

    def write(self, want: int) -> bool:
        """Write up to ``want`` bytes when the sender's silly-window rule lets it."""
        if not self.sender.may_write(self.chunk, min(want, self.pending)):
            return False
        n = min(want, self.pending, self.chunk)
        spans = self.sender.writable_spans(n)
        written = sum(length for _, length in spans)
        if written == 0:
            return False
        # the safety property: never overwrite what the receiver has not consumed
        assert self.sender.head + written - self.receiver.tail <= self.ring_size
        pos = self.sender.head - self.base
        for offset, length in spans:
            self.mem[offset : offset + length] = self.data[pos : pos + length]
            pos += length
        self.sender.advance_head(written)
        self.to_receiver.append(("head", self.sender.head, self.sender.needs_tail(self.chunk)))
        return True

    def send_fin(self) -> bool:
        if self.fin_sent or self.pending:
            return False
        self.fin_sent = True
        self.to_receiver.append(("fin", self.sender.head, False))
        return True

    def _maybe_tail(self) -> None:
        if self.receiver.tail_update_due():
            self.to_sender.append(self.receiver.mark_tail_sent())
            self.tail_updates += 1

    def deliver_to_receiver(self) -> bool:
        if not self.to_receiver:
            return False
        kind, value, want = self.to_receiver.popleft()
        if kind == "head":
            self.receiver.set_head(value, want_tail=want)
        else:
            self.receiver.set_fin(value)
        self._maybe_tail()
        return True

    def drain(self, want: int) -> bool:
        spans = self.receiver.readable_spans(want)
        if not spans:
            return False
        for offset, length in spans:
            self.out += self.mem[offset : offset + length]
        self.receiver.consume(sum(length for _, length in spans))
        self._maybe_tail()
        return True

    def deliver_to_sender(self) -> bool:
        if not self.to_sender:
            return False
        self.sender.update_peer_tail(self.to_sender.popleft())
        return True

    def finish(self) -> None:
        """Run fairly to completion; any state where nothing can move is a deadlock."""
        for _ in range(10 * len(self.data) + 1000):
            if self.fin_sent and self.receiver.fully_drained and not self.to_sender:
                if not self.to_receiver:
                    return
            moved = False
            moved |= self.write(self.chunk)
            moved |= self.send_fin()
            while self.deliver_to_receiver():
                moved = True
            moved |= self.drain(self.ring_size)
            while self.deliver_to_sender():
                moved = True
            if not moved:
                raise AssertionError(
                    f"deadlock: pending={self.pending} sender={self.sender} "
                    f"receiver={self.receiver}"
                )
        raise AssertionError("no completion")  # pragma: no cover

    def check(self) -> None:
        assert bytes(self.out) == self.data
        assert self.receiver.tail == self.base + len(self.data)
        # the final drain after FIN is reported, so the sender ends with an empty ring
        assert self.sender.peer_tail == self.sender.head
        assert self.sender.free == self.ring_size


_BASES = st.sampled_from([0, 5, 2**32 - 3, 2**40 + 12345, 2**62 + 7, 2**63 - 1])


@settings(max_examples=300, deadline=None)
@given(
    ring_size=st.sampled_from([8, 16, 64, 256, 4096]),
    base=_BASES,
    chunk_div=st.sampled_from([1, 2, 4, 8, 16]),
    total=st.integers(0, 3000),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_simulated_transfer_is_exact(
    ring_size: int, base: int, chunk_div: int, total: int, seed: int, data: st.DataObject
) -> None:
    """Random write / drain / delivery interleavings: no loss, duplication, reordering or
    overwrite of unconsumed bytes, across many wraps, and never a deadlock."""
    pair = _Pair(ring_size, base, max(1, ring_size // chunk_div), total, seed)
    steps = data.draw(st.integers(0, 400), label="steps")
    for _ in range(steps):
        action = data.draw(st.integers(0, 4), label="action")
        if action == 0:
            pair.write(data.draw(st.integers(1, ring_size), label="write"))
        elif action == 1:
            pair.deliver_to_receiver()
        elif action == 2:
            pair.drain(data.draw(st.integers(1, ring_size), label="drain"))
        elif action == 3:
            pair.deliver_to_sender()
        else:
            pair.send_fin()
    pair.finish()
    pair.check()


def test_tail_updates_are_sparse() -> None:
    """A bulk transfer that never blocks sends about 8 tail updates per ring's worth."""
    ring, total = 1 << 16, 1 << 22
    pair = _Pair(ring, 0, ring // 16, total, seed=1)
    while pair.pending or not pair.receiver.fully_drained:
        pair.write(pair.chunk)
        pair.send_fin()
        while pair.deliver_to_receiver():
            pass
        pair.drain(pair.chunk)
        while pair.deliver_to_sender():
            pass
    pair.check()
    assert pair.tail_updates <= (total // ring) * 8 + 2


def test_blocked_sender_hears_back_when_the_ring_empties() -> None:
    """DATA_WANT_TAIL: a sender that fills the ring hears back at each 1/8 drained and once
    the ring is empty, not after every drained sliver."""
    pair = _Pair(64, 0, 16, 1000, seed=2)
    while pair.write(16):
        pass
    assert pair.sender.free == 0
    head_msgs = list(pair.to_receiver)
    assert head_msgs[-1][2] is True  # the last head update asked for a tail
    assert not any(want for _, _, want in head_msgs[:-1])  # earlier ones left >= 1 chunk
    while pair.deliver_to_receiver():
        pass
    pair.drain(1)
    assert not pair.to_sender
    pair.drain(7)
    assert list(pair.to_sender) == [8]  # (a)
    pair.drain(60)
    assert pair.to_sender[-1] == 64  # (a) on the way, then (b): empty
    while pair.deliver_to_sender():
        pass
    assert pair.sender.free == 64


def test_sender_waits_for_a_chunk_of_room() -> None:
    s = SenderRing(64)
    assert s.room_wanted(16) == 16
    assert s.room_wanted(64) == 56  # at most 7/8 of the ring: each 1/8 drained is reported
    s.advance_head(56)
    assert s.free == 8
    assert not s.may_write(16)  # bulk: wait for a whole chunk
    assert s.may_write(16, pending=8)  # what is left to send fits whole
    assert not s.may_write(16, pending=9)
    s.advance_head(8)
    assert not s.may_write(16, pending=1)  # never into a full ring
    with pytest.raises(ValueError):
        s.room_wanted(0)


def test_fast_reader_gets_no_sliver_writes() -> None:
    """A receiver that drains every byte as it lands (a client reading with a big buffer)
    leaves the sender writing whole chunks, with about two tail updates per chunk."""
    ring, chunk, total = 1 << 12, 1 << 10, 1 << 18
    pair = _Pair(ring, 0, chunk, total, seed=4)
    sizes = []
    while pair.pending or not pair.receiver.fully_drained:
        before = pair.sender.head
        if pair.write(chunk):
            sizes.append(pair.sender.head - before)
        pair.send_fin()
        while pair.deliver_to_receiver():
            pass
        while pair.drain(97):  # slivers
            pass
        while pair.deliver_to_sender():
            pass
    pair.check()
    assert min(sizes) == chunk
    assert pair.tail_updates <= 2 * total // chunk + 2


def test_without_want_tail_the_sender_waits_for_an_eighth() -> None:
    pair = _Pair(64, 0, 64, 1000, seed=3)
    pair.write(64)
    pair.receiver.set_head(64)  # delivered as a plain HEAD
    pair.to_receiver.clear()
    for _ in range(7):
        pair.drain(1)
    assert not pair.to_sender
    pair.drain(1)
    assert list(pair.to_sender) == [8]
