"""Direct streams in the registry: rows without a peer or a pool slot."""

from __future__ import annotations

import json

from rdmaproxy.pool import PAGE_SIZE, SlotAllocator
from rdmaproxy.registry import DIRECT_ROLE, Registry, format_table, format_totals
from rdmaproxy.stream_state import Role, State

RING = 64 * 1024


def make_registry(n_slots: int = 2) -> Registry:
    return Registry(SlotAllocator(PAGE_SIZE + n_slots * RING, RING))


def test_direct_rows_take_no_slot_and_never_fail() -> None:
    reg = make_registry(n_slots=1)
    rows = [reg.add_direct(dest=("example.com", 80), now=1.0) for _ in range(5)]
    assert [r.id for r in rows] == [1, 2, 3, 4, 5]
    assert reg.allocator.in_use == 0 and reg.allocator.free_count == 1
    assert len(reg) == 0 and list(reg) == []  # slot-row views are unaffected
    assert reg.direct_streams() == rows
    assert all(r.state is State.OPENING for r in rows)


def test_remove_direct_is_idempotent_and_ids_are_not_reused() -> None:
    reg = make_registry()
    a = reg.add_direct(dest=("a", 1), now=0.0)
    assert reg.remove_direct(a.id) is a
    assert reg.remove_direct(a.id) is None
    b = reg.add_direct(dest=("b", 2), now=0.0)
    assert b.id == a.id + 1
    assert reg.direct_streams() == [b]


def test_snapshot_lists_slot_rows_then_direct_rows() -> None:
    reg = make_registry()
    d = reg.add_direct(dest=("10.0.0.9", 22), client=("127.0.0.1", 40000), now=10.0)
    d.state = State.OPEN
    d.bound = ("127.0.0.1", 51000)
    d.bytes_client_to_remote += 7
    d.bytes_remote_to_client += 9
    ingress = reg.add(role=Role.INGRESS, peer="nodeB", dest=("x", 1), now=0.0)
    assert ingress is not None
    snap = reg.snapshot(now=12.5)
    assert json.loads(json.dumps(snap)) == snap
    assert [r["role"] for r in snap] == ["ingress", DIRECT_ROLE]
    row = snap[1]
    assert row["slot"] is None and row["peer"] is None and row["id"] == d.id
    assert row["state"] == "OPEN"
    assert row["client"] == {"host": "127.0.0.1", "port": 40000}
    assert row["bound"] == {"host": "127.0.0.1", "port": 51000}
    assert row["age_s"] == 2.5
    assert set(snap[0]) <= set(row)  # same keys as slot rows (plus "id")


def test_totals_count_direct_streams() -> None:
    reg = make_registry()
    d = reg.add_direct(dest=("a", 1), now=0.0)
    d.bytes_client_to_remote = 100
    reg.add_direct(dest=("b", 1), now=0.0).state = State.OPEN
    row = reg.add(role=Role.INGRESS, peer="p", dest=("c", 1), now=0.0)
    assert row is not None
    row.record_sent(5)
    t = reg.totals()
    assert t["streams"] == 3 and t["direct_streams"] == 2
    assert t["by_state"] == {"OPEN": 1, "OPENING": 2}
    assert t["slots_used"] == 1
    assert t["bytes_client_to_remote"] == 105
    assert "3 streams (OPEN 1, OPENING 2), 2 direct; pool slots 1 used" in format_totals(t)


def test_format_totals_without_slots_and_table_dashes() -> None:
    reg = make_registry()
    reg.add_direct(dest=("example.org", 443), client=("127.0.0.1", 5), now=0.0)
    t = reg.totals()
    line = format_totals(t, slots=False)
    assert line.startswith("1 streams (OPENING 1); client->remote 0 B")
    assert "pool" not in line and "direct" not in line  # all streams are direct: no repetition
    table = format_table(reg.snapshot(now=61.0)).splitlines()
    assert len(table) == 2
    cells = table[1].split()
    assert cells[:4] == ["-", "direct", "-", "-"]
    assert cells[4:7] == ["OPENING", "127.0.0.1:5", "example.org:443"]
    assert cells[-1] == "1m01s"
