"""The global sockets registry (no I/O): one row per stream leg held by this node.

A row is keyed by the local slot (the stream id on this node) and pairs it with the peer's
slot for the same stream. The registry owns the `SlotAllocator`: `add` allocates a slot,
`release_if_done` frees it once the stream's state machine says the peer can no longer write
into it, `peer_lost` resets and frees every stream of a dead peer connection.

Time is passed in (``now``, seconds, any monotonic or wall clock the caller chooses); the
registry never reads a clock. `snapshot` gives JSON-ready dicts for ``rdmaproxy status``;
`format_table` / `format_totals` render them.

*Direct* streams (the proxy dialled the destination itself over TCP: no peer, no pool slot)
are kept beside the slot rows as `DirectRow`s, keyed by a local id: `add_direct` /
`remove_direct`. They appear in `snapshot` (role ``"direct"``, ``slot`` None) and `totals`
(``streams``, ``by_state``, byte counts, and ``direct_streams``), but not in the slot-row views
(`get`, `find`, `lookup`, iteration, ``len``), which remain about slot-holding legs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from rdmaproxy.errors import ProtocolViolation
from rdmaproxy.pool import SlotAllocator, format_size
from rdmaproxy.stream_state import Event, PeerLost, Role, State, StreamStateMachine

__all__ = [
    "DIRECT_ROLE",
    "DirectRow",
    "Endpoint",
    "Registry",
    "StreamRow",
    "UnknownStream",
    "format_age",
    "format_endpoint",
    "format_table",
    "format_totals",
]

#: (host, port)
Endpoint = tuple[str, int]


#: The ``role`` of direct streams in `Registry.snapshot` rows.
DIRECT_ROLE = "direct"


class UnknownStream(ProtocolViolation):
    """The peer named a slot that holds no stream of that peer."""


def format_endpoint(ep: Endpoint | Mapping[str, Any] | None) -> str:
    """``host:port`` (IPv6 in brackets); ``-`` for None."""
    if ep is None:
        return "-"
    if isinstance(ep, Mapping):
        host, port = str(ep["host"]), int(ep["port"])
    else:
        host, port = ep
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


def _endpoint_dict(ep: Endpoint | None) -> dict[str, Any] | None:
    return None if ep is None else {"host": ep[0], "port": ep[1]}


@attrs.define(slots=True)
class StreamRow:
    """One stream leg. Mutable: the owner updates counters and peer details in place."""

    slot: int
    role: Role
    peer: str
    dest: Endpoint
    machine: StreamStateMachine
    opened_at: float
    local_ring_offset: int
    local_ring_size: int
    #: The SOCKS client (ingress legs); None on egress legs.
    client: Endpoint | None = None
    #: The peer's slot for this stream (ingress: known after OPENED).
    peer_slot: int | None = None
    #: Absolute address of the peer's ring for this stream, and its size.
    peer_ring_addr: int | None = None
    peer_ring_size: int | None = None
    #: Bound address reported by OPENED (ingress) or of the egress socket.
    bound: Endpoint | None = None
    bytes_client_to_remote: int = 0
    bytes_remote_to_client: int = 0

    @property
    def state(self) -> State:
        return self.machine.state

    def record_sent(self, n: int) -> None:
        """``n`` bytes read from this leg's TCP socket were written to the peer."""
        if self.role is Role.INGRESS:
            self.bytes_client_to_remote += n
        else:
            self.bytes_remote_to_client += n

    def record_delivered(self, n: int) -> None:
        """``n`` bytes from the peer were written to this leg's TCP socket."""
        if self.role is Role.INGRESS:
            self.bytes_remote_to_client += n
        else:
            self.bytes_client_to_remote += n

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """JSON-ready view of the row (``age_s`` only when ``now`` is given)."""
        d: dict[str, Any] = {
            "slot": self.slot,
            "role": self.role.value,
            "peer": self.peer,
            "peer_slot": self.peer_slot,
            "state": self.state.value,
            "client": _endpoint_dict(self.client),
            "dest": _endpoint_dict(self.dest),
            "bound": _endpoint_dict(self.bound),
            "bytes_client_to_remote": self.bytes_client_to_remote,
            "bytes_remote_to_client": self.bytes_remote_to_client,
            "local_ring_offset": self.local_ring_offset,
            "local_ring_size": self.local_ring_size,
            "peer_ring_addr": self.peer_ring_addr,
            "peer_ring_size": self.peer_ring_size,
            "opened_at": self.opened_at,
            "reset_reason": self.machine.reset_reason,
        }
        if now is not None:
            d["age_s"] = max(0.0, now - self.opened_at)
        return d


