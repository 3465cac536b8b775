"""End to end with real processes and real clients, in the RDMA topology:

    curl / python-socks / proxychains4 --SOCKS--> `rdmaproxy serve` (ingress, rxe0)
        ==RDMA==> `rdmaproxy serve` (egress, rxe1) --TCP--> busybox httpd / a TCP sink

64 MiB downloads (curl --socks5-hostname, --socks5, --socks4a) and a 64 MiB upload are
verified by sha256; afterwards `rdmaproxy status --json` shows no streams on either proxy.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_socks.sync import Proxy
from rxe_topology import RxePair

MiB = 1 << 20
BLOB_SIZE = 64 * MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def rdmaproxy(*args: str, env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rdmaproxy", *args], env=env, text=True,
                          capture_output=True, timeout=60, **kw)


def status(name: str, env: dict[str, str]) -> dict[str, Any]:
    done = rdmaproxy("status", "--json", "--name", name, env=env)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


class Cluster:
    def __init__(self, tmp: Path, rxe: RxePair, rdma_port: int) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, RDMAPROXY_RUN_DIR=str(tmp / "run"))
        secret = tmp / "secret"
        secret.write_text("cluster secret\n")
        secret.chmod(0o600)
        self.socks_port = free_port()
        common = ["--secret-file", str(secret), "--pool-size", "32M", "--ring-size", "1M"]
        self.logs = {name: open(tmp / f"{name}.log", "w") for name in ("egress", "ingress")}
        self.procs = {
            "egress": subprocess.Popen(
                [sys.executable, "-m", "rdmaproxy", "serve", "--name", "egress",
                 "--listen", f"{rxe.b.ip}:{rdma_port}", *common],
                env=self.env, stdout=self.logs["egress"], stderr=subprocess.STDOUT),
            "ingress": subprocess.Popen(
                [sys.executable, "-m", "rdmaproxy", "serve", "--name", "ingress",
                 "--socks", f"127.0.0.1:{self.socks_port}",
                 "--listen", f"{rxe.a.ip}:{rdma_port + 1}", "--peer", f"{rxe.b.ip}:{rdma_port}",
                 *common],
                env=self.env, stdout=self.logs["ingress"], stderr=subprocess.STDOUT),
        }

    def wait_until_peered(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited {proc.returncode}:\n{self.log(name)}")
            try:
                peers = status("ingress", self.env).get("peers", [])
                if any(p.get("state") == "up" for p in peers):
                    return
            except (AssertionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        pytest.fail(f"ingress never peered:\n{self.log('ingress')}\n{self.log('egress')}")

    def log(self, name: str) -> str:
        self.logs[name].flush()
        return (self.tmp / f"{name}.log").read_text()[-4000:]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for name, proc in self.procs.items():
            try:
                assert proc.wait(timeout=30) == 0, f"{name} exit {proc.returncode}"
            finally:
                if proc.poll() is None:
                    proc.kill()
                self.logs[name].close()


@pytest.fixture(scope="module")
def cluster(rxe_pair: RxePair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    port = 41000 + os.getpid() % 1000 * 2
    c = Cluster(tmp_path_factory.mktemp("cluster"), rxe_pair, port)
    try:
        c.wait_until_peered()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def http_blob(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    root = tmp_path_factory.mktemp("www")
    data = os.urandom(BLOB_SIZE)
    (root / "blob").write_bytes(data)
    port = free_port()
    httpd = subprocess.Popen(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h",
                              str(root)])
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port, hashlib.sha256(data).hexdigest()
    finally:
        httpd.terminate()
        httpd.wait(timeout=10)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize(
    ("flag", "host"),
    [("--socks5-hostname", "localhost"), ("--socks5", "127.0.0.1"), ("--socks4a", "localhost")],
)
def test_curl_downloads_64_mib(cluster: Cluster, http_blob: tuple[int, str], tmp_path: Path,
                               flag: str, host: str) -> None:
    port, digest = http_blob
    out = tmp_path / "blob"
    started = time.monotonic()
    done = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "300", flag, f"127.0.0.1:{cluster.socks_port}",
         f"http://{host}:{port}/blob", "-o", str(out)],
        capture_output=True, text=True, timeout=320,
    )
    assert done.returncode == 0, f"{done.stderr}\n{cluster.log('ingress')}"
    elapsed = time.monotonic() - started
    print(f"curl {flag}: {BLOB_SIZE / MiB / elapsed:.1f} MiB/s")
    assert out.stat().st_size == BLOB_SIZE
    assert sha256_file(out) == digest


def test_proxychains_curl(cluster: Cluster, http_blob: tuple[int, str], tmp_path: Path) -> None:
    port, digest = http_blob
    conf = tmp_path / "proxychains.conf"
    conf.write_text(
        f"strict_chain\nquiet_mode\n[ProxyList]\nsocks5 127.0.0.1 {cluster.socks_port}\n"
    )
    out = tmp_path / "blob"
    done = subprocess.run(
        ["proxychains4", "-q", "-f", str(conf), "curl", "-sS", "--fail", "--max-time", "300",
         f"http://127.0.0.1:{port}/blob", "-o", str(out)],
        capture_output=True, text=True, timeout=320,
    )
    assert done.returncode == 0, done.stderr
    assert sha256_file(out) == digest


def test_upload_64_mib_verified_at_server(cluster: Cluster) -> None:
    data = os.urandom(BLOB_SIZE)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    result: dict[str, str] = {}

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            h = hashlib.sha256()
            buf = bytearray(MiB)
            while n := conn.recv_into(buf):
                h.update(memoryview(buf)[:n])
            result["digest"] = h.hexdigest()
            conn.sendall(h.hexdigest().encode())

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{cluster.socks_port}", rdns=True)
    with proxy.connect("127.0.0.1", port, timeout=60) as sock:
        sock.settimeout(300)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # half-close: the answer still comes back
        answer = b""
        while chunk := sock.recv(100):
            answer += chunk
    thread.join(timeout=60)
    server.close()
    assert result["digest"] == hashlib.sha256(data).hexdigest() == answer.decode()


def test_bind_is_not_supported_and_refused_port(cluster: Cluster) -> None:
    with socket.create_connection(("127.0.0.1", cluster.socks_port), timeout=30) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")  # BIND
        assert s.recv(2) == b"\x05\x07"
    closed = free_port()
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{cluster.socks_port}")
    with pytest.raises(Exception) as failure:
        proxy.connect("127.0.0.1", closed, timeout=60)
    assert getattr(failure.value, "error_code", None) == 0x05


def test_registry_empty_and_pool_free_afterwards(cluster: Cluster) -> None:
    deadline = time.monotonic() + 30
    while True:
        docs = {name: status(name, cluster.env) for name in ("ingress", "egress")}
        if all(not d["streams"] for d in docs.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name, doc in docs.items():
        assert doc["streams"] == [], f"{name}: {doc['streams']}"
        assert doc["totals"]["slots_used"] == 0, f"{name}: {doc['totals']}"
    listing = rdmaproxy("status", env=cluster.env)
    assert listing.returncode == 0
    assert "ingress" in listing.stdout and "egress" in listing.stdout
