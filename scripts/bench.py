#!/usr/bin/env python3
"""The rdmaproxy benchmark: rdmaproxy beside the device limit, rsocket and TCP, in one run.

Runs as root on a host with the test topology of scripts/setup_rxe.sh (rxe0 on veth0 10.99.0.1,
rxe1 on veth1 10.99.0.2); scripts/bench.sh gets there, natively or inside the QEMU VM.

    device limit   ib_write_bw / ib_read_bw at 64 KiB and 1 MiB, ib_write_lat at 64 B (rxe1->rxe0)
    rsocket        rstream at 64 KiB and 1 MiB (server on 10.99.0.1, client from 10.99.0.2)
    TCP            direct download, and through microsocks (a TCP-only SOCKS relay)
    rdmaproxy      two `rdmaproxy serve` processes (ingress rxe0, egress rxe1): bulk download and
                   upload for 1/8/64 streams, 64 B latency, SOCKS set-up rate, CPU s/GiB,
                   peak RSS, idle CPU; then a chunk-size sweep (single-stream download)
    --compare      optional: variants of the proxies' options, 1- and 8-stream downloads,
                   alternating round by round in the same boot

Every throughput is in MiB/s (2**20 bytes per second). The data source and sink is a small
server process of this file (`_dataserver`, a thread per connection): it sendfile()s the
pattern stream from a memfd and recv_into()s one bytearray. Downloads sink in the benchmark
itself: MSG_WAITALL for one stream, one selectors loop for several. Timed runs check byte
counts, and untimed runs (rdmaproxy.content_check) check content. Results: a table on stdout,
bench.json and bench.png in --out. The bars of issue 4 are reported as PASS/FAIL and never fail the
run; the exit status is 1 only when a measurement itself broke (lost bytes, a tool failed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import json
import os
import platform
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from rdmaproxy.admin import AdminError, query_status

MiB = 1 << 20
GiB = 1 << 30
KiB = 1 << 10
IP_A = os.environ.get("RDMAPROXY_IP_A", "10.99.0.1")  # rxe0: ingress, perftest/rstream server
IP_B = os.environ.get("RDMAPROXY_IP_B", "10.99.0.2")  # rxe1: egress, data server, clients
DEV_A = os.environ.get("RDMAPROXY_RXE_A", "rxe0")
DEV_B = os.environ.get("RDMAPROXY_RXE_B", "rxe1")
# ib_read_bw -o: the device default of 128 outstanding READs (128 MiB in flight at 1 MiB)
# makes rxe drop response bursts and stall; cap the READ bytes in flight at 1 MiB instead.
READ_BYTES_IN_FLIGHT = MiB
GID_INDEX = "1"  # the IPv4 (RoCE v2) GID that scripts/setup_rxe.sh leaves on each device
REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATTERN_SIZE = MiB
#: The sink's recv_into buffer.
SINK_BUFFER = MiB
IO_TIMEOUT = 180.0  # a stalled transfer fails the measurement instead of hanging the run

# Data-server protocol: one header per connection, then the operation.
#   D: the server sends LENGTH bytes of the pattern stream, then closes.
#   U: the client sends LENGTH bytes; the server answers with (count u64, crc32 u32).
#   E: echo until EOF (latency, connection set-up).
HEADER = struct.Struct("!cBQ")  # op, flags (1 = checksum), length
UPLOAD_REPLY = struct.Struct("!QI")
FLAG_CRC = 1

T = TypeVar("T")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mib_s(nbytes: float, seconds: float) -> float:
    return nbytes / MiB / seconds


# ---------------------------------------------------------------------------------------------
# The pattern stream: a deterministic 1 MiB block repeated; byte i of a stream is
# PATTERN[i % PATTERN_SIZE]. DOUBLE holds it twice so that any window of up to 1 MiB starting
# anywhere in the block is one contiguous memoryview.


def make_pattern() -> bytes:
    return random.Random(0x52445058).randbytes(PATTERN_SIZE)


PATTERN = make_pattern()
DOUBLE = memoryview(PATTERN + PATTERN)


def pattern_window(offset: int, n: int) -> memoryview:
    start = offset % PATTERN_SIZE
    return DOUBLE[start : start + min(n, PATTERN_SIZE)]


def pattern_crc(length: int) -> int:
    crc, done = 0, 0
    while done < length:
        view = pattern_window(done, length - done)
        crc = zlib.crc32(view, crc)
        done += len(view)
    return crc


# ---------------------------------------------------------------------------------------------
# The data server (a separate process: `bench.py _dataserver HOST`).


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        got += k
    return bytes(buf)


_pattern_file: io.FileIO | None = None


def pattern_file() -> io.FileIO:
    """A memfd holding the pattern twice (DOUBLE), made once per process: the source of
    `send_pattern`."""
    global _pattern_file
    if _pattern_file is None:
        fd = os.memfd_create("rdmaproxy-bench-pattern")
        os.write(fd, DOUBLE)
        _pattern_file = io.FileIO(fd, "rb")
    return _pattern_file


def send_pattern(sock: socket.socket, length: int) -> None:
    """Send ``length`` bytes of the pattern stream with ``sendfile`` from `pattern_file`.

    As busybox httpd does: the kernel moves page-cache pages into the socket, so the source
    makes no user-space copy per byte and spends less of the vCPUs it shares with what it
    measures (``sendall`` of a Python buffer costs a copy per byte)."""
    source, sent = pattern_file(), 0
    while sent < length:
        start = sent % PATTERN_SIZE
        n = sock.sendfile(source, start, min(length - sent, 2 * PATTERN_SIZE - start))
        if n == 0:
            raise ConnectionError(f"sendfile sent nothing after {sent} of {length} bytes")
        sent += n


def sink(sock: socket.socket, length: int, crc: bool,
         bufsize: int = SINK_BUFFER) -> tuple[int, int]:
    """recv_into one buffer until ``length`` bytes or EOF; returns (count, crc32 or 0).

    MSG_WAITALL: each call returns with a full buffer (or at EOF), so the kernel gathers the
    segments and this loop runs once per buffer, not once per wake-up. Under TCG a trip
    through this Python loop costs far more than the kernel's wake-ups, and the sink shares
    the two vCPUs with what it measures."""
    buf = bytearray(bufsize)
    view = memoryview(buf)
    got, value = 0, 0
    while got < length:
        n = sock.recv_into(view, min(bufsize, length - got), socket.MSG_WAITALL)
        if n == 0:
            break
        if crc:
            value = zlib.crc32(view[:n], value)
        got += n
    return got, value


def echo(sock: socket.socket) -> None:
    buf = bytearray(64 * KiB)
    view = memoryview(buf)
    while n := sock.recv_into(view):
        sock.sendall(view[:n])


def handle_data_connection(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        op, flags, length = HEADER.unpack(recv_exact(conn, HEADER.size))
        if op == b"D":
            send_pattern(conn, length)
        elif op == b"U":
            count, crc = sink(conn, length, bool(flags & FLAG_CRC))
            conn.sendall(UPLOAD_REPLY.pack(count, crc))
        elif op == b"E":
            echo(conn)


def data_server_main(host: str) -> None:
    server = socket.create_server((host, 0), backlog=512)
    print(server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_guarded, args=(conn,), daemon=True).start()


def _guarded(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        handle_data_connection(conn)


# ---------------------------------------------------------------------------------------------
# Child processes: each in its own process group, killed (group and all) on the way out.


@dataclass
class Children:
    """Every child process of the benchmark; ``close()`` kills what is still running."""

    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
             timeout: float = 30) -> int:
        """Signal the process group, wait, escalate to SIGKILL; returns the exit status."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, signal.SIGKILL, timeout=10)