@attrs.define(slots=True)
class DirectRow:
    """A stream carried over plain TCP by this node itself: no peer, no pool slot.

    ``state`` is OPENING until the destination connected, then OPEN; the row is removed when
    the stream ends. Mutable like `StreamRow`: the owner updates it in place.
    """

    id: int
    dest: Endpoint
    opened_at: float
    client: Endpoint | None = None
    bound: Endpoint | None = None
    state: State = State.OPENING
    bytes_client_to_remote: int = 0
    bytes_remote_to_client: int = 0

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """Same keys as `StreamRow.to_dict` (slot, peer and ring fields None) plus ``id``."""
        d: dict[str, Any] = {
            "slot": None,
            "id": self.id,
            "role": DIRECT_ROLE,
            "peer": None,
            "peer_slot": None,
            "state": self.state.value,
            "client": _endpoint_dict(self.client),
            "dest": _endpoint_dict(self.dest),
            "bound": _endpoint_dict(self.bound),
            "bytes_client_to_remote": self.bytes_client_to_remote,
            "bytes_remote_to_client": self.bytes_remote_to_client,
            "local_ring_offset": None,
            "local_ring_size": None,
            "peer_ring_addr": None,
            "peer_ring_size": None,
            "opened_at": self.opened_at,
            "reset_reason": None,
        }
        if now is not None:
            d["age_s"] = max(0.0, now - self.opened_at)
        return d


