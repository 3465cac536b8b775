"""Unit and property tests of rdmaproxy.stream_state."""

from __future__ import annotations

import copy
import functools
from collections import deque
from collections.abc import Callable

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmaproxy.errors import ProtocolViolation
from rdmaproxy.stream_state import (
    Event,
    IllegalEvent,
    LocalReset,
    PeerClosed,
    PeerFin,
    PeerLost,
    PeerOpened,
    PeerRefused,
    PeerReset,
    Role,
    SendClosed,
    SendFin,
    SendOpened,
    SendRefused,
    SendReset,
    State,
    StreamStateMachine,
)


def opened(role: Role = Role.INGRESS) -> StreamStateMachine:
    m = StreamStateMachine(role)
    m.handle(PeerOpened() if role is Role.INGRESS else SendOpened())
    return m


def run(m: StreamStateMachine, *events: Event) -> list[State]:
    return [m.handle(e) for e in events]


# ------------------------------------------------------------------------ opening


def test_ingress_opening() -> None:
    m = StreamStateMachine(Role.INGRESS)
    assert m.state is State.OPENING
    assert not m.can_send_data and not m.releasable and not m.must_send_rst
    assert m.handle(PeerOpened()) is State.OPEN
    assert m.can_send_data and m.can_deliver_data


def test_ingress_refused() -> None:
    m = StreamStateMachine(Role.INGRESS)
    assert m.handle(PeerRefused(code=5)) is State.REFUSED
    assert m.refused_code == 5
    assert m.releasable and not m.must_abort_tcp and not m.can_send_data
    m.handle(LocalReset())  # nothing to abort any more: no-op
    assert m.state is State.REFUSED
    with pytest.raises(IllegalEvent, match="already refused"):
        m.handle(PeerOpened())


def test_egress_opening() -> None:
    m = StreamStateMachine(Role.EGRESS)
    assert m.state is State.OPENING
    assert m.handle(SendOpened()) is State.OPEN
    m2 = StreamStateMachine(Role.EGRESS)
    assert m2.handle(SendRefused()) is State.REFUSED
    assert m2.releasable


@pytest.mark.parametrize(
    ("role", "event"),
    [
        (Role.INGRESS, SendOpened()),
        (Role.INGRESS, SendRefused()),
        (Role.EGRESS, PeerOpened()),
        (Role.EGRESS, PeerRefused()),
        (Role.INGRESS, PeerFin()),
        (Role.INGRESS, SendFin()),
        (Role.INGRESS, PeerClosed()),
        (Role.INGRESS, SendClosed()),
        (Role.INGRESS, PeerReset()),
        (Role.INGRESS, SendReset()),
        (Role.EGRESS, PeerFin()),
        (Role.EGRESS, PeerReset()),
    ],
)
def test_illegal_while_opening(role: Role, event: Event) -> None:
    m = StreamStateMachine(role)
    with pytest.raises(IllegalEvent) as info:
        m.handle(event)
    assert info.value.by_peer is event.by_peer
    assert isinstance(info.value, ProtocolViolation)
    assert type(event).__name__ in str(info.value)
    assert m.state is State.OPENING  # unchanged


def test_second_opened_is_illegal() -> None:
    m = opened()
    with pytest.raises(IllegalEvent, match="already open"):
        m.handle(PeerOpened())


def test_ingress_reset_while_opening_then_opened() -> None:
    """The client went away before OPENED: RST goes out as soon as the peer slot is known."""
    m = StreamStateMachine(Role.INGRESS)
    assert m.handle(LocalReset("client closed")) is State.RESET
    assert not m.must_send_rst  # peer slot unknown
    assert m.must_abort_tcp
    with pytest.raises(IllegalEvent, match="not known"):
        m.handle(SendReset())
    m.handle(PeerOpened())
    assert m.must_send_rst
    m.handle(PeerFin())  # crossed with our RST: ignored
    m.handle(SendReset())
    assert not m.must_send_rst and not m.releasable
    m.handle(PeerReset())
    assert m.releasable
    assert m.reset_reason == "client closed"


