"""Unit tests of rdmaproxy.pool: layout, slot allocator, PinnedPool."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rdmaproxy.pool as pool_mod
from rdmaproxy.errors import PoolError
from rdmaproxy.pool import (
    CTRL_BLOCK_SIZE,
    PAGE_SIZE,
    PinnedPool,
    PoolLayout,
    SlotAllocator,
    format_size,
)

MiB = 1 << 20

# ------------------------------------------------------------------------ layout


def test_default_layout() -> None:
    a = SlotAllocator(64 * MiB, MiB)
    # 64 rings would need 64 MiB + one page of control blocks: 63 fit
    assert a.n_slots == 63
    assert a.ctrl_area_size == PAGE_SIZE
    assert a.ring_offset(0) == PAGE_SIZE
    assert a.ring_offset(62) == PAGE_SIZE + 62 * MiB
    assert a.ctrl_offset(0) == 0
    assert a.ctrl_offset(62) == 62 * CTRL_BLOCK_SIZE
    assert a.layout.used_size <= 64 * MiB


def test_layout_with_multi_page_ctrl_area() -> None:
    lay = PoolLayout.compute(1 << 30, 4096)
    # n rings of one page + ceil(64 n / 4096) pages of control blocks <= 2**18 pages
    assert lay.n_slots == 258111  # 258111 + ceil(258111 / 64) == 2**18
    assert lay.ctrl_area_size == 4033 * PAGE_SIZE
    assert lay.used_size <= 1 << 30


def test_layout_exact_fit() -> None:
    lay = PoolLayout.compute(PAGE_SIZE + 2 * MiB, MiB)
    assert lay.n_slots == 2
    assert lay.used_size == lay.pool_size


@pytest.mark.parametrize("ring", [0, 1000, 3 * MiB, 2048, 2**32, -4096])
def test_bad_ring_size(ring: int) -> None:
    with pytest.raises(ValueError, match="ring size must be a power of two between"):
        SlotAllocator(64 * MiB, ring)


def test_bad_pool_size() -> None:
    with pytest.raises(ValueError, match="pool size must be positive"):
        SlotAllocator(0, MiB)
    with pytest.raises(ValueError, match=r"cannot hold a single ring of 1 MiB.*need at least"):
        SlotAllocator(MiB, MiB)
    with pytest.raises(ValueError, match="integer"):
        SlotAllocator(1.5, MiB)  # type: ignore[arg-type]


@given(
    pool_size=st.integers(1, 1 << 34),
    ring_shift=st.integers(12, 24),
)
def test_layout_properties(pool_size: int, ring_shift: int) -> None:
    ring = 1 << ring_shift
    try:
        lay = PoolLayout.compute(pool_size, ring)
    except ValueError:
        assert pool_size < PAGE_SIZE + ring
        return
    n = lay.n_slots
    assert n >= 1
    assert lay.ctrl_area_size % PAGE_SIZE == 0
    assert lay.ctrl_area_size >= n * CTRL_BLOCK_SIZE
    assert lay.ring_offset(0) == lay.ctrl_area_size
    assert lay.ring_offset(n - 1) + ring <= pool_size
    # maximal: one more slot would not fit
    more = -(-(n + 1) * CTRL_BLOCK_SIZE // PAGE_SIZE) * PAGE_SIZE + (n + 1) * ring
    assert more > pool_size
    with pytest.raises(ValueError, match="out of range"):
        lay.ring_offset(n)
    with pytest.raises(ValueError, match="out of range"):
        lay.ctrl_offset(-1)


# ------------------------------------------------------------------------ allocator


def test_alloc_until_exhausted_and_free() -> None:
    a = SlotAllocator(PAGE_SIZE + 4 * 4096, 4096)
    assert a.n_slots == 4
    slots = [a.alloc() for _ in range(4)]
    assert slots == [0, 1, 2, 3]
    assert a.in_use == 4 and a.free_count == 0
    assert a.alloc() is None
    a.free(2)
    assert a.in_use == 3 and a.free_count == 1
    assert not a.is_allocated(2)
    assert a.alloc() == 2
    assert a.is_allocated(2)


def test_reuse_is_fifo() -> None:
    a = SlotAllocator(PAGE_SIZE + 4 * 4096, 4096)
    for _ in range(4):
        a.alloc()
    a.free(3)
    a.free(1)
    assert a.alloc() == 3  # least recently freed first
    assert a.alloc() == 1


def test_double_free_and_bad_slot() -> None:
    a = SlotAllocator(PAGE_SIZE + 4 * 4096, 4096)
    s = a.alloc()
    assert s is not None
    a.free(s)
    with pytest.raises(ValueError, match="double free"):
        a.free(s)
    with pytest.raises(ValueError, match="not allocated"):
        a.free(1)
    with pytest.raises(ValueError, match="out of range"):
        a.free(4)
    assert a.free_count == 4 and a.in_use == 0


@given(st.lists(st.booleans(), max_size=200))
def test_allocator_invariants(ops: list[bool]) -> None:
    a = SlotAllocator(PAGE_SIZE + 8 * 4096, 4096)
    held: list[int] = []
    for do_alloc in ops:
        if do_alloc:
            s = a.alloc()
            if len(held) == a.n_slots:
                assert s is None
            else:
                assert s is not None and s not in held
                held.append(s)
        elif held:
            a.free(held.pop(0))
        assert a.in_use == len(held)
        assert a.in_use + a.free_count == a.n_slots


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1024) == "1 KiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(64 * MiB) == "64 MiB"
    assert format_size(5 << 40) == "5 TiB"


# ------------------------------------------------------------------------ PinnedPool


def _vm_locked_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def test_pinned_pool_real() -> None:
    size = MiB
    try:
        p = PinnedPool(size)
    except PoolError as exc:
        # a small RLIMIT_MEMLOCK without CAP_IPC_LOCK: the message must say so
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        assert soft != resource.RLIM_INFINITY and soft < 2 * size
        msg = str(exc)
        assert "ulimit -l" in msg and "RLIMIT_MEMLOCK" in msg and str(size) in msg
        return
    locked_kib = _vm_locked_kib()
    with p:
        assert p.size == size and not p.closed
        assert len(p.buffer) == size
        assert p.address % PAGE_SIZE == 0
        view = p.memoryview(4096, 8)
        view[:] = b"RDMAPROX"
        view.release()
        # the address is where the bytes really are
        assert ctypes.string_at(p.address + 4096, 8) == b"RDMAPROX"
        ctypes.memmove(p.address + 100, b"xyz", 3)
        assert bytes(p.buffer[100:103]) == b"xyz"
        if locked_kib is not None:
            assert locked_kib >= size // 1024
        assert repr(p).startswith("<PinnedPool 1 MiB at 0x")
    assert p.closed
    p.close()  # idempotent
    with pytest.raises(PoolError, match="closed"):
        p.memoryview(0, 1)


def test_pinned_pool_bounds() -> None:
    with PinnedPool(64 * 1024, lock=False) as p:
        with pytest.raises(ValueError, match="outside the pool"):
            p.memoryview(64 * 1024 - 4, 8)
        with pytest.raises(ValueError, match="outside the pool"):
            p.memoryview(-1, 1)
        assert len(p.memoryview(0, 64 * 1024)) == 64 * 1024


def test_pinned_pool_close_with_exported_view() -> None:
    p = PinnedPool(64 * 1024, lock=False)
    view = p.memoryview(0, 16)
    with pytest.raises(PoolError, match="memoryviews"):
        p.close()
    assert not p.closed
    view[0] = 1  # still mapped and usable
    view.release()
    p.close()
    assert p.closed


def _low_memlock_child() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
    if os.geteuid() == 0:  # root would ignore the limit (CAP_IPC_LOCK)
        os.setgid(65534)
        os.setuid(65534)


def test_pinned_pool_real_low_memlock_limit() -> None:
    """A real mlock failure under a 64 KiB limit, in a child process without privileges."""
    code = (
        "from rdmaproxy.pool import PinnedPool\n"
        "from rdmaproxy.errors import PoolError\n"
        "try:\n    PinnedPool(1 << 20)\nexcept PoolError as e:\n    print(e)\n"
        "else:\n    print('LOCKED')\n"
    )
    root = Path(__file__).resolve().parents[2]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            preexec_fn=_low_memlock_child,
            capture_output=True,
            text=True,
            cwd=root,
            timeout=60,
            check=False,
        )
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot start an unprivileged child: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"unprivileged child could not run: {proc.stderr[-300:]}")
    out = proc.stdout
    assert "LOCKED" not in out
    assert "ulimit -l 64" in out and "RLIMIT_MEMLOCK" in out and "1048576 bytes" in out


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.EPERM, errno.EAGAIN])
def test_pinned_pool_memlock_error(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    monkeypatch.setattr(pool_mod, "_mlock", lambda addr, length: err)
    with pytest.raises(PoolError) as info:
        PinnedPool(3 * MiB)
    msg = str(info.value)
    assert "ulimit -l" in msg
    assert "RLIMIT_MEMLOCK" in msg
    assert str(3 * MiB) in msg and "3 MiB" in msg
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    assert shown in msg
    assert "--pool-size" in msg


def test_pinned_pool_other_mlock_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "_mlock", lambda addr, length: errno.EINVAL)
    with pytest.raises(PoolError, match="EINVAL"):
        PinnedPool(MiB)


def test_pinned_pool_bad_size() -> None:
    with pytest.raises(PoolError, match="positive"):
        PinnedPool(0)