@attrs.define(slots=True, init=False)
class Registry:
    """All stream legs of this node, keyed by local slot (plus direct streams, by id)."""

    allocator: SlotAllocator
    _rows: dict[int, StreamRow]
    _direct: dict[int, DirectRow]
    _next_direct_id: int

    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        self._rows = {}
        self._direct = {}
        self._next_direct_id = 1

    # ---------------------------------------------------------------------- rows

    def add(
        self,
        *,
        role: Role,
        peer: str,
        dest: Endpoint,
        now: float,
        client: Endpoint | None = None,
        peer_slot: int | None = None,
        peer_ring_addr: int | None = None,
        peer_ring_size: int | None = None,
    ) -> StreamRow | None:
        """Allocate a slot and register a new stream leg in OPENING; None if the pool is full.

        Egress legs pass the opener's ``peer_slot`` / ``peer_ring_addr`` from OPEN; a peer
        slot that is still live for ``peer`` is a ProtocolViolation (nothing is allocated).
        """
        if peer_slot is not None:
            self._check_peer_slot_unused(peer, peer_slot)
        slot = self.allocator.alloc()
        if slot is None:
            return None
        row = StreamRow(
            slot=slot,
            role=role,
            peer=peer,
            dest=dest,
            machine=StreamStateMachine(role),
            opened_at=now,
            local_ring_offset=self.allocator.ring_offset(slot),
            local_ring_size=self.allocator.ring_size,
            client=client,
            peer_slot=peer_slot,
            peer_ring_addr=peer_ring_addr,
            peer_ring_size=peer_ring_size,
        )
        self._rows[slot] = row
        return row

    def _check_peer_slot_unused(self, peer: str, peer_slot: int) -> None:
        other = self.find_by_peer_slot(peer, peer_slot)
        if other is not None:
            raise ProtocolViolation(
                f"peer {peer} reuses its slot {peer_slot} while local stream {other.slot} "
                f"({other.state.value}) still pairs with it"
            )

    def attach_peer(
        self,
        slot: int,
        *,
        peer_slot: int,
        peer_ring_addr: int,
        peer_ring_size: int | None = None,
        bound: Endpoint | None = None,
    ) -> StreamRow:
        """Record the peer's leg (ingress, on OPENED)."""
        row = self.get(slot)
        if row.peer_slot is not None and row.peer_slot != peer_slot:
            raise ProtocolViolation(
                f"stream {slot} already pairs with peer slot {row.peer_slot}, not {peer_slot}"
            )
        if row.peer_slot is None:
            self._check_peer_slot_unused(row.peer, peer_slot)
        row.peer_slot = peer_slot
        row.peer_ring_addr = peer_ring_addr
        if peer_ring_size is not None:
            row.peer_ring_size = peer_ring_size
        if bound is not None:
            row.bound = bound
        return row

    def get(self, slot: int) -> StreamRow:
        """The row of local ``slot``; KeyError if there is none."""
        try:
            return self._rows[slot]
        except KeyError:
            raise KeyError(f"no stream in local slot {slot}") from None

    def find(self, slot: int) -> StreamRow | None:
        return self._rows.get(slot)

    def lookup(self, peer: str, slot: int) -> StreamRow:
        """The row of local ``slot`` named by a message from ``peer``.

        UnknownStream (a ProtocolViolation) when the slot is free or belongs to another peer.
        """
        row = self._rows.get(slot)
        if row is None:
            raise UnknownStream(f"peer {peer} named local slot {slot}, which holds no stream")
        if row.peer != peer:
            raise UnknownStream(
                f"peer {peer} named local slot {slot}, which belongs to peer {row.peer}"
            )
        return row

    def find_by_peer_slot(self, peer: str, peer_slot: int) -> StreamRow | None:
        for row in self._rows.values():
            if row.peer == peer and row.peer_slot == peer_slot:
                return row
        return None

    def streams_of(self, peer: str) -> list[StreamRow]:
        return [row for row in self._rows.values() if row.peer == peer]

    # ---------------------------------------------------------------------- direct

    def add_direct(
        self, *, dest: Endpoint, now: float, client: Endpoint | None = None
    ) -> DirectRow:
        """Register a direct stream (state OPENING); it holds no slot, so this never fails."""
        row = DirectRow(id=self._next_direct_id, dest=dest, opened_at=now, client=client)
        self._next_direct_id += 1
        self._direct[row.id] = row
        return row

    def remove_direct(self, row_id: int) -> DirectRow | None:
        """Forget the direct stream ``row_id``; returns it (None if it was not registered)."""
        return self._direct.pop(row_id, None)

    def direct_streams(self) -> list[DirectRow]:
        """The direct streams, ordered by id."""
        return [self._direct[i] for i in sorted(self._direct)]

    # ---------------------------------------------------------------------- state

    def handle(self, slot: int, event: Event) -> State:
        """Feed ``event`` to the stream in ``slot`` (IllegalEvent propagates)."""
        return self.get(slot).machine.handle(event)

    def release_if_done(self, slot: int) -> bool:
        """Remove the row and free its slot if its state machine says so; report whether."""
        row = self._rows.get(slot)
        if row is None or not row.machine.releasable:
            return False
        del self._rows[slot]
        self.allocator.free(slot)
        return True

    def peer_lost(self, peer: str) -> list[StreamRow]:
        """The connection to ``peer`` died: mark its streams LOST, free their slots.

        Returns the removed rows; the caller aborts their TCP sockets (SO_LINGER 0).
        """
        rows = self.streams_of(peer)
        for row in rows:
            row.machine.handle(PeerLost())
            del self._rows[row.slot]
            self.allocator.free(row.slot)
        return rows

    # ---------------------------------------------------------------------- views

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[StreamRow]:
        return iter(list(self._rows.values()))

    def __contains__(self, slot: object) -> bool:
        return slot in self._rows

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        """All rows as JSON-ready dicts: slot rows ordered by slot, then direct rows by id."""
        rows = [self._rows[s].to_dict(now) for s in sorted(self._rows)]
        rows.extend(row.to_dict(now) for row in self.direct_streams())
        return rows

    def totals(self) -> dict[str, Any]:
        """Stream counts (total, per state, direct), slot usage, byte totals (all streams)."""
        rows: list[StreamRow | DirectRow] = [*self._rows.values(), *self._direct.values()]
        by_state: dict[str, int] = {}
        for row in rows:
            by_state[row.state.value] = by_state.get(row.state.value, 0) + 1
        return {
            "streams": len(rows),
            "direct_streams": len(self._direct),
            "by_state": dict(sorted(by_state.items())),
            "slots_total": self.allocator.n_slots,
            "slots_used": self.allocator.in_use,
            "slots_free": self.allocator.free_count,
            "ring_size": self.allocator.ring_size,
            "bytes_client_to_remote": sum(r.bytes_client_to_remote for r in rows),
            "bytes_remote_to_client": sum(r.bytes_remote_to_client for r in rows),
        }