def test_ingress_reset_while_opening_then_refused() -> None:
    m = StreamStateMachine(Role.INGRESS)
    m.handle(LocalReset())
    m.handle(PeerRefused())
    assert m.releasable and m.state is State.REFUSED


def test_egress_reset_while_connecting() -> None:
    m = StreamStateMachine(Role.EGRESS)
    m.handle(LocalReset("shutdown"))
    assert not m.must_send_rst
    m.handle(SendRefused())
    assert m.releasable
    m2 = StreamStateMachine(Role.EGRESS)
    m2.handle(LocalReset())
    m2.handle(SendOpened())
    assert m2.must_send_rst


# ------------------------------------------------------------------------ normal close


@pytest.mark.parametrize("role", list(Role))
def test_close_local_first(role: Role) -> None:
    m = opened(role)
    assert m.handle(SendFin()) is State.HALF_CLOSED_LOCAL
    assert not m.can_send_data and m.can_deliver_data
    assert m.handle(PeerClosed()) is State.HALF_CLOSED_LOCAL
    assert m.closed_received and not m.releasable
    assert m.handle(PeerFin()) is State.CLOSING
    assert m.shutdown_write_pending
    assert m.handle(SendClosed()) is State.CLOSED
    assert m.releasable and not m.must_abort_tcp and not m.can_deliver_data


@pytest.mark.parametrize("role", list(Role))
def test_close_remote_first(role: Role) -> None:
    m = opened(role)
    assert m.handle(PeerFin()) is State.HALF_CLOSED_REMOTE
    assert m.shutdown_write_pending and m.can_send_data
    assert m.handle(SendClosed()) is State.HALF_CLOSED_REMOTE
    assert not m.shutdown_write_pending
    assert m.handle(SendFin()) is State.CLOSING
    assert not m.releasable
    assert m.handle(PeerClosed()) is State.CLOSED
    assert m.releasable


def test_simultaneous_close() -> None:
    m = opened()
    assert run(m, SendFin(), PeerFin(), SendClosed(), PeerClosed()) == [
        State.HALF_CLOSED_LOCAL,
        State.CLOSING,
        State.CLOSING,
        State.CLOSED,
    ]
    assert m.fin_sent and m.fin_received and m.closed_sent and m.closed_received


@pytest.mark.parametrize(
    ("prefix", "event", "why"),
    [
        ([SendFin()], SendFin(), "FIN already sent"),
        ([PeerFin()], PeerFin(), "duplicate FIN"),
        ([], PeerClosed(), "only valid after my FIN"),
        ([], SendClosed(), "needs the peer's FIN"),
        ([PeerFin(), SendClosed()], SendClosed(), "sent once"),
        ([SendFin(), PeerClosed()], PeerClosed(), "only valid after my FIN"),
    ],
)
def test_illegal_close_events(prefix: list[Event], event: Event, why: str) -> None:
    m = opened()
    run(m, *prefix)
    before = m.describe()
    with pytest.raises(IllegalEvent, match=why):
        m.handle(event)
    assert m.describe() == before


def test_everything_after_closed_is_illegal_from_peer() -> None:
    m = opened()
    run(m, SendFin(), PeerFin(), SendClosed(), PeerClosed())
    for event in (PeerFin(), PeerClosed(), PeerOpened()):
        with pytest.raises(IllegalEvent):
            m.handle(event)
    with pytest.raises(IllegalEvent, match="may only answer"):
        m.handle(PeerReset())


# ------------------------------------------------------------------------ reset


def test_local_reset() -> None:
    m = opened()
    assert m.handle(LocalReset("tcp error")) is State.RESET
    assert m.must_send_rst and m.must_abort_tcp and not m.can_send_data
    with pytest.raises(IllegalEvent, match="being reset"):
        m.handle(SendFin())
    m.handle(SendReset())
    assert m.rst_sent and not m.must_send_rst and not m.releasable
    m.handle(LocalReset())  # idempotent
    m.handle(PeerClosed())  # crossed: ignored
    m.handle(PeerReset())
    assert m.rst_received and m.releasable