def run_tool(argv: list[str], timeout: float) -> str:
    """Run a measuring tool to completion; its output, or RuntimeError with the output."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def listening_ports() -> set[int]:
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A":  # TCP_LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_until(what: str, ready: Callable[[], bool], proc: subprocess.Popen[Any] | None,
               timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Device limit (perftest) and rsocket (rstream).


@dataclass
class Perftest:
    """perftest pairs: server on DEV_A, client on DEV_B, RC QPs addressed by GID (no rdma_cm).

    Bandwidth runs in duration mode (-D): a READ burst that rxe drops now and then stalls an
    iteration-count run for minutes, while a duration run just ends on time (perftest measures
    between the -f margins at each end: 2 s, 1 s in --quick). Latency runs a fixed count."""

    children: Children
    bw_seconds: int
    lat_iters: int
    port: int = 18515

    def _run(self, tool: str, size: int, count: list[str]) -> str:
        """One server/client pair; a run that hangs anyway is retried once."""
        for attempt in (1, 2):
            try:
                return self._run_once(tool, size, count)
            except subprocess.TimeoutExpired:
                if attempt == 2:
                    raise
                log(f"{tool} {size}B timed out; retrying once")
        raise AssertionError("unreachable")

    def _run_once(self, tool: str, size: int, count: list[str]) -> str:
        self.port += 1
        common = ["-x", GID_INDEX, "-s", str(size), *count, "-p", str(self.port), "-F"]
        if tool == "ib_read_bw":
            common += ["-o", str(outstanding_reads(size))]
        server = self.children.start([tool, "-d", DEV_A, *common], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            port = self.port
            wait_until(f"{tool} server", lambda: port in listening_ports(), server, 30)
            out = run_tool([tool, "-d", DEV_B, *common, IP_A], timeout=90 + self.bw_seconds)
        finally:
            self.children.stop(server, timeout=15)
        return out

    def bandwidth(self, tool: str, size: int) -> dict[str, Any]:
        """Average BW of ``tool`` (ib_write_bw / ib_read_bw); perftest's MB/sec is 2**20 B/s
        (perftest_parameters.c divides by 0x100000; its --help says MiB=2^20 byte)."""
        count = ["-D", str(self.bw_seconds), "-f", str(self.margin)]

        def attempt() -> tuple[list[float], dict[str, float], dict[str, int]]:
            """perftest's row, with the machine's CPU and rxe's counters during that run."""
            machine, counters = SystemCpu(), RxeCounters()
            row = perftest_row(self._run(tool, size, count), 5)
            return row, machine.percent(), counters.delta()

        row, cpu, rxe = attempt()
        if row[3] <= 0:  # nothing completed in the measured window: a stall, retry once
            log(f"{tool} {size}B completed nothing in {self.bw_seconds}s; retrying once")
            row, cpu, rxe = attempt()
            if row[3] <= 0:
                raise RuntimeError(f"{tool} {size}B: no operation completed in the measured "
                                   f"window twice (the device stalled)")
        result: dict[str, Any] = {"mib_s": row[3], "duration_s": self.bw_seconds,
                                  "margin_s": self.margin, "iterations": int(row[1]),
                                  "system_cpu_pct": cpu, "rxe_counters": rxe}
        if tool == "ib_read_bw":
            result["outstanding_reads"] = outstanding_reads(size)
        return result

    @property
    def margin(self) -> int:
        """perftest -f: seconds left out of the measurement at each end of a -D run."""
        return 1 if self.bw_seconds < 8 else 2

    def latency(self, size: int) -> dict[str, float]:
        iters = self.lat_iters
        row = perftest_row(self._run("ib_write_lat", size, ["-n", str(iters)]), 9)
        return {"avg_us": row[5], "typical_us": row[4], "p99_us": row[7], "iterations": iters}