# ------------------------------------------------------------------------- rendering

_MAX_CELL = 40


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 3] + "..."


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


_COLUMNS: tuple[tuple[str, bool], ...] = (
    # (header, right-aligned)
    ("SLOT", True),
    ("ROLE", False),
    ("PEER", False),
    ("PSLOT", True),
    ("STATE", False),
    ("CLIENT", False),
    ("DEST", False),
    ("C->R", True),
    ("R->C", True),
    ("AGE", True),
)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render `Registry.snapshot` rows as an aligned text table (one line per stream)."""
    cells: list[list[str]] = [[h for h, _ in _COLUMNS]]
    for r in rows:
        peer_slot = r.get("peer_slot")
        slot = r.get("slot")
        peer = r.get("peer")
        cells.append(
            [
                "-" if slot is None else str(slot),
                str(r["role"]),
                "-" if peer is None else _clip(str(peer)),
                "-" if peer_slot is None else str(peer_slot),
                str(r["state"]),
                _clip(format_endpoint(r.get("client"))),
                _clip(format_endpoint(r.get("dest"))),
                format_size(int(r["bytes_client_to_remote"])),
                format_size(int(r["bytes_remote_to_client"])),
                format_age(r.get("age_s")),
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = []
    for line in cells:
        parts = [
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, (_, right) in zip(line, widths, _COLUMNS, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    if not rows:
        lines.append("(no streams)")
    return "\n".join(lines)


def format_totals(totals: Mapping[str, Any], *, slots: bool = True) -> str:
    """One line summarising `Registry.totals`; ``slots=False`` leaves out the pool slot usage
    (for a proxy without a pool, whose streams are all direct)."""
    by_state = ", ".join(f"{k} {v}" for k, v in totals.get("by_state", {}).items())
    streams = f"{totals['streams']} streams" + (f" ({by_state})" if by_state else "")
    direct = int(totals.get("direct_streams", 0))
    if direct and direct != int(totals["streams"]):
        streams += f", {direct} direct"
    pool = ""
    if slots:
        pool = (
            f"pool slots {totals['slots_used']} used / {totals['slots_free']} free "
            f"of {totals['slots_total']} ({format_size(int(totals['ring_size']))} rings); "
        )
    return (
        f"{streams}; {pool}"
        f"client->remote {format_size(int(totals['bytes_client_to_remote']))}, "
        f"remote->client {format_size(int(totals['bytes_remote_to_client']))}"
    )
