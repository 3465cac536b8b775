"""A completion queue whose completions are awaited through its completion channel's fd.

The wait loop is the classic one (request notification, re-poll to close the race, then sleep
on the channel fd) so an idle proxy sleeps in the kernel instead of spinning. It also polls
adaptively while traffic flows: after a poll that found completions, the next
BUSY_POLL_ROUNDS empty polls first yield to the other tasks (which post the next work),
which saves the arm/epoll/read/ack round of a sleep when more completions follow soon.
"""

from __future__ import annotations

import errno
from typing import Any

import trio

from rdmaproxy.verbs import _native
from rdmaproxy.verbs._pyverbs import pv
from rdmaproxy.verbs.device import VerbsDevice

_ACK_BATCH = 64
#: Empty polls, each after a trip through trio's scheduler, before arming and sleeping.
#: Measured under TCG (docs/performance.md), 0 against 1 was inconclusive: an A/B with curl
#: favoured 0 and a full benchmark run with 0 was the slowest of four, so it stays at 1.
BUSY_POLL_ROUNDS = 1


class CompletionError(RuntimeError):
    def __init__(self, wc: Any) -> None:
        self.wc = wc
        status = wc.status
        try:
            text = pv().enums.ibv_wc_status(status).name
        except Exception:
            text = str(status)
        super().__init__(f"work request {wc.wr_id} failed: {text} (vendor error {wc.vendor_err})")


class AsyncCompletionQueue:
    """One CQ plus its completion channel, for use from a single trio task."""

    def __init__(self, device: VerbsDevice, depth: int) -> None:
        before = _native.open_fds()
        self.channel: Any = pv().cq.CompChannel(device.context)
        self.fd = _native.new_fd_matching(before, "infinibandevent")
        _native.set_nonblocking(self.fd)
        self.depth = depth
        self.cq: Any = pv().cq.CQ(device.context, depth, None, self.channel, 0)
        self._unacked = 0
        self._armed = False
        self._busy_rounds = 0

    def poll(self, max_entries: int = 32) -> list[Any]:
        """Completions available now (never blocks)."""
        _, wcs = self.cq.poll(max_entries)
        return list(wcs)

    async def wait(self, max_entries: int = 32) -> list[Any]:
        """At least one completion; sleeps on the channel fd while there is none."""
        while True:
            wcs = self.poll(max_entries)
            if wcs:
                self._busy_rounds = BUSY_POLL_ROUNDS
                return wcs
            if self._busy_rounds:
                self._busy_rounds -= 1
                await trio.lowlevel.checkpoint()
                continue
            if not self._armed:
                self.cq.req_notify()
                self._armed = True
                continue  # re-poll: a completion may have landed before the arm
            await trio.lowlevel.wait_readable(self.fd)
            self._consume_event()

    def _consume_event(self) -> None:
        try:
            self.channel.get_cq_event(self.cq)
        except pv().PyverbsRDMAError as exc:
            if getattr(exc, "error_code", None) in (errno.EAGAIN, errno.EWOULDBLOCK) or (
                "Resource temporarily unavailable" in str(exc)
            ):
                return
            raise
        self._armed = False
        self._unacked += 1
        if self._unacked >= _ACK_BATCH:
            self.cq.ack_events(self._unacked)
            self._unacked = 0

    def close(self) -> None:
        if self._unacked:
            self.cq.ack_events(self._unacked)
            self._unacked = 0
        self.cq.close()
        self.channel.close()