def outstanding_reads(size: int) -> int:
    return max(1, min(16, READ_BYTES_IN_FLIGHT // size))


def perftest_row(out: str, n_fields: int) -> list[float]:
    """The result row of a perftest report: the numeric line after the '#bytes' header."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("#bytes"):
            for row in lines[i + 1 :]:
                fields = row.split()
                if len(fields) == n_fields and all(_is_number(f) for f in fields):
                    return [float(f) for f in fields]
    raise RuntimeError(f"no result row in perftest output:\n{out[-2000:]}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def rstream(children: Children, size: int, count: int, port: int) -> dict[str, float]:
    """rstream ping-pong: COUNT transfers of SIZE each way; its Gb/sec is 10**9 bit/s over the
    bytes of both directions (rstream.c: bytes = iterations * count * size * 2)."""
    opts = ["-p", str(port), "-S", str(size), "-C", str(count), "-I", "1"]
    server = children.start(["rstream", "-b", IP_A, *opts], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        out = ""
        for attempt in range(10):
            time.sleep(1.0 + attempt)  # rsockets listen over rdma_cm: nothing to poll for
            try:
                out = run_tool(["rstream", "-s", IP_A, "-b", IP_B, *opts], timeout=300)
                break
            except RuntimeError:
                if attempt == 9 or server.poll() is not None:
                    raise
    finally:
        children.stop(server, timeout=15)
    # name bytes xfers iters total time Gb/sec usec/xfer: "usec/xfer" (2 decimals of a
    # microsecond) is the precise column; "time" and "Gb/sec" are rounded to 2 digits.
    fields = out.strip().splitlines()[-1].split()
    usec_per_xfer, seconds = float(fields[-1]), float(fields[-3].rstrip("s"))
    return {"mib_s": round(size / MiB / (usec_per_xfer / 1e6), 2), "usec_per_xfer": usec_per_xfer,
            "gbit_s_reported": float(fields[-2]), "seconds": seconds,
            "bytes_both_ways": 2 * size * count}


# ---------------------------------------------------------------------------------------------
# Clients: plain TCP or SOCKS5 (hand-rolled: greeting, CONNECT, reply).

Dialer = Callable[[], socket.socket]


def tcp_dialer(dest: tuple[str, int]) -> Dialer:
    def dial() -> socket.socket:
        sock = socket.create_connection(dest, timeout=IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return dial


def socks_dialer(proxy: tuple[str, int], dest: tuple[str, int]) -> Dialer:
    request = (b"\x05\x01\x00\x01" + socket.inet_aton(dest[0]) + dest[1].to_bytes(2, "big"))

    def dial() -> socket.socket:
        sock = socket.create_connection(proxy, timeout=IO_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"\x05\x01\x00")
            if recv_exact(sock, 2) != b"\x05\x00":
                raise ConnectionError("SOCKS5 greeting refused")
            sock.sendall(request)
            reply = recv_exact(sock, 4)
            if reply[1] != 0:
                raise ConnectionError(f"SOCKS5 CONNECT failed, reply code {reply[1]:#04x}")
            atyp = reply[3]
            rest = 4 if atyp == 1 else 16 if atyp == 4 else recv_exact(sock, 1)[0]
            recv_exact(sock, rest + 2)
        except BaseException:
            sock.close()
            raise
        return sock

    return dial


class Workers:
    """target(0..n-1), each in its own thread, started at once; join() re-raises a failure."""

    def __init__(self, target: Callable[[int], Any], n: int) -> None:
        self.results: list[Any] = [None] * n
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._body, args=(target, i), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _body(self, target: Callable[[int], Any], i: int) -> None:
        try:
            self.results[i] = target(i)
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> list[Any]:
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        return self.results


def dial_all(dial: Dialer, n: int) -> list[socket.socket]:
    """n connections made concurrently; all closed again if any fails."""
    workers = Workers(lambda i: dial(), n)
    for t in workers.threads:
        t.join()
    socks = [s for s in workers.results if isinstance(s, socket.socket)]
    if workers.errors:
        for sock in socks:
            sock.close()
        raise workers.errors[0]
    return socks


def abort_all(socks: list[socket.socket]) -> None:
    """Wake every thread blocked on these sockets (one stream failed: the run is lost)."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def split(total: int, n: int) -> list[int]:
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


@dataclass
class BulkResult:
    direction: str
    streams: int
    nbytes: int
    seconds: float
    verified: bool

    @property
    def mib_s(self) -> float:
        return mib_s(self.nbytes, self.seconds)


def transfer(sock: socket.socket, direction: str, length: int,
             verify: bool) -> tuple[int, int]:
    """One stream of a bulk run: (bytes that arrived, crc32 of them or 0)."""
    if direction == "download":
        sock.sendall(HEADER.pack(b"D", 0, length))
        return sink(sock, length + 1, verify)  # +1: read on to the server's EOF
    sock.sendall(HEADER.pack(b"U", FLAG_CRC if verify else 0, length))
    send_pattern(sock, length)
    count, crc = UPLOAD_REPLY.unpack(recv_exact(sock, UPLOAD_REPLY.size))
    return count, crc


def bulk(dial: Dialer, direction: str, streams: int, total: int, verify: bool) -> BulkResult:
    """Move ``total`` bytes split over ``streams`` concurrent connections; every byte counted,
    and with ``verify`` every byte checksummed. Connections (and SOCKS handshakes) are made
    before the clock starts; it stops when the last stream is complete."""
    lengths = split(total, streams)
    socks = dial_all(dial, streams)
    try:
        if direction == "download" and streams > 1:
            started = time.monotonic()
            got = sink_many(socks, lengths, verify)
        else:
            got, started = transfer_in_threads(socks, direction, lengths, verify)
        seconds = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    check_bulk(direction, got, lengths, verify)
    return BulkResult(direction, streams, total, seconds, verify)


def transfer_in_threads(socks: list[socket.socket], direction: str, lengths: list[int],
                        verify: bool) -> tuple[list[tuple[int, int]], float]:
    """`transfer` on each socket in a thread of its own; (results, the clock's start)."""
    barrier = threading.Barrier(len(socks) + 1, timeout=IO_TIMEOUT)

    def one(i: int) -> tuple[int, int]:
        try:
            barrier.wait()
            return transfer(socks[i], direction, lengths[i], verify)
        except BaseException:
            abort_all(socks)
            raise

    workers = Workers(one, len(socks))
    barrier.wait()
    started = time.monotonic()
    got: list[tuple[int, int]] = workers.join()
    return got, started


def sink_many(socks: list[socket.socket], lengths: list[int],
              verify: bool) -> list[tuple[int, int]]:
    """Download on several sockets at once from one thread: ask each for its length, then
    ``recv_into`` one buffer from whichever is readable, until every one is at EOF.

    One loop instead of a thread per stream: with eight threads blocked in ``recv`` the
    sink cost 12-17 CPU s/GiB against 8-10 for this loop, measured under TCG, where every
    thread wake-up is expensive; the single-stream sink stays a thread with MSG_WAITALL."""
    got = [(0, 0)] * len(socks)
    view = memoryview(bytearray(SINK_BUFFER))
    with selectors.DefaultSelector() as selector:
        for i, sock in enumerate(socks):
            sock.sendall(HEADER.pack(b"D", 0, lengths[i]))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
        open_streams = len(socks)
        while open_streams:
            ready = selector.select(IO_TIMEOUT)
            if not ready:
                raise TimeoutError(f"no data for {IO_TIMEOUT:.0f}s ({open_streams} streams open)")
            for key, _ in ready:
                i = key.data
                try:
                    n = socks[i].recv_into(view)
                except BlockingIOError:
                    continue
                if n == 0:
                    selector.unregister(socks[i])
                    open_streams -= 1
                    continue
                count, crc = got[i]
                got[i] = (count + n, zlib.crc32(view[:n], crc) if verify else 0)
    return got


def check_bulk(direction: str, got: list[tuple[int, int]], lengths: list[int],
               verify: bool) -> None:
    for i, ((count, crc), length) in enumerate(zip(got, lengths, strict=True)):
        if count != length:
            raise RuntimeError(f"{direction} stream {i}: {count} bytes arrived, {length} sent")
        if verify and crc != pattern_crc(length):
            raise RuntimeError(f"{direction} stream {i}: content differs (crc32)")


def latency(dial: Dialer, rounds: int, warmup: int = 20) -> dict[str, float]:
    """64 B request/response on one connection; microseconds."""
    message = bytes(range(64))
    times: list[float] = []
    with dial() as sock:
        sock.sendall(HEADER.pack(b"E", 0, 0))
        for i in range(warmup + rounds):
            started = time.perf_counter()
            sock.sendall(message)
            if recv_exact(sock, 64) != message:
                raise RuntimeError("echo returned different bytes")
            if i >= warmup:
                times.append(time.perf_counter() - started)
    times.sort()
    return {"p50_us": round(percentile(times, 50) * 1e6, 1),
            "p99_us": round(percentile(times, 99) * 1e6, 1),
            "mean_us": round(statistics.fmean(times) * 1e6, 1), "rounds": rounds}


def percentile(sorted_values: list[float], p: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def connect_rate(dial: Dialer, n: int) -> dict[str, float]:
    """Sequential connections: connect + (SOCKS handshake) + one 64 B echo + close."""
    message = b"x" * 64
    started = time.monotonic()
    for _ in range(n):
        with dial() as sock:
            sock.sendall(HEADER.pack(b"E", 0, 0) + message)
            if recv_exact(sock, 64) != message:
                raise RuntimeError("echo returned different bytes")
    seconds = time.monotonic() - started
    return {"conn_per_s": round(n / seconds, 1), "connections": n}


# ---------------------------------------------------------------------------------------------
# Process accounting from /proc.


class SystemCpu:
    """Where the whole machine's CPU time went between two readings of /proc/stat.

    The proxies, the source and sink, and rxe's softirq work all share the same CPUs here, so
    a run that keeps them busy is limited by CPU, not by the data path's waiting."""

    FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]

    def percent(self) -> dict[str, float]:
        delta = [b - a for a, b in zip(self.start, self._read(), strict=True)]
        total = sum(delta) or 1
        pct = {name: round(100 * d / total, 1) for name, d in zip(self.FIELDS, delta,
                                                                   strict=True)}
        busy = 100 * (total - delta[3] - delta[4]) / total
        return {"busy": round(busy, 1), "user": pct["user"] + pct["nice"],
                "system": pct["system"], "softirq": pct["softirq"], "cpus": os.cpu_count() or 0}


class RxeCounters:
    """rxe's hw_counters of both devices (sent/received packets, retries, sequence errors...)
    between two readings: a run that stalls with idle CPUs shows here as retries or
    out-of-sequence packets, which RC repairs after its ACK timeout."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> dict[str, int]:
        out: dict[str, int] = {}
        for dev in (DEV_A, DEV_B):
            for path in Path(f"/sys/class/infiniband/{dev}/ports/1/hw_counters").glob("*"):
                with contextlib.suppress(OSError, ValueError):
                    out[f"{dev}.{path.name}"] = int(path.read_text())
        return out

    def delta(self) -> dict[str, int]:
        """The counters that moved, except plain packet counts."""
        now = self._read()
        moved = {k: now[k] - self.start.get(k, 0) for k in now}
        return {k: v for k, v in sorted(moved.items())
                if v and not k.endswith(("sent_pkts", "rcvd_pkts"))}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def vm_hwm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


# ---------------------------------------------------------------------------------------------
# The two rdmaproxy processes.


@dataclass(frozen=True)
class Target:
    """The data server process (source, sink and echo of every TCP measurement)."""

    host: str
    port: int
    pid: int

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port


class ProxyDied(RuntimeError):
    """A proxy process exited while the benchmark needed it."""


@dataclass
class ProxyPair:
    children: Children
    workdir: Path
    tuning: list[str]  # --pool-size/--ring-size/--chunk-size/... given to both proxies
    rdma_port: int
    socks_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        secret = self.workdir / "secret"
        secret.write_text("bench secret\n")
        secret.chmod(0o600)
        self.env = dict(os.environ, RDMAPROXY_RUN_DIR=str(self.workdir / "run"))
        self.socks_port = free_port()
        common = ["--secret-file", str(secret), *self.tuning, "--log-level", "warning"]
        roles = {
            "egress": ["--listen", f"{IP_B}:{self.rdma_port}"],
            "ingress": ["--socks", f"127.0.0.1:{self.socks_port}",
                        "--listen", f"{IP_A}:{self.rdma_port}",
                        "--peer", f"{IP_B}:{self.rdma_port}"],
        }
        for name, args in roles.items():
            self.logs[name] = open(self.workdir / f"{name}.log", "wb")
            self.procs[name] = self.children.start(
                [sys.executable, "-m", "rdmaproxy", "serve", "--name", name, *args, *common],
                env=self.env, stdout=self.logs[name], stderr=subprocess.STDOUT)
        try:
            wait_until("ingress peering", self._peered, None, 180)
        except ProxyDied:
            raise
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None

    def _peered(self) -> bool:
        self.check_alive()
        try:
            doc = query_status(self.workdir / "run" / "ingress.sock", timeout=5)
        except (AdminError, OSError):
            return False
        return any(p.get("state") == "up" for p in doc.get("peers", []))

    def log_tail(self) -> str:
        parts = []
        for name in self.procs:
            self.logs[name].flush()
            text = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            parts.append(f"--- {name} log (tail) ---\n{text}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ProxyDied(f"{name} exited {proc.returncode}:\n{self.log_tail()}")

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(p.pid) for name, p in self.procs.items()}

    def posted(self) -> dict[str, dict[str, int]]:
        """Per proxy, what its links have posted so far (`rdmaproxy status`: data WRITEs, their
        bytes, tail updates), summed over its peers."""
        out: dict[str, dict[str, int]] = {}
        for name in self.procs:
            doc = query_status(self.workdir / "run" / f"{name}.sock", timeout=10)
            out[name] = {key: sum(int(peer.get(key, 0)) for peer in doc.get("peers", []))
                         for key in ("writes", "bytes_written", "tail_updates")}
        return out

    def hwm(self) -> dict[str, int]:
        return {name: vm_hwm_bytes(p.pid) for name, p in self.procs.items()}

    def stop(self) -> dict[str, int]:
        # ingress first: stopping the egress first makes the ingress log a lost peer
        codes: dict[str, int] = {
            name: self.children.stop(self.procs[name], signal.SIGTERM, timeout=30)
            for name in ("ingress", "egress") if name in self.procs}
        for f in self.logs.values():
            f.close()
        return codes


@contextlib.contextmanager
def proxy_pair(children: Children, workdir: Path, tuning: list[str],
               rdma_port: int) -> Iterator[ProxyPair]:
    pair = ProxyPair(children, workdir, tuning, rdma_port)
    try:
        pair.start()
        yield pair
    finally:
        codes = pair.stop()
        bad = {n: c for n, c in codes.items() if c != 0}
        if bad:
            log(f"proxies exited with {bad} (expected 0 on SIGTERM)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---------------------------------------------------------------------------------------------
# The plan: sizes and counts, full or --quick.


@dataclass
class Plan:
    quick: bool
    bulk_total: int
    tcp_total: int
    streams: list[int]
    chunk_sizes: list[str]
    sweep_total: int
    check_total: int
    perftest_seconds: int
    perftest_lat_iters: int
    rstream_counts: dict[int, int]
    latency_rounds: int
    connections: int
    idle_seconds: float
    pool_size: str
    ring_size: str
    chunk_size: str
    compare: list[tuple[str, list[str]]]
    rounds: int
    pairs: int

    def tuning(self, chunk_size: str | None = None) -> list[str]:
        """The proxies' size options for the main runs (or for one point of the sweep)."""
        return ["--pool-size", self.pool_size, "--ring-size", self.ring_size,
                "--chunk-size", chunk_size or self.chunk_size]


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    total = parse_size(args.total) if args.total else (16 if quick else 128) * MiB
    default_chunks = "1M" if quick else "16K,64K,128K,256K,512K,1M"
    return Plan(
        quick=quick,
        bulk_total=total,
        tcp_total=total * 4,
        streams=[1, 8, 64],
        chunk_sizes=[c.strip() for c in (args.chunk_sizes or default_chunks).split(",")],
        sweep_total=total // 2 if quick else total,
        check_total=(8 if quick else 32) * MiB,
        perftest_seconds=5 if quick else 10,  # -D; see Perftest.margin
        perftest_lat_iters=1000 if quick else 5000,
        rstream_counts=({65536: 256, 1048576: 16} if quick else {65536: 2000, 1048576: 120}),
        latency_rounds=200 if quick else 1000,
        connections=20 if quick else 200,
        idle_seconds=3.0 if quick else 10.0,
        pool_size=args.pool_size,
        ring_size=args.ring_size,
        chunk_size=args.chunk_size,
        compare=list(args.compare),
        rounds=args.rounds,
        pairs=args.pairs if args.pairs is not None else (1 if quick else 3),
    )


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=OPTIONS`` of --compare: a label and extra `rdmaproxy serve` options."""
    name, sep, options = text.partition("=")
    if not sep or not re.fullmatch(r"[\w.+-]+", name):
        raise argparse.ArgumentTypeError(
            f"--compare wants NAME=OPTIONS (e.g. 'pyverbs=--no-post-thread'), got {text!r}")
    return name, options.split()


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2].upper()]


# ---------------------------------------------------------------------------------------------
# Running sections: a failing measurement is recorded and the run goes on.


@dataclass
class Results:
    doc: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)

    def measure(self, name: str, fn: Callable[[], T]) -> T | None:
        log(f"{name} ...")
        started = time.monotonic()
        try:
            value = fn()
        except Exception as exc:
            log(f"{name} FAILED: {exc}")
            self.errors.append({"measurement": name, "error": str(exc),
                                "traceback": traceback.format_exc()})
            return None
        log(f"{name}: {short(value)} ({time.monotonic() - started:.1f}s)")
        return value

    def put(self, path: str, value: Any) -> None:
        node = self.doc
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is not None:
            node[leaf] = value


def short(value: Any) -> str:
    if value is None:
        return "done"
    text = json.dumps(value, default=str)
    return text if len(text) < 200 else text[:200] + "..."


def device_section(res: Results, children: Children, plan: Plan) -> None:
    perf = Perftest(children, plan.perftest_seconds, plan.perftest_lat_iters)
    for tool in ("ib_write_bw", "ib_read_bw"):
        for size in (64 * KiB, MiB):
            res.put(f"device.{tool}.{size}",
                    res.measure(f"{tool} {size}B", functools.partial(perf.bandwidth, tool, size)))
    res.put("device.ib_write_lat.64", res.measure("ib_write_lat 64B", lambda: perf.latency(64)))


def rstream_section(res: Results, children: Children, plan: Plan) -> None:
    for i, (size, count) in enumerate(plan.rstream_counts.items()):
        res.put(f"rstream.{size}", res.measure(
            f"rstream {size}B", functools.partial(rstream, children, size, count, 7990 + i)))


def tcp_section(res: Results, children: Children, plan: Plan, target: Target) -> None:
    direct = tcp_dialer(target.addr)
    res.put("tcp.direct.download", res.measure(
        "direct TCP download",
        lambda: bulk_json(bulk(direct, "download", 1, plan.tcp_total, False))))
    res.put("tcp.direct.latency", res.measure("direct TCP latency",
                                              lambda: latency(direct, plan.latency_rounds)))
    res.put("tcp.direct.connect", res.measure("direct TCP connect rate",
                                              lambda: connect_rate(direct, plan.connections)))
    port = free_port()
    relay = children.start(["microsocks", "-i", "127.0.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until("microsocks", lambda: port in listening_ports(), relay, 30)
        via = socks_dialer(("127.0.0.1", port), target.addr)
        res.put("tcp.microsocks.download", res.measure(
            "microsocks download", lambda: bulk_json(bulk(via, "download", 1, plan.bulk_total,
                                                          False))))
        res.put("tcp.microsocks.upload", res.measure(
            "microsocks upload", lambda: bulk_json(bulk(via, "upload", 1, plan.bulk_total,
                                                        False))))
        res.put("tcp.microsocks.latency", res.measure(
            "microsocks latency", lambda: latency(via, plan.latency_rounds)))
        res.put("tcp.microsocks.connect", res.measure(
            "microsocks connect rate", lambda: connect_rate(via, plan.connections)))
    finally:
        children.stop(relay)


def bulk_json(r: BulkResult) -> dict[str, Any]:
    return {"mib_s": round(r.mib_s, 2), "bytes": r.nbytes, "seconds": round(r.seconds, 3),
            "streams": r.streams, "content_verified": r.verified}


def load_cpu(pair: ProxyPair, target: Target) -> dict[str, float]:
    """CPU seconds so far of both proxies, and of the benchmark's own source/sink processes
    (to show they are not what limits a run)."""
    return dict(pair.cpu(), bench_client=time.process_time(),
                data_server=cpu_seconds(target.pid))


def proxied_bulk(pair: ProxyPair, target: Target, direction: str, streams: int,
                 total: int) -> dict[str, Any]:
    """One timed bulk run through the proxies, with the CPU each process spent on it.

    Byte counts are checked; content is not (the sink does nothing but ``recv_into``, as the
    issue asks: a crc32 per byte under TCG costs the sink as much CPU as a proxy spends).
    `check_content` checks the content of the same path in untimed runs."""
    dial = socks_dialer(("127.0.0.1", pair.socks_port), target.addr)
    posted_before = pair.posted()
    before = load_cpu(pair, target)
    machine = SystemCpu()
    counters = RxeCounters()
    try:
        result = bulk(dial, direction, streams, total, verify=False)
    except Exception:
        pair.check_alive()
        raise
    after = load_cpu(pair, target)
    out = bulk_json(result)
    out["system_cpu_pct"] = machine.percent()
    out["rxe_counters"] = counters.delta()
    out["cpu_s"] = {n: round(after[n] - before[n], 2) for n in after}
    out["cpu_s_per_gib"] = {n: round((after[n] - before[n]) / (total / GiB), 1) for n in after}
    out["rdma_writes"] = write_stats(posted_before, pair.posted())
    return out


def write_stats(before: dict[str, dict[str, int]],
                after: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per proxy, the data WRITEs it posted during a run, their mean size and its tail
    updates: small WRITEs cost the proxies CPU per byte (docs/performance.md)."""
    out: dict[str, dict[str, float]] = {}
    for name in after:
        delta = {k: after[name][k] - before[name][k] for k in after[name]}
        if delta["writes"] or delta["tail_updates"]:
            out[name] = {"writes": delta["writes"], "tail_updates": delta["tail_updates"],
                         "mean_write_kib": round(delta["bytes_written"] / max(1, delta["writes"])
                                                 / KiB, 1)}
    return out


def check_content(dial: Dialer, total: int) -> dict[str, Any]:
    """Untimed runs whose every byte is checksummed (crc32 of the pattern stream): download and
    upload, one and eight streams. A difference raises, which fails the benchmark."""
    checked: dict[str, Any] = {}
    for direction in ("download", "upload"):
        for n in (1, 8):
            result = bulk(dial, direction, n, total, verify=True)
            checked[f"{direction}_{n}"] = {"bytes": result.nbytes, "content_verified": True}
    return checked


def idle_cpu(pair: ProxyPair, seconds: float) -> dict[str, float]:
    time.sleep(2.0)  # let the last streams close
    before = pair.cpu()
    time.sleep(seconds)
    after = pair.cpu()
    return {n: round((after[n] - before[n]) / seconds * 100, 2) for n in after}


def rdmaproxy_section(res: Results, children: Children, plan: Plan, work: Path,
                      target: Target) -> None:
    with proxy_pair(children, work / "proxies", plan.tuning(), 7471) as pair:
        via = socks_dialer(("127.0.0.1", pair.socks_port), target.addr)
        res.put("rdmaproxy.content_check", res.measure(
            "rdmaproxy content check", lambda: check_content(via, plan.check_total)))
        cpu_total: dict[str, float] = {}
        moved = 0
        for direction in ("download", "upload"):
            for n in plan.streams:
                run = res.measure(f"rdmaproxy {direction} x{n}", functools.partial(
                    proxied_bulk, pair, target, direction, n, plan.bulk_total))
                res.put(f"rdmaproxy.bulk.{direction}.{n}", run)
                if run is not None:
                    moved += run["bytes"]
                    for name, s in run["cpu_s"].items():
                        cpu_total[name] = cpu_total.get(name, 0.0) + s
        if moved:
            res.put("rdmaproxy.cpu_s_per_gib",
                    {n: round(s / (moved / GiB), 1) for n, s in cpu_total.items()})
        res.put("rdmaproxy.latency", res.measure(
            "rdmaproxy latency", lambda: latency(via, plan.latency_rounds)))
        res.put("rdmaproxy.connect", res.measure(
            "rdmaproxy connect rate", lambda: connect_rate(via, plan.connections)))
        res.put("rdmaproxy.idle_cpu_pct", res.measure(
            f"rdmaproxy idle CPU over {plan.idle_seconds:.0f}s",
            lambda: idle_cpu(pair, plan.idle_seconds)))
        res.put("rdmaproxy.peak_rss_mib", res.measure(
            "rdmaproxy peak RSS", lambda: {n: round(b / MiB, 1) for n, b in pair.hwm().items()}))
        res.put("rdmaproxy.pool_size_mib", parse_size(plan.pool_size) / MiB)


def sweep_section(res: Results, children: Children, plan: Plan, work: Path,
                  target: Target) -> None:
    for i, chunk in enumerate(plan.chunk_sizes):
        def one(c: str = chunk, port: int = 7480 + 2 * i) -> dict[str, Any]:
            with proxy_pair(children, work / f"sweep-{c}", plan.tuning(c), port) as pair:
                return proxied_bulk(pair, target, "download", 1, plan.sweep_total)

        res.put(f"chunk_sweep.{parse_size(chunk)}", res.measure(f"chunk {chunk} download", one))


def paired_section(res: Results, children: Children, plan: Plan, work: Path,
                   target: Target) -> None:
    """The bars' figures, measured back to back: each round runs ib_write_bw 1 MiB, rstream
    1 MiB, then rdmaproxy's 1- and 8-stream downloads, so that every ratio compares figures
    taken within a minute of each other (this VM's speed drifts by up to a third in a run)."""
    perf = Perftest(children, plan.perftest_seconds, plan.perftest_lat_iters, port=18700)
    rounds: list[dict[str, Any]] = []
    res.doc["paired"] = {"rounds": rounds}
    with proxy_pair(children, work / "paired", plan.tuning(), 7571) as pair:
        for r in range(plan.pairs):
            def one(port: int = 7995 + r) -> dict[str, Any]:
                return {
                    "ib_write_bw": perf.bandwidth("ib_write_bw", MiB),
                    "rstream": rstream(children, MiB, plan.rstream_counts[MiB], port),
                    "download_1": proxied_bulk(pair, target, "download", 1, plan.bulk_total),
                    "download_8": proxied_bulk(pair, target, "download", 8, plan.bulk_total),
                }

            got = res.measure(f"paired round {r + 1}", one)
            if got is not None:
                rounds.append(got)


def paired_figures(doc: dict[str, Any]) -> list[tuple[float, float, float, float]]:
    """Per round: (ib_write_bw, rstream, 1-stream download, 8-stream download) in MiB/s."""
    return [(r["ib_write_bw"]["mib_s"], r["rstream"]["mib_s"], r["download_1"]["mib_s"],
             r["download_8"]["mib_s"]) for r in get(doc, "paired.rounds") or []]


def paired_ratios(doc: dict[str, Any]) -> dict[str, list[float]]:
    """Per round: 1-stream / ib_write_bw, 1-stream / rstream, 8-stream / ib_write_bw."""
    figures = paired_figures(doc)
    return {"x1_vs_ib_write_bw": [round(one / wbw, 3) for wbw, _, one, _ in figures],
            "x1_vs_rstream": [round(one / rs, 3) for _, rs, one, _ in figures],
            "x8_vs_ib_write_bw": [round(eight / wbw, 3) for wbw, _, _, eight in figures]}


def paired_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for i, (wbw, rs, one, eight) in enumerate(paired_figures(doc)):
        rows.append((f"round {i + 1}: ib_write_bw / rstream 1 MiB",
                     f"{wbw:.2f} / {rs:.2f} MiB/s"))
        rows.append((f"round {i + 1}: rdmaproxy download x1 / x8",
                     f"{one:.2f} / {eight:.2f} MiB/s  (x1 {one / wbw:.2f} x ib_write_bw, "
                     f"{one / rs:.2f} x rstream; x8 {eight / wbw:.2f} x ib_write_bw)"))
    return rows


def compare_section(res: Results, children: Children, plan: Plan, work: Path,
                    target: Target) -> None:
    """--compare: the variants' 1- and 8-stream downloads, alternating, ``plan.rounds`` times.

    One variant after the other within each round, so that a slow spell of the machine (this
    VM's speed drifts by up to a third within a run) falls on all of them alike."""
    port = 7600
    for r in range(plan.rounds):
        for name, options in plan.compare:
            port += 2

            def one(opts: list[str] = options, p: int = port, label: str = f"{name}-{r}"
                    ) -> dict[str, Any]:
                with proxy_pair(children, work / f"compare-{label}", plan.tuning() + opts,
                                p) as pair:
                    return {str(n): proxied_bulk(pair, target, "download", n, plan.bulk_total)
                            for n in (1, 8)}

            got = res.measure(f"compare {name} round {r + 1}", one)
            runs = res.doc.setdefault("compare", {}).setdefault(
                name, {"options": options, "rounds": []})
            runs["rounds"].append(got)


def compare_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for name, runs in doc.get("compare", {}).items():
        for n in ("1", "8"):
            values = [r[n]["mib_s"] for r in runs["rounds"] if r]
            text = " / ".join(f"{v:.2f}" for v in values)
            mean = f"  mean {statistics.mean(values):.2f}" if values else ""
            rows.append((f"{name} x{n} ({' '.join(runs['options']) or 'as above'})",
                         f"{text} MiB/s{mean}"))
    return rows


# ---------------------------------------------------------------------------------------------
# Metadata, ratios, bars, table, plot.


def sh(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def metadata() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    cmdline = Path("/proc/cmdline").read_text()
    devices = {}
    for line in sh(["rdma", "link", "show"]).splitlines():
        m = re.search(r"link (\S+)/\d+ .*?state (\S+).*?netdev (\S+)", line)
        if m:
            netdev = m[3]
            mtu = Path(f"/sys/class/net/{netdev}/mtu")
            active = re.search(r"active_mtu:\s*(\S+)", sh(["ibv_devinfo", "-d", m[1]]))
            devices[m[1]] = {"state": m[2], "netdev": netdev,
                             "netdev_mtu": int(mtu.read_text()) if mtu.exists() else None,
                             "ib_active_mtu": active[1] if active else None}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "uname": " ".join(platform.uname()),
        "cpu_model": model[1] if model else platform.processor(),
        "cpus": os.cpu_count(),
        "in_vm": " hypervisor" in cpuinfo or "virtme" in cmdline,
        "in_qemu_test_vm": "virtme" in cmdline,  # booted by ci/vm.sh (virtme-ng)
        "git_rev": sh(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(sh(["git", "status", "--porcelain", "--untracked-files=no"])),
        "python": platform.python_version(),
        "rdma_devices": devices,
        "perftest": sh(["dpkg-query", "-W", "-f=${Version}", "perftest"]),
        "rdmacm_utils": sh(["dpkg-query", "-W", "-f=${Version}", "rdmacm-utils"]),
        "microsocks": sh(["dpkg-query", "-W", "-f=${Version}", "microsocks"]),
        "paths": {"device": f"{DEV_B} ({IP_B}) -> {DEV_A} ({IP_A}), gid index {GID_INDEX}",
                  "tcp": f"data server on {IP_B}; {IP_A} and {IP_B} are both local to one "
                         "kernel, so TCP between them goes through the loopback path",
                  "rdmaproxy": f"client -> SOCKS 127.0.0.1 -> ingress ({DEV_A}, {IP_A}) "
                               f"==RDMA==> egress ({DEV_B}, {IP_B}) -> data server {IP_B}"},
    }


def get(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compute_ratios(doc: dict[str, Any]) -> dict[str, Any]:
    single = get(doc, "rdmaproxy.bulk.download.1.mib_s")
    out: dict[str, Any] = {"compared": "rdmaproxy single-stream download (MiB/s) / anchor"}
    for size, label in ((64 * KiB, "64KiB"), (MiB, "1MiB")):
        out[f"vs_ib_write_bw_{label}"] = ratio(single, get(doc, f"device.ib_write_bw.{size}.mib_s"))
        out[f"vs_rstream_{label}"] = ratio(single, get(doc, f"rstream.{size}.mib_s"))
    out["vs_tcp_direct"] = ratio(single, get(doc, "tcp.direct.download.mib_s"))
    out["vs_microsocks"] = ratio(single, get(doc, "tcp.microsocks.download.mib_s"))
    return out


def evaluate_bars(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's bars. The throughput bars are judged on the paired rounds: the mean over the
    rounds of each round's ratio (the rounds are listed in the table)."""
    ratios = paired_ratios(doc)
    idle = get(doc, "rdmaproxy.idle_cpu_pct") or {}
    rss = get(doc, "rdmaproxy.peak_rss_mib") or {}
    pool = get(doc, "rdmaproxy.pool_size_mib")

    def mean(values: list[float]) -> float | None:
        return round(statistics.mean(values), 3) if values else None

    bars: list[tuple[str, float | None, str, float | None, list[float]]] = [
        ("1-stream download / ib_write_bw 1MiB", mean(ratios["x1_vs_ib_write_bw"]), ">=",
         0.8, ratios["x1_vs_ib_write_bw"]),
        ("1-stream download / rstream 1MiB", mean(ratios["x1_vs_rstream"]), ">=", 1.0,
         ratios["x1_vs_rstream"]),
        ("8-stream download / ib_write_bw 1MiB", mean(ratios["x8_vs_ib_write_bw"]), ">=", 0.9,
         ratios["x8_vs_ib_write_bw"]),
    ]
    for name in ("ingress", "egress"):
        bars.append((f"idle {name} CPU < 1 %", idle.get(name), "<", 1.0, []))
        bars.append((f"{name} peak RSS <= pool + 64 MiB", rss.get(name), "<=",
                     pool + 64 if pool else None, []))
    out = []
    for name, value, op, limit, rounds in bars:
        ok = None
        if value is not None and limit is not None:
            ok = value >= limit if op == ">=" else value < limit if op == "<" else value <= limit
        entry: dict[str, Any] = {
            "bar": name, "value": value, "op": op,
            "limit": round(limit, 2) if limit is not None else None,
            "result": {True: "PASS", False: "FAIL", None: "N/A"}[ok]}
        if rounds:
            entry["rounds"] = rounds
        out.append(entry)
    return out


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}{unit}" if value < 100 else f"{value:.1f}{unit}"
    return f"{value}{unit}"


def table_rows(doc: dict[str, Any], plan: Plan) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("== device limit (perftest, rxe1 -> rxe0)", "")]
    for tool in ("ib_write_bw", "ib_read_bw"):
        for size, label in ((64 * KiB, "64 KiB"), (MiB, "1 MiB")):
            label += f" (-o {outstanding_reads(size)})" if tool == "ib_read_bw" else ""
            rows.append((f"{tool} {label}", fmt(get(doc, f"device.{tool}.{size}.mib_s"),
                                                " MiB/s")))
    lat = "device.ib_write_lat.64"
    rows.append(("ib_write_lat 64 B typical / avg / p99",
                 f"{fmt(get(doc, f'{lat}.typical_us'))} / {fmt(get(doc, f'{lat}.avg_us'))} / "
                 f"{fmt(get(doc, f'{lat}.p99_us'))} us"))
    rows.append(("== rsocket (rstream ping-pong, 10.99.0.2 -> 10.99.0.1)", ""))
    for size, label in ((64 * KiB, "64 KiB"), (MiB, "1 MiB")):
        rows.append((f"rstream {label}", fmt(get(doc, f"rstream.{size}.mib_s"), " MiB/s")))
    rows.append(("== TCP (data server on 10.99.0.2; loopback path)", ""))
    rows.append(("direct TCP download", fmt(get(doc, "tcp.direct.download.mib_s"), " MiB/s")))
    rows.append(("microsocks download / upload",
                 f"{fmt(get(doc, 'tcp.microsocks.download.mib_s'))} / "
                 f"{fmt(get(doc, 'tcp.microsocks.upload.mib_s'))} MiB/s"))
    for key, label in (("direct", "direct TCP"), ("microsocks", "microsocks")):
        rows.append((f"{label} 64 B latency p50 / p99",
                     f"{fmt(get(doc, f'tcp.{key}.latency.p50_us'))} / "
                     f"{fmt(get(doc, f'tcp.{key}.latency.p99_us'))} us"))
        rows.append((f"{label} connections/s (sequential)",
                     fmt(get(doc, f"tcp.{key}.connect.conn_per_s"))))
    rows.append((f"== rdmaproxy (chunk {plan.chunk_size}, ring {plan.ring_size}, "
                 f"pool {plan.pool_size}, "
                 f"{plan.bulk_total // MiB} MiB per run)", ""))
    for direction in ("download", "upload"):
        for n in plan.streams:
            rows.append((f"{direction} x{n} streams",
                         fmt(get(doc, f"rdmaproxy.bulk.{direction}.{n}.mib_s"), " MiB/s")))
    rows.append(("64 B latency p50 / p99", f"{fmt(get(doc, 'rdmaproxy.latency.p50_us'))} / "
                 f"{fmt(get(doc, 'rdmaproxy.latency.p99_us'))} us"))
    rows.append(("connections/s (sequential)", fmt(get(doc, "rdmaproxy.connect.conn_per_s"))))
    for label, path in (("1-stream download", "rdmaproxy.bulk.download.1"),
                        ("8-stream download", "rdmaproxy.bulk.download.8"),
                        ("ib_write_bw 1 MiB (for comparison)", f"device.ib_write_bw.{MiB}")):
        cpu = get(doc, f"{path}.system_cpu_pct")
        if cpu:
            rows.append((f"machine CPU during {label}",
                         f"busy {cpu['busy']:.0f}% of {cpu['cpus']} (user {cpu['user']:.0f}, "
                         f"sys {cpu['system']:.0f}, softirq {cpu['softirq']:.0f})"))
    for name in ("ingress", "egress"):
        rows.append((f"{name}: CPU s/GiB all bulk / 1-stream download",
                     f"{fmt(get(doc, f'rdmaproxy.cpu_s_per_gib.{name}'))} / "
                     f"{fmt(get(doc, f'rdmaproxy.bulk.download.1.cpu_s_per_gib.{name}'))}"))
        rows.append((f"{name}: peak RSS (VmHWM)",
                     fmt(get(doc, f"rdmaproxy.peak_rss_mib.{name}"), " MiB")))
        rows.append((f"{name}: idle CPU over {plan.idle_seconds:.0f}s",
                     fmt(get(doc, f"rdmaproxy.idle_cpu_pct.{name}"), " %")))
    rows.append(("source/sink CPU s/GiB all bulk: client / server",
                 f"{fmt(get(doc, 'rdmaproxy.cpu_s_per_gib.bench_client'))} / "
                 f"{fmt(get(doc, 'rdmaproxy.cpu_s_per_gib.data_server'))}"))
    rows.append((f"== chunk-size sweep (1-stream download, {plan.sweep_total // MiB} MiB)", ""))
    for chunk in plan.chunk_sizes:
        rows.append((f"--chunk-size {chunk}",
                     fmt(get(doc, f"chunk_sweep.{parse_size(chunk)}.mib_s"), " MiB/s")))
    if get(doc, "paired.rounds"):
        rows.append((f"== paired rounds (the bars; each round back to back, "
                     f"{plan.bulk_total // MiB} MiB per download)", ""))
        rows.extend(paired_rows(doc))
    if doc.get("compare"):
        rows.append((f"== --compare (download, {plan.bulk_total // MiB} MiB, rounds alternate)",
                     ""))
        rows.extend(compare_rows(doc))
    rows.append(("== ratios (rdmaproxy 1-stream download / anchor)", ""))
    for key, value in doc.get("ratios", {}).items():
        if key != "compared":
            rows.append((key, fmt(value)))
    return rows


def render_table(doc: dict[str, Any], plan: Plan) -> str:
    meta = doc["meta"]
    lines = ["rdmaproxy benchmark - MiB/s = 2^20 B/s; latency in microseconds",
             f"{meta['uname'].strip()}; in VM: {meta['in_vm']} "
             f"(ci/vm.sh: {meta['in_qemu_test_vm']}); git {meta['git_rev'][:12]}"
             f"{' (dirty)' if meta['git_dirty'] else ''}; {meta['date']}"]
    for label, value in table_rows(doc, plan):
        lines.append(f"\n{label}" if label.startswith("==") else f"  {label:<48} {value}")
    lines.append("\n== bars (issue 4; reported, not asserted; ratios: mean of the paired "
                 "rounds)")
    for bar in doc["bars"]:
        rounds = bar.get("rounds")
        each = f"  (rounds: {' / '.join(f'{v:.2f}' for v in rounds)})" if rounds else ""
        lines.append(f"  {bar['result']:<4} {bar['bar']:<44} {fmt(bar['value'])} {bar['op']} "
                     f"{fmt(bar['limit'])}{each}")
    if doc["errors"]:
        lines.append("\n== measurements that FAILED")
        for err in doc["errors"]:
            lines.append(f"  {err['measurement']}: {err['error'].splitlines()[0]}")
    return "\n".join(lines) + "\n"


def anchors(doc: dict[str, Any]) -> list[tuple[str, float, str]]:
    candidates = [("ib_write_bw 1 MiB", f"device.ib_write_bw.{MiB}.mib_s", "tab:red"),
                  ("ib_write_bw 64 KiB", f"device.ib_write_bw.{64 * KiB}.mib_s", "salmon"),
                  ("rstream 1 MiB", f"rstream.{MiB}.mib_s", "tab:purple"),
                  ("direct TCP", "tcp.direct.download.mib_s", "tab:gray"),
                  ("microsocks", "tcp.microsocks.download.mib_s", "tab:olive")]
    return [(label, v, color) for label, path, color in candidates
            if (v := get(doc, path)) is not None]


def plot(doc: dict[str, Any], plan: Plan, path: Path) -> None:
    # a writable, kept config dir (.cache/ is gitignored): the font cache is built only once
    os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))
    import matplotlib  # type: ignore[import-untyped]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-untyped]
    from matplotlib import ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    for direction, marker in (("download", "o"), ("upload", "s")):
        pts = [(n, get(doc, f"rdmaproxy.bulk.{direction}.{n}.mib_s")) for n in plan.streams]
        pts = [(n, v) for n, v in pts if v is not None]
        if pts:
            left.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linewidth=2,
                      label=f"rdmaproxy {direction}")
    left.set_xscale("log", base=2)
    left.set_xticks(plan.streams, [str(n) for n in plan.streams])
    left.set_xlabel("concurrent streams")
    left.set_title("rdmaproxy throughput by streams (aggregate)")
    pts2 = [(parse_size(c), get(doc, f"chunk_sweep.{parse_size(c)}.mib_s"))
            for c in plan.chunk_sizes]
    pts2 = [(c, v) for c, v in pts2 if v is not None]
    if pts2:
        right.plot([p[0] for p in pts2], [p[1] for p in pts2], marker="o", linewidth=2,
                   label="rdmaproxy 1-stream download")
    right.set_xscale("log", base=2)
    right.set_xticks([parse_size(c) for c in plan.chunk_sizes], plan.chunk_sizes)
    right.set_xlabel("--chunk-size")
    right.set_title("rdmaproxy throughput by chunk size")
    for ax in (left, right):
        for label, value, color in anchors(doc):
            ax.axhline(value, color=color, linestyle="--", linewidth=1,
                       label=f"{label} ({value:.1f})")
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("MiB/s (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    meta = doc["meta"]
    where = "QEMU TCG VM" if meta["in_qemu_test_vm"] else "native"
    fig.suptitle(f"rdmaproxy bench {meta['date']} - git {meta['git_rev'][:10]} - {where} - "
                 f"{meta['uname'].split()[2]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=REPO / "bench-results",
                   help="directory for bench.json and bench.png (default bench-results/)")
    p.add_argument("--quick", action="store_true", help="shrink everything (smoke test)")
    p.add_argument("--chunk-sizes", help="chunk sizes to sweep (default "
                   "16K,64K,128K,256K,512K,1M; --quick 1M)")
    p.add_argument("--chunk-size", default="1M",
                   help="--chunk-size of the proxies outside the sweep (default 1M, "
                   "rdmaproxy's default)")
    p.add_argument("--ring-size", default="4M",
                   help="--ring-size of both proxies (default 4M, rdmaproxy's default)")
    p.add_argument("--total", help="bytes per bulk run, split across streams (default 128M; "
                   "--quick 16M)")
    p.add_argument("--pool-size", default="288M",
                   help="--pool-size of both proxies (default 288M: 71 rings of 4 MiB, enough "
                   "for 64 streams; rdmaproxy's default 256M holds 63)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=OPTIONS",
                   type=parse_variant,
                   help="also run 1- and 8-stream downloads with extra `rdmaproxy serve` "
                   "OPTIONS, alternating with the other variants --rounds times (e.g. "
                   "--compare default= --compare pyverbs=--no-post-thread); repeatable")
    p.add_argument("--rounds", type=int, default=3, help="rounds of --compare (default 3)")
    p.add_argument("--pairs", type=int, help="paired rounds (anchors and rdmaproxy back to "
                   "back) that the bars are judged on (default 3; --quick 1)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: device,rstream,"
                   "tcp,rdmaproxy,paired,sweep")
    return p.parse_args(argv)


SECTIONS = ("device", "rstream", "tcp", "rdmaproxy", "paired", "sweep")  # and --compare


def preflight(skip: set[str]) -> None:
    missing = [t for t in ("ib_write_bw", "ib_read_bw", "ib_write_lat", "rstream", "microsocks",
                           "rdma") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench: missing tools {missing}: run RDMAPROXY_ONLY_INSTALL=1 "
                         "bash scripts/test.sh (it installs the Debian packages)")
    for dev in (DEV_A, DEV_B) if set(SECTIONS) - skip - {"tcp"} else ():
        if not Path(f"/sys/class/infiniband/{dev}").exists():
            raise SystemExit(f"bench: no RDMA device {dev}: run scripts/setup_rxe.sh as root, "
                             "or scripts/bench.sh (which uses the VM where needed)")


def keep_logs(work: Path, dest: Path) -> None:
    """Copy the proxies' logs into ``dest`` (one file per run and proxy), drop the work dir."""
    shutil.rmtree(dest, ignore_errors=True)
    for log_file in work.glob("*/*.log"):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_file, dest / f"{log_file.parent.name}-{log_file.name}")
    shutil.rmtree(work, ignore_errors=True)


