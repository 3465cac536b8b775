"""Per-stream state machine (no I/O): everything that affects a stream's state lives here.

A stream has two legs, one per node: the *ingress* leg (took the SOCKS client, sent OPEN)
and the *egress* leg (received OPEN, connects to the destination). Each leg runs one
`StreamStateMachine`. The caller reports what happened as events:

* things this side did on the wire: `SendOpened`, `SendRefused`, `SendFin`, `SendClosed`,
  `SendReset`;
* things that arrived from the peer: `PeerOpened`, `PeerRefused`, `PeerFin`, `PeerClosed`,
  `PeerReset`, `PeerLost` (the RC connection died);
* `LocalReset`: this side decided to abort (TCP error, client reset, protocol violation).
  Whether an RST must then go on the wire is answered by `must_send_rst`; after posting it
  the caller reports `SendReset`. The same holds after `PeerReset` (RST is answered by RST).

The machine is four small sub-machines, each a transition table: the life *phase*, the
outbound direction (my TCP -> peer's ring), the inbound direction (peer's ring -> my TCP),
and the reset handshake. `state` summarises them as one `State` for humans.

Slot release (docs/design.md, "Stream life and slot release"): normal close once FIN and
CLOSED were both sent and both received; reset once RST was both sent and received; at once
when the peer is lost or the open was refused.

RST initiation rule: a side that has sent both FIN and CLOSED never *initiates* RST (the
peer may already have released its slot), so `LocalReset` is then a no-op; it still
*answers* a received RST (the peer keeps its slot until that answer arrives).
"""

from __future__ import annotations

import enum
from typing import ClassVar

import attrs

from rdmaproxy.errors import ProtocolViolation

__all__ = [
    "Event",
    "IllegalEvent",
    "InDir",
    "LocalReset",
    "OutDir",
    "PeerClosed",
    "PeerFin",
    "PeerLost",
    "PeerOpened",
    "PeerRefused",
    "PeerReset",
    "Phase",
    "ResetState",
    "Role",
    "SendClosed",
    "SendFin",
    "SendOpened",
    "SendRefused",
    "SendReset",
    "State",
    "StreamStateMachine",
]


class Role(enum.Enum):
    """Which leg of the stream this node holds."""

    #: Accepted the SOCKS client and sent OPEN (the "opener").
    INGRESS = "ingress"
    #: Received OPEN and connects to the destination (the "acceptor").
    EGRESS = "egress"


class State(enum.Enum):
    """Summary state of a stream leg, for display and coarse decisions."""

    OPENING = "OPENING"
    OPEN = "OPEN"
    #: I sent FIN, the peer has not.
    HALF_CLOSED_LOCAL = "HALF_CLOSED_LOCAL"
    #: The peer sent FIN, I have not.
    HALF_CLOSED_REMOTE = "HALF_CLOSED_REMOTE"
    #: Both FINs exchanged, CLOSED still outstanding in some direction.
    CLOSING = "CLOSING"
    #: FIN and CLOSED sent and received: the slot may be released.
    CLOSED = "CLOSED"
    #: RST wanted, sent or received (releasable once both sent and received).
    RESET = "RESET"
    #: The open was refused (REFUSED sent or received).
    REFUSED = "REFUSED"
    #: The peer connection died.
    LOST = "LOST"


