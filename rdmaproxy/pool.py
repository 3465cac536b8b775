"""The pinned pool: its layout and slot allocator (pure) and `PinnedPool` (mmap + mlock).

Layout (docs/design.md, "Pool and slots")::

    0                       ctrl_area_size                                 pool_size
    | ctrl block 0 | 1 | ... (64 B each, padded to 4096) | ring 0 | ring 1 | ... | slack |

`PinnedPool` only maps and locks the memory; the verbs layer registers ``address`` /
``size`` as one memory region (pyverbs ``MR(pd, length, access, address=...)``).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import mmap
import os
import resource

import attrs

from rdmaproxy.errors import PoolError

__all__ = [
    "CTRL_BLOCK_SIZE",
    "CTRL_PEER_TAIL_OFFSET",
    "MAX_SLOTS",
    "MIN_RING_SIZE",
    "PAGE_SIZE",
    "PinnedPool",
    "PoolLayout",
    "SlotAllocator",
    "format_size",
]

#: One control block per slot (design.md): peer_tail u64 at 8, the rest reserved (protocol 1
#: kept the head at 0; protocol 2 counts it from WRITE WITH IMMEDIATE completions).
CTRL_BLOCK_SIZE = 64
CTRL_PEER_TAIL_OFFSET = 8
#: The control area and the rings after it are aligned to this.
PAGE_SIZE = 4096
#: Rings smaller than a page make no sense for a pinned pool.
MIN_RING_SIZE = PAGE_SIZE
#: HELLO carries ring_size as u32: the largest power of two that fits.
MAX_RING_SIZE = 2**31
#: Slot numbers travel in the low 28 bits of the immediate data.
MAX_SLOTS = 2**28


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def format_size(n: int) -> str:
    """``n`` bytes in a short human form (``"64 MiB"``, ``"1.5 KiB"``, ``"512 B"``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            if unit == "B":
                return f"{n} B"
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


@attrs.define(frozen=True, slots=True)
class PoolLayout:
    """Where the control blocks and rings of a pool of ``pool_size`` bytes live."""

    pool_size: int
    ring_size: int
    n_slots: int
    ctrl_area_size: int

    @classmethod
    def compute(cls, pool_size: int, ring_size: int) -> PoolLayout:
        """Validate the sizes and compute the largest layout that fits (ValueError if none)."""
        for name, value in (("pool size", pool_size), ("ring size", ring_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer number of bytes, got {value!r}")
        if ring_size & (ring_size - 1) or not MIN_RING_SIZE <= ring_size <= MAX_RING_SIZE:
            raise ValueError(
                f"ring size must be a power of two between {format_size(MIN_RING_SIZE)} and "
                f"{format_size(MAX_RING_SIZE)}, got {ring_size} bytes"
            )
        if pool_size <= 0:
            raise ValueError(f"pool size must be positive, got {pool_size} bytes")
        n = min(pool_size // ring_size, MAX_SLOTS)
        while n > 0 and _align_up(n * CTRL_BLOCK_SIZE, PAGE_SIZE) + n * ring_size > pool_size:
            n -= 1
        if n == 0:
            needed = PAGE_SIZE + ring_size
            raise ValueError(
                f"pool size {pool_size} bytes ({format_size(pool_size)}) cannot hold a single "
                f"ring of {format_size(ring_size)} plus the control area: need at least "
                f"{needed} bytes ({format_size(needed)})"
            )
        return cls(
            pool_size=pool_size,
            ring_size=ring_size,
            n_slots=n,
            ctrl_area_size=_align_up(n * CTRL_BLOCK_SIZE, PAGE_SIZE),
        )

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot!r} out of range [0, {self.n_slots})")

    def ring_offset(self, slot: int) -> int:
        """Byte offset of ``slot``'s ring inside the pool."""
        self._check_slot(slot)
        return self.ctrl_area_size + slot * self.ring_size

    def ctrl_offset(self, slot: int) -> int:
        """Byte offset of ``slot``'s control block inside the pool."""
        self._check_slot(slot)
        return slot * CTRL_BLOCK_SIZE

    @property
    def used_size(self) -> int:
        """Bytes of the pool covered by the control area and the rings."""
        return self.ctrl_area_size + self.n_slots * self.ring_size


@attrs.define(slots=True, init=False)
class SlotAllocator:
    """Hands out slot numbers of a `PoolLayout`.

    Slots are reused least-recently-freed first (FIFO), which maximises the time between a
    slot's release and its reuse: a cheap extra margin should a stray write ever target a
    released slot.
    """

    layout: PoolLayout
    _free: collections.deque[int]
    _in_use: set[int]

    def __init__(self, pool_size: int, ring_size: int) -> None:
        self.layout = PoolLayout.compute(pool_size, ring_size)
        self._free = collections.deque(range(self.layout.n_slots))
        self._in_use = set()

    @property
    def n_slots(self) -> int:
        return self.layout.n_slots

    @property
    def pool_size(self) -> int:
        return self.layout.pool_size

    @property
    def ring_size(self) -> int:
        return self.layout.ring_size

    @property
    def ctrl_area_size(self) -> int:
        return self.layout.ctrl_area_size

    @property
    def in_use(self) -> int:
        """Number of allocated slots."""
        return len(self._in_use)

    @property
    def free_count(self) -> int:
        """Number of slots available to `alloc`."""
        return len(self._free)

    def is_allocated(self, slot: int) -> bool:
        return slot in self._in_use

    def alloc(self) -> int | None:
        """A free slot number, or None when the pool is exhausted."""
        if not self._free:
            return None
        slot = self._free.popleft()
        self._in_use.add(slot)
        return slot

    def free(self, slot: int) -> None:
        """Return ``slot``; freeing a slot that is not allocated raises ValueError."""
        self.layout._check_slot(slot)
        if slot not in self._in_use:
            raise ValueError(f"slot {slot} is not allocated (double free?)")
        self._in_use.remove(slot)
        self._free.append(slot)

    def ring_offset(self, slot: int) -> int:
        return self.layout.ring_offset(slot)

    def ctrl_offset(self, slot: int) -> int:
        return self.layout.ctrl_offset(slot)


# --------------------------------------------------------------------------- PinnedPool

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mlock.restype = ctypes.c_int
        _libc = lib
    return _libc


def _mlock(address: int, length: int) -> int:
    """mlock(2); returns 0 or the errno. A module attribute so tests can substitute it."""
    if _get_libc().mlock(ctypes.c_void_p(address), ctypes.c_size_t(length)) != 0:
        return ctypes.get_errno()
    return 0


def _format_limit(value: int) -> str:
    if value == resource.RLIM_INFINITY:
        return "unlimited"
    return f"{value} bytes ({format_size(value)}, ulimit -l {value // 1024})"


def memlock_error_message(size: int, err: int) -> str:
    """The explanation given when mlock of ``size`` bytes fails with ``err``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return (
        f"cannot lock the pinned pool in memory: mlock of {size} bytes ({format_size(size)}) "
        f"failed with {errno.errorcode.get(err, str(err))} ({os.strerror(err)}). "
        f"The locked-memory limit RLIMIT_MEMLOCK (`ulimit -l`) is soft {_format_limit(soft)}, "
        f"hard {_format_limit(hard)}; the pool needs {size} bytes plus what the process has "
        f"already locked. Raise the limit (`ulimit -l unlimited`, LimitMEMLOCK= in a systemd "
        f"unit, memlock in /etc/security/limits.conf, --ulimit memlock=-1 for docker) or "
        f"lower --pool-size."
    )


class PinnedPool:
    """``size`` bytes of anonymous memory, mapped once and locked (mlock).

    Use as a context manager or call `close`. Memoryviews handed out by `memoryview` must be
    released before `close`.
    """

    __slots__ = ("_address", "_buffer", "_closed", "_size")

    def __init__(self, size: int, *, lock: bool = True) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise PoolError(f"pool size must be a positive number of bytes, got {size!r}")
        try:
            buf = mmap.mmap(
                -1,
                size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            raise PoolError(
                f"cannot map a pool of {size} bytes ({format_size(size)}): {exc.strerror}"
            ) from exc
        anchor = ctypes.c_char.from_buffer(buf)
        address = ctypes.addressof(anchor)
        del anchor  # the exported pointer would keep buf from closing
        if lock:
            err = _mlock(address, size)
            if err:
                buf.close()
                if err in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
                    raise PoolError(memlock_error_message(size, err))
                raise PoolError(
                    f"cannot lock the pinned pool ({size} bytes): mlock failed with "
                    f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
                )
        self._buffer: mmap.mmap = buf
        self._address = address
        self._size = size
        self._closed = False

    @property
    def buffer(self) -> mmap.mmap:
        """The mapping itself (a writable buffer)."""
        self._check_open()
        return self._buffer

    @property
    def address(self) -> int:
        """Virtual address of byte 0 (what the MR is registered at)."""
        return self._address

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError("the pinned pool is closed")

    def memoryview(self, offset: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``offset`` (bounds checked)."""
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside the pool of {self._size} bytes"
            )
        return memoryview(self._buffer)[offset : offset + length]

    def close(self) -> None:
        """Unlock and unmap. Idempotent. Fails (PoolError) while memoryviews are exported.

        munmap releases the lock (mlock(2): locks are removed when the range is unmapped), so
        no separate munlock is issued: if the mapping cannot go because views are still
        exported, the pool stays mapped *and* locked, fully usable.
        """
        if self._closed:
            return
        try:
            self._buffer.close()
        except BufferError as exc:
            raise PoolError(
                "cannot close the pinned pool: memoryviews of it are still in use"
            ) from exc
        self._closed = True

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self._address:#x}"
        return f"<PinnedPool {format_size(self._size)} {state}>"