def test_peer_reset_is_answered() -> None:
    m = opened(Role.EGRESS)
    m.handle(PeerReset())
    assert m.must_send_rst and m.must_abort_tcp and not m.releasable
    with pytest.raises(IllegalEvent, match="nothing after its RST"):
        m.handle(PeerFin())
    with pytest.raises(IllegalEvent, match="already sent RST"):
        m.handle(PeerReset())
    m.handle(LocalReset())  # we wanted to abort anyway: still only one RST
    m.handle(SendReset())
    assert m.releasable
    with pytest.raises(IllegalEvent, match="no RST is due"):
        m.handle(SendReset())


def test_simultaneous_reset() -> None:
    a, b = opened(Role.INGRESS), opened(Role.EGRESS)
    for m in (a, b):
        m.handle(LocalReset())
        m.handle(SendReset())
    for m in (a, b):
        m.handle(PeerReset())  # the other's RST, crossed with ours
        assert not m.must_send_rst
        assert m.releasable


def test_reset_wanted_then_peer_reset_arrives_first() -> None:
    m = opened()
    m.handle(LocalReset())
    m.handle(PeerReset())
    assert m.must_send_rst
    m.handle(SendReset())
    assert m.releasable


def test_send_reset_without_reason_is_illegal() -> None:
    m = opened()
    with pytest.raises(IllegalEvent, match="no RST is due"):
        m.handle(SendReset())


def test_reset_during_half_close() -> None:
    m = opened()
    run(m, SendFin(), PeerClosed(), LocalReset())
    assert m.must_send_rst


def test_no_rst_initiated_after_fin_and_closed_sent() -> None:
    """Once FIN and CLOSED are both sent the peer may have released: never initiate RST."""
    m = opened()
    run(m, PeerFin(), SendClosed(), SendFin())
    assert m.state is State.CLOSING
    m.handle(LocalReset("late error"))
    assert m.state is State.CLOSING
    assert not m.must_send_rst and not m.must_abort_tcp
    assert m.reset_reason is None
    m.handle(PeerClosed())
    assert m.releasable


def test_rst_is_answered_even_after_fin_and_closed_sent() -> None:
    m = opened()
    run(m, PeerFin(), SendClosed(), SendFin())
    m.handle(PeerReset())  # the peer had not sent CLOSED yet: legal
    assert m.must_send_rst
    m.handle(SendReset())
    assert m.releasable


def test_peer_must_not_initiate_rst_after_its_fin_and_closed() -> None:
    m = opened()
    run(m, SendFin(), PeerFin(), PeerClosed())
    with pytest.raises(IllegalEvent, match="may only answer"):
        m.handle(PeerReset())
    # ...but may answer ours
    m.handle(LocalReset())
    assert m.must_send_rst
    m.handle(SendReset())
    m.handle(PeerReset())
    assert m.releasable


# ------------------------------------------------------------------------ peer lost


@pytest.mark.parametrize(
    "prefix",
    [[], [PeerOpened()], [PeerOpened(), SendFin()], [LocalReset()], [PeerRefused()]],
)
def test_peer_lost_releases_at_once(prefix: list[Event]) -> None:
    m = StreamStateMachine(Role.INGRESS)
    run(m, *prefix)
    assert m.handle(PeerLost()) is State.LOST
    assert m.releasable and m.must_abort_tcp
    assert not m.must_send_rst and not m.can_send_data
    m.handle(PeerLost())
    m.handle(LocalReset())
    with pytest.raises(IllegalEvent, match="already lost"):
        m.handle(PeerFin())
    with pytest.raises(IllegalEvent, match="already lost"):
        m.handle(SendFin())


def test_unknown_event_type() -> None:
    @attrs.define(frozen=True, slots=True)
    class Bogus(Event):
        pass

    with pytest.raises(IllegalEvent, match="unknown event"):
        opened().handle(Bogus())


