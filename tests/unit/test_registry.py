"""Unit tests of rdmaproxy.registry."""

from __future__ import annotations

import json

import pytest

from rdmaproxy.errors import ProtocolViolation
from rdmaproxy.pool import PAGE_SIZE, SlotAllocator
from rdmaproxy.registry import (
    Registry,
    UnknownStream,
    format_age,
    format_endpoint,
    format_table,
    format_totals,
)
from rdmaproxy.stream_state import (
    IllegalEvent,
    LocalReset,
    PeerClosed,
    PeerFin,
    PeerOpened,
    PeerReset,
    Role,
    SendClosed,
    SendFin,
    SendOpened,
    SendReset,
    State,
)

RING = 64 * 1024


def make_registry(n_slots: int = 4) -> Registry:
    return Registry(SlotAllocator(PAGE_SIZE + n_slots * RING, RING))


def add_ingress(reg: Registry, peer: str = "nodeB", now: float = 100.0) -> int:
    row = reg.add(
        role=Role.INGRESS,
        peer=peer,
        dest=("example.com", 443),
        client=("192.0.2.7", 50123),
        now=now,
    )
    assert row is not None
    return row.slot


def test_add_ingress_and_attach_peer() -> None:
    reg = make_registry()
    slot = add_ingress(reg)
    row = reg.get(slot)
    assert row.role is Role.INGRESS and row.state is State.OPENING
    assert row.local_ring_offset == reg.allocator.ring_offset(slot)
    assert row.local_ring_size == RING
    assert row.peer_slot is None
    reg.attach_peer(slot, peer_slot=9, peer_ring_addr=0x7F00_0000_1000, bound=("10.0.0.2", 80))
    assert reg.handle(slot, PeerOpened()) is State.OPEN
    assert row.peer_slot == 9 and row.peer_ring_addr == 0x7F00_0000_1000
    assert row.bound == ("10.0.0.2", 80)
    assert reg.find_by_peer_slot("nodeB", 9) is row
    assert reg.find_by_peer_slot("nodeC", 9) is None
    assert slot in reg and len(reg) == 1
    assert list(reg) == [row]


def test_add_egress_with_peer_slot() -> None:
    reg = make_registry()
    row = reg.add(
        role=Role.EGRESS,
        peer="nodeA",
        dest=("10.1.1.1", 22),
        now=5.0,
        peer_slot=3,
        peer_ring_addr=0x1000,
        peer_ring_size=RING,
    )
    assert row is not None
    assert row.client is None and row.peer_slot == 3 and row.peer_ring_size == RING
    reg.handle(row.slot, SendOpened())
    # the peer reusing slot 3 while our leg still pairs with it is a violation
    with pytest.raises(ProtocolViolation, match="reuses its slot 3"):
        reg.add(role=Role.EGRESS, peer="nodeA", dest=("h", 1), now=6.0, peer_slot=3)
    assert reg.allocator.in_use == 1  # nothing allocated for the bad OPEN
    # another peer may use the same slot number
    assert reg.add(role=Role.EGRESS, peer="nodeC", dest=("h", 1), now=6.0, peer_slot=3)


def test_attach_peer_conflicts() -> None:
    reg = make_registry()
    a = add_ingress(reg)
    b = add_ingress(reg)
    reg.attach_peer(a, peer_slot=1, peer_ring_addr=1)
    reg.attach_peer(a, peer_slot=1, peer_ring_addr=1)  # repeating is fine
    with pytest.raises(ProtocolViolation, match="already pairs with peer slot 1"):
        reg.attach_peer(a, peer_slot=2, peer_ring_addr=1)
    with pytest.raises(ProtocolViolation, match="reuses its slot 1"):
        reg.attach_peer(b, peer_slot=1, peer_ring_addr=1)


def test_pool_exhaustion_returns_none() -> None:
    reg = make_registry(n_slots=2)
    add_ingress(reg)
    add_ingress(reg)
    assert reg.add(role=Role.INGRESS, peer="p", dest=("h", 1), now=0) is None
    assert reg.totals()["slots_free"] == 0


def test_lookup_checks_owner() -> None:
    reg = make_registry()
    slot = add_ingress(reg, peer="nodeB")
    assert reg.lookup("nodeB", slot).slot == slot
    with pytest.raises(UnknownStream, match="belongs to peer nodeB"):
        reg.lookup("nodeC", slot)
    with pytest.raises(UnknownStream, match="holds no stream"):
        reg.lookup("nodeB", 3)
    assert issubclass(UnknownStream, ProtocolViolation)
    with pytest.raises(KeyError, match="no stream in local slot 3"):
        reg.get(3)
    assert reg.find(3) is None


def test_release_only_when_state_machine_allows() -> None:
    reg = make_registry()
    slot = add_ingress(reg)
    reg.attach_peer(slot, peer_slot=0, peer_ring_addr=0)
    reg.handle(slot, PeerOpened())
    assert not reg.release_if_done(slot)
    for event in (SendFin(), PeerFin(), SendClosed()):
        reg.handle(slot, event)
        assert not reg.release_if_done(slot)
    reg.handle(slot, PeerClosed())
    assert reg.release_if_done(slot)
    assert slot not in reg
    assert reg.allocator.in_use == 0
    assert not reg.release_if_done(slot)  # already gone: no double free


def test_release_after_reset() -> None:
    reg = make_registry()
    slot = add_ingress(reg)
    reg.attach_peer(slot, peer_slot=0, peer_ring_addr=0)
    reg.handle(slot, PeerOpened())
    reg.handle(slot, PeerReset())
    assert reg.get(slot).machine.must_send_rst
    assert not reg.release_if_done(slot)
    reg.handle(slot, SendReset())
    assert reg.release_if_done(slot)