class Phase(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    REFUSED = "refused"
    LOST = "lost"


class OutDir(enum.Enum):
    """My sending direction (my TCP reads -> peer's ring)."""

    OPEN = "open"
    FIN_SENT = "fin_sent"
    #: The peer sent CLOSED: it drained everything and writes no more tails into my slot.
    CLOSED = "closed"


class InDir(enum.Enum):
    """The peer's sending direction (my ring -> my TCP writes)."""

    OPEN = "open"
    FIN_RECEIVED = "fin_received"
    #: I drained up to the final head, shut down the TCP write side and sent CLOSED.
    CLOSED = "closed"


class ResetState(enum.Enum):
    NONE = "none"
    #: LocalReset happened, the RST is not on the wire yet.
    WANTED = "wanted"
    SENT = "sent"
    #: RST received; ours (the answer) is not on the wire yet.
    RECEIVED = "received"
    BOTH = "both"


# ------------------------------------------------------------------------------- events


@attrs.define(frozen=True, slots=True)
class Event:
    """Base of all stream events. ``by_peer`` tells whether the peer caused it."""

    by_peer: ClassVar[bool] = False


@attrs.define(frozen=True, slots=True)
class SendOpened(Event):
    """Egress: the destination connected and OPENED was sent."""


@attrs.define(frozen=True, slots=True)
class SendRefused(Event):
    """Egress: the destination failed and REFUSED was sent."""


@attrs.define(frozen=True, slots=True)
class PeerOpened(Event):
    """Ingress: OPENED arrived (the peer slot and ring address are now known)."""

    by_peer: ClassVar[bool] = True


@attrs.define(frozen=True, slots=True)
class PeerRefused(Event):
    """Ingress: REFUSED arrived with a SOCKS5 reply ``code``."""

    by_peer: ClassVar[bool] = True
    code: int = 1


@attrs.define(frozen=True, slots=True)
class SendFin(Event):
    """I sent FIN: my TCP side hit EOF and everything before it is in the peer's ring."""


@attrs.define(frozen=True, slots=True)
class PeerFin(Event):
    """The peer's FIN arrived: it writes no more heads."""

    by_peer: ClassVar[bool] = True


@attrs.define(frozen=True, slots=True)
class SendClosed(Event):
    """I drained the peer's data up to its FIN, shut down my TCP write side, sent CLOSED."""


@attrs.define(frozen=True, slots=True)
class PeerClosed(Event):
    """The peer's CLOSED arrived: it drained my data and writes no more tails."""

    by_peer: ClassVar[bool] = True


@attrs.define(frozen=True, slots=True)
class LocalReset(Event):
    """This side decided to abort the stream (``reason`` is kept for logs/status)."""

    reason: str = ""


@attrs.define(frozen=True, slots=True)
class SendReset(Event):
    """RST was posted to the peer (only when `must_send_rst` said so)."""


@attrs.define(frozen=True, slots=True)
class PeerReset(Event):
    """RST arrived from the peer."""

    by_peer: ClassVar[bool] = True


@attrs.define(frozen=True, slots=True)
class PeerLost(Event):
    """The RC connection to the peer is gone; nothing more can arrive or be sent."""

    by_peer: ClassVar[bool] = True


class IllegalEvent(ProtocolViolation):
    """An event that is not allowed in the stream's current state.

    ``by_peer`` is True when the peer caused it (answer: reset the stream), False when the
    local caller misused the machine (a bug).
    """

    def __init__(self, event: Event, machine: StreamStateMachine, why: str) -> None:
        self.event = event
        self.by_peer = event.by_peer
        self.state = machine.state
        who = "peer" if event.by_peer else "local"
        super().__init__(
            f"{who} event {type(event).__name__} not allowed in state {machine.state.value} "
            f"({machine.describe()}): {why}"
        )


# -------------------------------------------------------------------------- transitions

_PHASE_TABLE: dict[tuple[Role, Phase, type[Event]], Phase] = {
    (Role.INGRESS, Phase.OPENING, PeerOpened): Phase.OPEN,
    (Role.INGRESS, Phase.OPENING, PeerRefused): Phase.REFUSED,
    (Role.EGRESS, Phase.OPENING, SendOpened): Phase.OPEN,
    (Role.EGRESS, Phase.OPENING, SendRefused): Phase.REFUSED,
}

_OUT_TABLE: dict[tuple[OutDir, type[Event]], OutDir] = {
    (OutDir.OPEN, SendFin): OutDir.FIN_SENT,
    (OutDir.FIN_SENT, PeerClosed): OutDir.CLOSED,
}

_IN_TABLE: dict[tuple[InDir, type[Event]], InDir] = {
    (InDir.OPEN, PeerFin): InDir.FIN_RECEIVED,
    (InDir.FIN_RECEIVED, SendClosed): InDir.CLOSED,
}

_RST_TABLE: dict[tuple[ResetState, type[Event]], ResetState] = {
    (ResetState.NONE, LocalReset): ResetState.WANTED,
    (ResetState.NONE, PeerReset): ResetState.RECEIVED,
    (ResetState.WANTED, LocalReset): ResetState.WANTED,
    (ResetState.WANTED, SendReset): ResetState.SENT,
    (ResetState.WANTED, PeerReset): ResetState.RECEIVED,
    (ResetState.SENT, LocalReset): ResetState.SENT,
    (ResetState.SENT, PeerReset): ResetState.BOTH,
    (ResetState.RECEIVED, LocalReset): ResetState.RECEIVED,
    (ResetState.RECEIVED, SendReset): ResetState.BOTH,
    (ResetState.BOTH, LocalReset): ResetState.BOTH,
}

_PHASE_EVENTS = (SendOpened, SendRefused, PeerOpened, PeerRefused)
_OUT_EVENTS = (SendFin, PeerClosed)
_IN_EVENTS = (PeerFin, SendClosed)
_RST_EVENTS = (LocalReset, SendReset, PeerReset)


@attrs.define(slots=True)
class StreamStateMachine:
    """State of one stream leg. Feed events with `handle`; ask the properties what to do."""

    role: Role
    phase: Phase = Phase.OPENING
    out: OutDir = OutDir.OPEN
    inn: InDir = InDir.OPEN
    rst: ResetState = ResetState.NONE
    #: Reason given with the first LocalReset (for logs and `rdmaproxy status`).
    reset_reason: str | None = None
    #: SOCKS5 reply code of PeerRefused, if any.
    refused_code: int | None = None

    # ---------------------------------------------------------------------- handling

    def handle(self, event: Event) -> State:
        """Apply ``event``; return the new summary state. Raises IllegalEvent."""
        if isinstance(event, PeerLost):
            self.phase = Phase.LOST
            return self.state
        if self.phase in (Phase.LOST, Phase.REFUSED):
            if isinstance(event, LocalReset):
                return self.state  # nothing left to abort
            raise IllegalEvent(event, self, f"the stream is already {self.phase.value}")
        if isinstance(event, _PHASE_EVENTS):
            self._handle_phase(event)
        elif isinstance(event, _RST_EVENTS):
            self._handle_reset(event)
        elif isinstance(event, _OUT_EVENTS + _IN_EVENTS):
            self._handle_direction(event)
        else:
            raise IllegalEvent(event, self, "unknown event type")
        return self.state

    def _handle_phase(self, event: Event) -> None:
        new = _PHASE_TABLE.get((self.role, self.phase, type(event)))
        if new is None:
            if self.phase is not Phase.OPENING:
                why = "the stream is already open"
            else:
                why = f"not an event of the {self.role.value} leg while opening"
            raise IllegalEvent(event, self, why)
        self.phase = new
        if isinstance(event, PeerRefused):
            self.refused_code = event.code

    def _handle_reset(self, event: Event) -> None:
        if isinstance(event, LocalReset):
            if self.rst is ResetState.NONE and self.out is not OutDir.OPEN:
                if self.inn is InDir.CLOSED:
                    # FIN and CLOSED both sent: the peer may have released its slot, so an
                    # RST could hit a reused slot. Nothing is left to abort locally anyway.
                    return
            if self.reset_reason is None:
                self.reset_reason = event.reason or "local reset"
        elif self.phase is not Phase.OPEN:
            raise IllegalEvent(event, self, "the peer slot is not known yet")
        elif (
            isinstance(event, PeerReset)
            and self.rst in (ResetState.NONE, ResetState.WANTED)
            and self.inn is not InDir.OPEN
            and self.out is OutDir.CLOSED
        ):
            raise IllegalEvent(
                event, self, "the peer sent FIN and CLOSED, it may only answer an RST"
            )
        new = _RST_TABLE.get((self.rst, type(event)))
        if new is None:
            if isinstance(event, SendReset):
                why = "no RST is due (see must_send_rst)"
            else:
                why = "the peer already sent RST"
            raise IllegalEvent(event, self, why)
        self.rst = new

    def _handle_direction(self, event: Event) -> None:
        if self.phase is not Phase.OPEN:
            raise IllegalEvent(event, self, "the stream is not open yet")
        if self.rst is not ResetState.NONE:
            if event.by_peer and self.rst in (ResetState.WANTED, ResetState.SENT):
                return  # crossed our RST; the reset supersedes it
            if event.by_peer:
                raise IllegalEvent(event, self, "the peer sends nothing after its RST")
            raise IllegalEvent(event, self, "the stream is being reset")
        if isinstance(event, _OUT_EVENTS):
            new_out = _OUT_TABLE.get((self.out, type(event)))
            if new_out is None:
                raise IllegalEvent(event, self, _direction_why(event, self.out.value))
            self.out = new_out
        else:
            new_in = _IN_TABLE.get((self.inn, type(event)))
            if new_in is None:
                raise IllegalEvent(event, self, _direction_why(event, self.inn.value))
            self.inn = new_in

    # ---------------------------------------------------------------------- queries

    @property
    def state(self) -> State:
        if self.phase is Phase.LOST:
            return State.LOST
        if self.phase is Phase.REFUSED:
            return State.REFUSED
        if self.rst is not ResetState.NONE:
            return State.RESET
        if self.phase is Phase.OPENING:
            return State.OPENING
        out_open = self.out is OutDir.OPEN
        in_open = self.inn is InDir.OPEN
        if out_open and in_open:
            return State.OPEN
        if out_open:
            return State.HALF_CLOSED_REMOTE
        if in_open:
            return State.HALF_CLOSED_LOCAL
        if self.out is OutDir.CLOSED and self.inn is InDir.CLOSED:
            return State.CLOSED
        return State.CLOSING

    @property
    def can_send_data(self) -> bool:
        """May payload (and head updates, and FIN) still go to the peer?"""
        return self.phase is Phase.OPEN and self.out is OutDir.OPEN and self.rst is ResetState.NONE

    @property
    def can_deliver_data(self) -> bool:
        """Should data arriving in my ring still be drained to my TCP socket?"""
        return (
            self.phase is Phase.OPEN
            and self.inn is not InDir.CLOSED
            and self.rst is ResetState.NONE
        )

    @property
    def shutdown_write_pending(self) -> bool:
        """The peer sent FIN and I have not sent CLOSED yet.

        Once the ring is drained up to the final head: shut down the TCP write side, write
        the final tail update, send CLOSED and report `SendClosed`.
        """
        return (
            self.phase is Phase.OPEN
            and self.inn is InDir.FIN_RECEIVED
            and self.rst is ResetState.NONE
        )

    @property
    def must_abort_tcp(self) -> bool:
        """The TCP socket must be aborted (SO_LINGER 0 + close): reset or peer lost."""
        return self.phase is Phase.LOST or self.rst is not ResetState.NONE

    @property
    def must_send_rst(self) -> bool:
        """An RST must be posted now (then report `SendReset`)."""
        return self.phase is Phase.OPEN and self.rst in (ResetState.WANTED, ResetState.RECEIVED)

    @property
    def releasable(self) -> bool:
        """The peer can no longer write into this slot: it may be freed."""
        if self.phase in (Phase.LOST, Phase.REFUSED):
            return True
        if self.rst is ResetState.BOTH:
            return True
        return (
            self.rst is ResetState.NONE and self.out is OutDir.CLOSED and self.inn is InDir.CLOSED
        )

    @property
    def fin_sent(self) -> bool:
        return self.out is not OutDir.OPEN

    @property
    def fin_received(self) -> bool:
        return self.inn is not InDir.OPEN

    @property
    def closed_sent(self) -> bool:
        return self.inn is InDir.CLOSED

    @property
    def closed_received(self) -> bool:
        return self.out is OutDir.CLOSED

    @property
    def rst_sent(self) -> bool:
        return self.rst in (ResetState.SENT, ResetState.BOTH)

    @property
    def rst_received(self) -> bool:
        return self.rst in (ResetState.RECEIVED, ResetState.BOTH)

    def describe(self) -> str:
        """Compact dump of the sub-states, for error messages and debugging."""
        return (
            f"role={self.role.value} phase={self.phase.value} out={self.out.value} "
            f"in={self.inn.value} rst={self.rst.value}"
        )


def _direction_why(event: Event, sub_state: str) -> str:
    if isinstance(event, SendFin):
        return f"FIN already sent (outbound {sub_state})"
    if isinstance(event, PeerClosed):
        return f"CLOSED is only valid after my FIN (outbound {sub_state})"
    if isinstance(event, PeerFin):
        return f"duplicate FIN (inbound {sub_state})"
    return f"CLOSED needs the peer's FIN first, and is sent once (inbound {sub_state})"