def test_events_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        LocalReset("x").reason = "y"  # type: ignore[misc]
    assert PeerFin() == PeerFin()
    assert PeerFin.by_peer and not SendFin.by_peer


# ------------------------------------------------------- two-leg protocol simulation


class _Leg:
    def __init__(self, name: str, role: Role) -> None:
        self.name = name
        self.m = StreamStateMachine(role)
        self.released = False


_MSG_EVENT: dict[str, type[Event]] = {
    "OPENED": PeerOpened,
    "REFUSED": PeerRefused,
    "FIN": PeerFin,
    "CLOSED": PeerClosed,
    "RST": PeerReset,
}


class _Sim:
    """Two well-behaved legs joined by two FIFO channels (RC ordering)."""

    def __init__(self) -> None:
        self.ing = _Leg("ingress", Role.INGRESS)
        self.egr: _Leg | None = None
        self.to_egr: deque[str] = deque(["OPEN"])
        self.to_ing: deque[str] = deque()

    def chan_from(self, leg: _Leg) -> deque[str]:
        return self.to_egr if leg is self.ing else self.to_ing

    def legs(self) -> list[_Leg]:
        return [self.ing] + ([self.egr] if self.egr else [])

    def after(self, leg: _Leg) -> None:
        if not leg.released and leg.m.releasable:
            leg.released = True

    # local actions; each returns whether it did anything
    def eof(self, leg: _Leg) -> bool:
        if leg.released or not leg.m.can_send_data:
            return False
        self.chan_from(leg).append("FIN")
        leg.m.handle(SendFin())
        self.after(leg)
        return True

    def drained(self, leg: _Leg) -> bool:
        if leg.released or not leg.m.shutdown_write_pending:
            return False
        self.chan_from(leg).append("CLOSED")
        leg.m.handle(SendClosed())
        self.after(leg)
        return True

    def abort(self, leg: _Leg) -> bool:
        if leg.released:
            return False
        leg.m.handle(LocalReset())
        self.after(leg)
        return True

    def flush_rst(self, leg: _Leg) -> bool:
        if leg.released or not leg.m.must_send_rst:
            return False
        self.chan_from(leg).append("RST")
        leg.m.handle(SendReset())
        self.after(leg)
        return True

    def connect(self, ok: bool) -> bool:
        e = self.egr
        if e is None or e.released or e.m.phase.value != "opening":
            return False
        if ok:
            self.to_ing.append("OPENED")
            e.m.handle(SendOpened())
        else:
            self.to_ing.append("REFUSED")
            e.m.handle(SendRefused())
        self.after(e)
        return True

    def deliver(self, to_egress: bool) -> bool:
        chan = self.to_egr if to_egress else self.to_ing
        if not chan:
            return False
        msg = chan.popleft()
        if msg == "OPEN":
            assert self.egr is None
            self.egr = _Leg("egress", Role.EGRESS)
            return True
        leg = self.egr if to_egress else self.ing
        assert leg is not None
        # the safety property: nothing ever arrives for a released slot
        assert not leg.released, f"{msg} arrived at released {leg.name} slot"
        leg.m.handle(_MSG_EVENT[msg]())  # well-behaved peers never cause IllegalEvent
        self.after(leg)
        return True

    def finish(self) -> None:
        for _ in range(100):
            if all(leg.released for leg in self.legs()) and self.egr is not None:
                assert not self.to_egr and not self.to_ing
                return
            moved = self.deliver(True) | self.deliver(False) | self.connect(True)
            for leg in self.legs():
                moved |= self.flush_rst(leg) | self.eof(leg) | self.drained(leg)
            assert moved, f"stuck: {[leg.m.describe() for leg in self.legs()]}"
        raise AssertionError("no termination")  # pragma: no cover


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.integers(0, 11), max_size=40))
def test_two_legs_random_interleavings(actions: list[int]) -> None:
    """Any interleaving of closes, aborts, refusals and deliveries: no illegal event,
    nothing delivered to a released slot, both legs eventually released."""
    sim = _Sim()
    for a in actions:
        legs = [sim.ing, sim.egr]
        leg = legs[a % 2]
        kind = a // 2
        if kind == 0:
            sim.deliver(to_egress=a % 2 == 1)
        elif leg is None:
            continue
        elif kind == 1:
            sim.eof(leg)
        elif kind == 2:
            sim.drained(leg)
        elif kind == 3:
            sim.abort(leg)
        elif kind == 4:
            sim.flush_rst(leg)
        else:
            sim.connect(ok=a % 2 == 0)
    sim.finish()
    assert sim.ing.released
    assert sim.egr is not None and sim.egr.released