def test_illegal_event_propagates() -> None:
    reg = make_registry()
    slot = add_ingress(reg)
    with pytest.raises(IllegalEvent):
        reg.handle(slot, PeerFin())


def test_peer_lost() -> None:
    reg = make_registry()
    b1 = add_ingress(reg, peer="nodeB")
    c1 = add_ingress(reg, peer="nodeC")
    b2 = add_ingress(reg, peer="nodeB")
    lost = reg.peer_lost("nodeB")
    assert sorted(r.slot for r in lost) == sorted([b1, b2])
    assert all(r.state is State.LOST and r.machine.must_abort_tcp for r in lost)
    assert list(reg) == [reg.get(c1)]
    assert reg.allocator.in_use == 1
    assert reg.peer_lost("nodeB") == []


def test_byte_counters_follow_role() -> None:
    reg = make_registry()
    ing = reg.get(add_ingress(reg))
    egr = reg.add(role=Role.EGRESS, peer="nodeA", dest=("h", 1), now=0, peer_slot=0)
    assert egr is not None
    ing.record_sent(100)  # client -> peer
    ing.record_delivered(7)  # peer -> client
    egr.record_sent(5)  # destination -> peer, i.e. towards the client
    egr.record_delivered(40)  # peer -> destination
    assert (ing.bytes_client_to_remote, ing.bytes_remote_to_client) == (100, 7)
    assert (egr.bytes_client_to_remote, egr.bytes_remote_to_client) == (40, 5)
    totals = reg.totals()
    assert totals["bytes_client_to_remote"] == 140
    assert totals["bytes_remote_to_client"] == 12


def test_snapshot_is_json_ready() -> None:
    reg = make_registry()
    slot = add_ingress(reg, now=100.0)
    reg.attach_peer(slot, peer_slot=2, peer_ring_addr=0xABC)
    reg.handle(slot, PeerOpened())
    reg.get(slot).record_sent(1536)
    egr = reg.add(role=Role.EGRESS, peer="nodeA", dest=("2001:db8::1", 80), now=40.0, peer_slot=1)
    assert egr is not None
    reg.handle(egr.slot, LocalReset("tcp connect failed"))
    snap = reg.snapshot(now=160.0)
    assert json.loads(json.dumps(snap)) == snap
    assert [r["slot"] for r in snap] == sorted(r["slot"] for r in snap)
    first = snap[0]
    assert first["state"] == "OPEN"
    assert first["role"] == "ingress"
    assert first["client"] == {"host": "192.0.2.7", "port": 50123}
    assert first["dest"] == {"host": "example.com", "port": 443}
    assert first["bytes_client_to_remote"] == 1536
    assert first["peer_ring_addr"] == 0xABC
    assert first["age_s"] == 60.0
    assert snap[1]["reset_reason"] == "tcp connect failed"
    assert snap[1]["client"] is None
    assert "age_s" not in reg.snapshot()[0]


def test_totals() -> None:
    reg = make_registry()
    a = add_ingress(reg)
    add_ingress(reg)
    reg.handle(a, LocalReset())
    t = reg.totals()
    assert t["streams"] == 2
    assert t["by_state"] == {"OPENING": 1, "RESET": 1}
    assert (t["slots_total"], t["slots_used"], t["slots_free"]) == (4, 2, 2)
    line = format_totals(t)
    assert "2 streams (OPENING 1, RESET 1)" in line
    assert "pool slots 2 used / 2 free of 4 (64 KiB rings)" in line


def test_format_table() -> None:
    reg = make_registry()
    slot = add_ingress(reg, now=0.0)
    reg.get(slot).record_sent(5 * 1024 * 1024)
    egr = reg.add(
        role=Role.EGRESS, peer="nodeA-with-a-name", dest=("::1", 8080), now=0.0, peer_slot=12
    )
    assert egr is not None
    egr.record_delivered(10)
    out = format_table(reg.snapshot(now=3725.0))
    lines = out.splitlines()
    assert len(lines) == 3
    header = lines[0]
    assert header.split() == [
        "SLOT",
        "ROLE",
        "PEER",
        "PSLOT",
        "STATE",
        "CLIENT",
        "DEST",
        "C->R",
        "R->C",
        "AGE",
    ]
    # fixed-width columns: every column starts at the same offset on every line
    dest_col = header.index("DEST")
    assert lines[1][dest_col:].startswith("example.com:443")
    assert lines[2][dest_col:].startswith("[::1]:8080")
    assert "5 MiB" in lines[1] and "192.0.2.7:50123" in lines[1]
    assert "10 B" in lines[2] and "  12  " in lines[2]
    assert lines[1].endswith("1h02m") and lines[2].endswith("1h02m")
    assert "OPENING" in lines[1]


def test_format_table_empty_and_long_cells() -> None:
    assert format_table([]).splitlines()[-1] == "(no streams)"
    reg = make_registry()
    row = reg.add(role=Role.INGRESS, peer="p", dest=("x" * 100 + ".example", 1), now=0)
    assert row is not None
    line = format_table(reg.snapshot()).splitlines()[1]
    assert "..." in line and "x" * 50 not in line
    assert line.rstrip().endswith("-")  # no age without `now`


def test_format_helpers() -> None:
    assert format_endpoint(None) == "-"
    assert format_endpoint(("1.2.3.4", 5)) == "1.2.3.4:5"
    assert format_endpoint({"host": "fe80::1", "port": 9}) == "[fe80::1]:9"
    assert format_endpoint(("name", 1)) == "name:1"
    assert format_age(None) == "-"
    assert format_age(59.9) == "59s"
    assert format_age(61) == "1m01s"
    assert format_age(3600 * 5 + 60 * 7) == "5h07m"
    assert format_age(86400 * 2 + 3600 * 3) == "2d03h"
