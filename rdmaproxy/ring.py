"""Ring arithmetic over monotonically increasing 64-bit byte counters (no I/O).

A stream direction has one ring, in the *receiver's* pinned pool. Both ends count bytes:

* ``head``: bytes the sender has produced into the ring (the sender advances it; the receiver
  learns it from the control block the sender RDMA-writes),
* ``tail``: bytes the receiver has consumed (drained to TCP); the sender learns it, as
  ``peer_tail``, from tail updates the receiver RDMA-writes.

Counters never wrap in practice (2**64 bytes is centuries of traffic); the ring offset of a
counter is ``counter % ring_size`` (``ring_size`` is a power of two).

`SenderRing` is the sender's view, `ReceiverRing` the receiver's, including the tail-update
policy of docs/design.md ("Tail updates"). Values that come from the peer are validated and
nonsense raises `ProtocolViolation`; misuse by the local caller raises `ValueError`.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs

from rdmaproxy.errors import ProtocolViolation

__all__ = [
    "MIN_RING_SIZE",
    "TAIL_UPDATE_FRACTION",
    "U64_MAX",
    "ReceiverRing",
    "SenderRing",
    "Span",
    "validate_ring_size",
]

U64_MAX = 2**64 - 1
#: Smallest ring the arithmetic accepts (the pool imposes a larger minimum).
MIN_RING_SIZE = 8
#: Policy (a): a tail update is due once this fraction of the ring drained since the last one.
TAIL_UPDATE_FRACTION = 8


class Span(NamedTuple):
    """A contiguous piece of a ring: byte ``offset`` inside the ring and ``length``."""

    offset: int
    length: int


def validate_ring_size(ring_size: int) -> int:
    """Return ``ring_size`` if it is a power of two >= `MIN_RING_SIZE`, else raise ValueError."""
    if isinstance(ring_size, bool) or not isinstance(ring_size, int):
        raise ValueError(f"ring size must be an integer, got {ring_size!r}")
    if ring_size < MIN_RING_SIZE or ring_size & (ring_size - 1):
        raise ValueError(
            f"ring size must be a power of two >= {MIN_RING_SIZE} bytes, got {ring_size}"
        )
    return ring_size


def _validate_counter(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")


def _spans(ring_size: int, start: int, length: int) -> list[Span]:
    """The (at most two) contiguous pieces covering ``length`` bytes from counter ``start``."""
    if length <= 0:
        return []
    offset = start & (ring_size - 1)
    first = min(length, ring_size - offset)
    spans = [Span(offset, first)]
    if first < length:
        spans.append(Span(0, length - first))
    return spans


def _check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")


# on_setattr NO_OP: ring_size is validated once, at construction; the cursors move on the hot
# path and their methods check them, so assignments need no attrs hook.
@attrs.define(slots=True, on_setattr=attrs.setters.NO_OP)
class SenderRing:
    """The sender's view of the peer's ring for one stream direction.

    ``head`` is what this side has written (and will publish); ``peer_tail`` is the last
    consumer cursor the receiver wrote back. Free space is ``ring_size - (head - peer_tail)``.
    """

    ring_size: int = attrs.field()
    head: int = attrs.field(default=0)
    peer_tail: int = attrs.field(default=0)

    @ring_size.validator
    def _check_size(self, _attr: attrs.Attribute[int], value: int) -> None:
        validate_ring_size(value)

    def __attrs_post_init__(self) -> None:
        _validate_counter("head", self.head)
        _validate_counter("peer_tail", self.peer_tail)
        if not 0 <= self.head - self.peer_tail <= self.ring_size:
            raise ValueError(
                f"inconsistent sender ring: head={self.head} peer_tail={self.peer_tail} "
                f"ring_size={self.ring_size}"
            )

    @property
    def in_flight(self) -> int:
        """Bytes written but not yet known to be consumed by the receiver."""
        return self.head - self.peer_tail

    @property
    def free(self) -> int:
        """Bytes that may be written now without overwriting unconsumed data."""
        return self.ring_size - (self.head - self.peer_tail)

    @property
    def head_offset(self) -> int:
        """Ring offset at which the next byte goes."""
        return self.head & (self.ring_size - 1)

    def writable_spans(self, max_bytes: int | None = None) -> list[Span]:
        """At most two (offset, length) pieces, in order, for the next writable bytes.

        Together they cover ``min(free, max_bytes)`` bytes starting at ``head``; the second
        piece exists only when the region wraps past the end of the ring.
        """
        _check_max_bytes(max_bytes)
        n = self.free if max_bytes is None else min(self.free, max_bytes)
        return _spans(self.ring_size, self.head, n)

    def advance_head(self, n: int) -> int:
        """Record that ``n`` more bytes were written; return the new head."""
        if n < 0:
            raise ValueError(f"cannot advance head by a negative amount ({n})")
        if n > self.free:
            raise ValueError(f"advance_head({n}) exceeds free space {self.free}")
        if self.head + n > U64_MAX:
            raise OverflowError("head counter would exceed 2**64 - 1")
        self.head += n
        return self.head

    def update_peer_tail(self, tail: int) -> int:
        """Take a tail update written by the receiver; return the bytes it freed.

        Raises ProtocolViolation if the tail moves backwards or beyond what was written.
        """
        if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail <= U64_MAX:
            raise ProtocolViolation(f"peer tail {tail!r} is not a u64")
        if tail < self.peer_tail:
            raise ProtocolViolation(f"peer tail went backwards: {tail} < previous {self.peer_tail}")
        if tail > self.head:
            raise ProtocolViolation(
                f"peer tail {tail} is beyond the head {self.head} that was written"
            )
        freed = tail - self.peer_tail
        self.peer_tail = tail
        return freed

    def room_wanted(self, chunk_size: int) -> int:
        """Free bytes a sender of bulk data waits for before its next WRITE.

        Sender-side silly-window avoidance (RFC 1122 4.2.3.4, and SMC-R's lesson): writing
        into every sliver the receiver frees makes small WRITEs, and each costs both proxies
        about as much as a full one. So the sender waits for a whole chunk, or for 7/8 of the
        ring when the chunk is larger. That much room always comes: the receiver reports its
        tail every 1/8 of the ring it drains (`ReceiverRing.tail_update_due`).
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        return min(chunk_size, self.ring_size - self.ring_size // TAIL_UPDATE_FRACTION)

    def may_write(self, chunk_size: int, pending: int | None = None) -> bool:
        """Whether to WRITE now: `room_wanted` is free, or ``pending`` (bytes the caller has
        to send, when it knows) fits whole; never into a full ring."""
        wanted = self.room_wanted(chunk_size)
        if pending is not None:
            wanted = min(wanted, pending)
        return self.free >= max(1, wanted)

    def needs_tail(self, chunk_size: int, writing: int = 0) -> bool:
        """Whether the WRITE of ``writing`` more bytes (the head update it announces) must
        carry DATA_WANT_TAIL.

        True when less than `room_wanted` stays free after it (a full ring included): the
        sender is about to wait for room, so it asks the receiver for a tail update once its
        ring is empty. A sender never waits for space without having asked (design.md).
        """
        return self.free - writing < self.room_wanted(chunk_size)


@attrs.define(slots=True, on_setattr=attrs.setters.NO_OP)
class ReceiverRing:
    """The receiver's view of its own ring for one stream direction.

    ``head`` is published by the peer (read from the control block after a HEAD immediate,
    or taken from FIN); ``tail`` counts bytes drained locally; ``last_sent_tail`` is the
    last tail written back to the peer.
    """

    ring_size: int = attrs.field()
    head: int = attrs.field(default=0)
    tail: int = attrs.field(default=0)
    last_sent_tail: int = attrs.field(default=attrs.Factory(lambda s: s.tail, takes_self=True))
    #: The peer asked (DATA_WANT_TAIL) for a tail update as soon as anything drains.
    want_tail: bool = attrs.field(default=False)
    #: Final head announced by the peer's FIN, or None while the direction is open.
    final_head: int | None = attrs.field(default=None)

    @ring_size.validator
    def _check_size(self, _attr: attrs.Attribute[int], value: int) -> None:
        validate_ring_size(value)

    def __attrs_post_init__(self) -> None:
        for name in ("head", "tail", "last_sent_tail"):
            _validate_counter(name, getattr(self, name))
        if not 0 <= self.head - self.tail <= self.ring_size:
            raise ValueError(
                f"inconsistent receiver ring: head={self.head} tail={self.tail} "
                f"ring_size={self.ring_size}"
            )
        if self.last_sent_tail > self.tail:
            raise ValueError("last_sent_tail cannot be beyond tail")
        if self.final_head is not None and self.final_head != self.head:
            raise ValueError("final_head must equal head")

    @property
    def readable(self) -> int:
        """Bytes in the ring waiting to be drained."""
        return self.head - self.tail

    @property
    def tail_offset(self) -> int:
        """Ring offset of the next byte to drain."""
        return self.tail & (self.ring_size - 1)

    @property
    def fin_received(self) -> bool:
        """The peer sent FIN: ``head`` is final."""
        return self.final_head is not None

    @property
    def fully_drained(self) -> bool:
        """The peer sent FIN and every byte up to the final head has been consumed."""
        return self.final_head is not None and self.tail == self.final_head

    def readable_spans(self, max_bytes: int | None = None) -> list[Span]:
        """At most two (offset, length) pieces, in order, of data ready to drain."""
        _check_max_bytes(max_bytes)
        n = self.readable if max_bytes is None else min(self.readable, max_bytes)
        return _spans(self.ring_size, self.tail, n)

    def consume(self, n: int) -> int:
        """Record that ``n`` bytes were drained; return the new tail."""
        if n < 0:
            raise ValueError(f"cannot consume a negative amount ({n})")
        if n > self.readable:
            raise ValueError(f"consume({n}) exceeds readable bytes {self.readable}")
        self.tail += n
        return self.tail

    def _check_peer_head(self, head: int, what: str) -> None:
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head <= U64_MAX:
            raise ProtocolViolation(f"{what} {head!r} is not a u64")
        if head < self.head:
            raise ProtocolViolation(f"{what} went backwards: {head} < previous {self.head}")
        if head - self.tail > self.ring_size:
            raise ProtocolViolation(
                f"{what} {head} overruns the ring: {head - self.tail} bytes unconsumed "
                f"(tail {self.tail}) > ring size {self.ring_size}"
            )

    def set_head(self, head: int, *, want_tail: bool = False) -> int:
        """Take a head published by the peer (DATA / DATA_WANT_TAIL); return new bytes.

        Raises ProtocolViolation if the head moves backwards, would put more than
        ``ring_size`` bytes in the ring, or moves after the peer's FIN.
        """
        if self.final_head is not None and head != self.final_head:
            raise ProtocolViolation(
                f"head update to {head!r} after FIN with final head {self.final_head}"
            )
        self._check_peer_head(head, "peer head")
        added = head - self.head
        self.head = head
        if want_tail:
            self.want_tail = True
        return added

    def set_fin(self, final_head: int) -> int:
        """Take the peer's FIN: no data after ``final_head``. Returns new bytes it announces.

        FIN may announce bytes not yet announced by a head update (it doubles as the last
        head update). A second FIN is a ProtocolViolation.
        """
        if self.final_head is not None:
            raise ProtocolViolation(f"second FIN (final head {final_head!r}) for this stream")
        self._check_peer_head(final_head, "FIN final head")
        added = final_head - self.head
        self.head = final_head
        self.final_head = final_head
        return added

    def tail_update_due(self) -> bool:
        """Whether the receiver should write its tail back now (design.md "Tail updates").

        (a) at least 1/8 of the ring drained since the last update sent, or
        (b) the sender asked with DATA_WANT_TAIL, something drained since, and the ring is
            empty, or
        (c) the last byte before the peer's FIN has been drained (and not yet reported).

        Receiver-side silly-window avoidance: (b) used to answer after any drained byte, so a
        client that reads fast turned one asked-for update into many small ones, and the
        sender wrote into each sliver (half-size WRITEs, twice the CPU per byte, measured).
        """
        drained = self.tail - self.last_sent_tail
        if drained <= 0:
            return False
        if drained >= self.ring_size // TAIL_UPDATE_FRACTION:
            return True
        if self.want_tail and self.head == self.tail:
            return True
        return self.fully_drained

    def mark_tail_sent(self) -> int:
        """Record that the current tail was written back; return that value to send."""
        self.last_sent_tail = self.tail
        self.want_tail = False
        return self.tail