def _sim_key(sim: _Sim) -> tuple[object, ...]:
    def leg_key(leg: _Leg | None) -> tuple[object, ...] | None:
        if leg is None:
            return None
        m = leg.m
        return (m.phase, m.out, m.inn, m.rst, leg.released)

    return (leg_key(sim.ing), leg_key(sim.egr), tuple(sim.to_egr), tuple(sim.to_ing))


def _leg_action(sim: _Sim, *, name: str, which: str) -> bool:
    leg = sim.ing if which == "ingress" else sim.egr
    if leg is None:
        return False
    return bool(getattr(sim, name)(leg))


_ACTIONS: list[tuple[str, Callable[[_Sim], bool]]] = [
    ("deliver->egress", lambda s: s.deliver(True)),
    ("deliver->ingress", lambda s: s.deliver(False)),
    ("connect ok", lambda s: s.connect(True)),
    ("connect fail", lambda s: s.connect(False)),
] + [
    (f"{name} {which}", functools.partial(_leg_action, name=name, which=which))
    for name in ("eof", "drained", "abort", "flush_rst")
    for which in ("ingress", "egress")
]


def test_two_legs_exhaustive_model_check() -> None:
    """Explore *every* reachable state of two legs joined by FIFO channels.

    Safety: no well-behaved action or delivery raises IllegalEvent, and no message ever
    arrives for a released slot. Liveness: from every reachable state both legs can still
    get released with empty channels.
    """
    start = _Sim()
    states: dict[tuple[object, ...], _Sim] = {_sim_key(start): start}
    trace: dict[tuple[object, ...], tuple[tuple[object, ...] | None, str]] = {
        _sim_key(start): (None, "start")
    }
    edges: dict[tuple[object, ...], set[tuple[object, ...]]] = {}
    todo = deque([_sim_key(start)])

    def path(key: tuple[object, ...]) -> list[str]:
        steps: list[str] = []
        k: tuple[object, ...] | None = key
        while k is not None:
            k, step = trace[k]
            steps.append(step)
        return steps[::-1]

    while todo:
        key = todo.popleft()
        edges[key] = set()
        for name, act in _ACTIONS:
            nxt = copy.deepcopy(states[key])
            try:
                did = act(nxt)
            except (AssertionError, IllegalEvent) as exc:
                raise AssertionError(f"{exc} after {[*path(key), name]}") from exc
            if not did:
                continue
            nkey = _sim_key(nxt)
            edges[key].add(nkey)
            if nkey not in states:
                states[nkey] = nxt
                trace[nkey] = (key, name)
                todo.append(nkey)

    def done(s: _Sim) -> bool:
        return (
            s.egr is not None
            and s.ing.released
            and s.egr.released
            and not s.to_egr
            and not s.to_ing
        )

    goals = {k for k, s in states.items() if done(s)}
    assert goals
    # reverse reachability from the goal states
    reverse: dict[tuple[object, ...], set[tuple[object, ...]]] = {k: set() for k in states}
    for k, succ in edges.items():
        for n in succ:
            reverse[n].add(k)
    can_finish = set(goals)
    stack = list(goals)
    while stack:
        for p in reverse[stack.pop()]:
            if p not in can_finish:
                can_finish.add(p)
                stack.append(p)
    stuck = [k for k in states if k not in can_finish]
    assert not stuck, f"{len(stuck)} states cannot finish, e.g. after {path(stuck[0])}"
    assert len(states) > 100  # the exploration really ran
