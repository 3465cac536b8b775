"""Send-queue bookkeeping with selective signalling (pure: no verbs, no I/O).

Every work request posted on a peer link gets the next sequence number, which is also its
``wr_id``. Only some are *signaled* (produce a completion): an RC send queue completes in
order, so the completion of sequence ``s`` retires every request up to ``s``, and with them
the buffers they held (staging chunks, control-message slots) come back.

Signalling every request costs a completion (and its polling) per request; signalling none
would never give buffers back. The rule here: signal when the caller says it must (it is
short of buffers), or when ``signal_every`` requests in a row went unsignaled. So at most
``signal_every - 1`` requests are ever waiting behind the last signaled one, and a caller that
is running out of buffers always has a signaled request in flight that will free them.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

import attrs

__all__ = ["SendQueueFull", "SendWindow"]

T = TypeVar("T")


class SendQueueFull(Exception):
    """Posting now would exceed the send queue's depth."""


@attrs.define(slots=True)
class SendWindow(Generic[T]):
    """Sequence numbers, signalling decisions and in-order retirement for one send queue.

    ``T`` is what a request holds until it completes (a buffer token); ``None`` holds nothing.
    """

    depth: int = attrs.field()
    signal_every: int = attrs.field()
    #: Sequence number of the last request posted (the first is 1).
    posted: int = 0
    #: Every request up to this sequence number has completed.
    completed: int = 0
    #: Requests posted unsignaled since the last signaled one.
    unsignaled_run: int = 0
    _held: collections.deque[tuple[int, T]] = attrs.field(factory=collections.deque)

    @depth.validator
    def _check_depth(self, _attr: attrs.Attribute[int], value: int) -> None:
        if value < 1:
            raise ValueError(f"depth must be >= 1, got {value}")

    @signal_every.validator
    def _check_signal_every(self, _attr: attrs.Attribute[int], value: int) -> None:
        if not 1 <= value <= self.depth:
            raise ValueError(f"signal_every must be from 1 to depth ({self.depth}), got {value}")

    @property
    def outstanding(self) -> int:
        """Requests posted and not yet known to be complete (send-queue entries in use)."""
        return self.posted - self.completed

    @property
    def room(self) -> int:
        """Requests that can be posted now."""
        return self.depth - self.outstanding

    def post(self, holds: T | None = None, *, must_signal: bool = False) -> tuple[int, bool]:
        """Account for one request about to be posted: return (its wr_id, signaled?).

        Raises SendQueueFull (and changes nothing) when the queue has no room. The last
        request before the queue fills is always signaled, so a full queue always drains.
        """
        if self.outstanding >= self.depth:
            raise SendQueueFull(f"all {self.depth} send-queue entries are in flight")
        self.posted += 1
        signaled = (
            must_signal
            or self.unsignaled_run + 1 >= self.signal_every
            or self.outstanding >= self.depth
        )
        self.unsignaled_run = 0 if signaled else self.unsignaled_run + 1
        if holds is not None:
            self._held.append((self.posted, holds))
        return self.posted, signaled

    def complete(self, wr_id: int) -> list[T]:
        """A signaled request completed: retire it and all before it; return what they held.

        Raises ValueError for a sequence number that was never posted or already retired
        (a completion we did not ask for means the queue's state is corrupt).
        """
        if not self.completed < wr_id <= self.posted:
            raise ValueError(
                f"completion for request {wr_id}, outside the outstanding "
                f"{self.completed + 1}..{self.posted}"
            )
        self.completed = wr_id
        freed: list[T] = []
        held = self._held
        while held and held[0][0] <= wr_id:
            freed.append(held.popleft()[1])
        return freed

    def held(self) -> list[T]:
        """Everything still held by outstanding requests, oldest first (for teardown)."""
        return [token for _, token in self._held]