def start_data_server(children: Children) -> Target:
    proc = children.start([sys.executable, str(Path(__file__).resolve()), "_dataserver", IP_B],
                          stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError(f"data server did not start (exit {proc.poll()})")
    return Target(IP_B, int(line), proc.pid)


def run(args: argparse.Namespace) -> int:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    preflight(skip)
    plan = make_plan(args)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # admin sockets cannot live on the VM's 9p mount of the checkout: work in /tmp, keep logs
    work = Path(tempfile.mkdtemp(prefix="rdmaproxy-bench-"))
    res = Results()
    res.doc["meta"] = metadata()
    res.doc["plan"] = dict(vars(plan), chunk_sizes_bytes=[str(parse_size(c))
                                                          for c in plan.chunk_sizes])
    res.doc["units"] = {"throughput": "MiB/s = 2^20 bytes/s", "latency": "microseconds",
                        "cpu": "CPU seconds (utime+stime) per GiB moved", "rss": "MiB (VmHWM)"}
    started = time.monotonic()
    children = Children()
    # SIGTERM (a timeout, a killed VM run) unwinds like Ctrl-C, so children are killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        target = start_data_server(children)
        if "device" not in skip:
            device_section(res, children, plan)
        if "rstream" not in skip:
            rstream_section(res, children, plan)
        if "tcp" not in skip:
            tcp_section(res, children, plan, target)
        if "rdmaproxy" not in skip:
            res.measure("rdmaproxy", lambda: rdmaproxy_section(res, children, plan, work, target))
        if "paired" not in skip:
            paired_section(res, children, plan, work, target)
        if "sweep" not in skip:
            sweep_section(res, children, plan, work, target)
        if plan.compare:
            compare_section(res, children, plan, work, target)
    finally:
        children.close()
        keep_logs(work, out / "logs")
    res.doc["ratios"] = compute_ratios(res.doc)
    res.doc["bars"] = evaluate_bars(res.doc)
    res.doc["errors"] = res.errors
    res.doc["run_seconds"] = round(time.monotonic() - started, 1)
    (out / "bench.json").write_text(json.dumps(res.doc, indent=2) + "\n")
    res.measure("plot", lambda: plot(res.doc, plan, out / "bench.png"))
    res.doc["errors"] = res.errors
    (out / "bench.json").write_text(json.dumps(res.doc, indent=2) + "\n")
    table = render_table(res.doc, plan)
    (out / "bench.txt").write_text(table)
    print("\n" + table, end="")
    print(f"\nwrote bench.json, bench.png and bench.txt in {out} ({res.doc['run_seconds']}s)")
    return 1 if res.errors else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["_dataserver"]:
        data_server_main(argv[1])
        return 0
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
