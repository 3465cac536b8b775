"""The benchmark runs end to end: `scripts/bench.py --quick` as a subprocess over the real rxe
devices, then its bench.json has every figure, each a positive number, and bench.png exists.

Only that the measurements work is checked here; the bars of issue 4 are the benchmark's to
report (never timed assertions in tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rxe_topology import RxePair

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"
SIZES = ("65536", "1048576")
PROXIES = ("ingress", "egress")


def figure(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for key in path.split("."):
        assert isinstance(node, dict) and key in node, f"bench.json lacks {path} (at {key})"
        node = node[key]
    return node


def expected_figures(doc: dict[str, Any]) -> list[str]:
    paths = [f"device.{tool}.{size}.mib_s" for tool in ("ib_write_bw", "ib_read_bw")
             for size in SIZES]
    paths += ["device.ib_write_lat.64.avg_us", "device.ib_write_lat.64.p99_us"]
    paths += [f"rstream.{size}.mib_s" for size in SIZES]
    paths += ["tcp.direct.download.mib_s", "tcp.microsocks.download.mib_s",
              "tcp.microsocks.upload.mib_s"]
    for anchor in ("tcp.direct", "tcp.microsocks", "rdmaproxy"):
        paths += [f"{anchor}.latency.p50_us", f"{anchor}.latency.p99_us",
                  f"{anchor}.connect.conn_per_s"]
    paths += [f"rdmaproxy.bulk.{d}.{n}.mib_s" for d in ("download", "upload") for n in (1, 8, 64)]
    paths += [f"rdmaproxy.{what}.{p}" for what in ("cpu_s_per_gib", "peak_rss_mib")
              for p in PROXIES]
    paths += [f"chunk_sweep.{size}.mib_s" for size in doc["plan"]["chunk_sizes_bytes"]]
    paths += [f"ratios.vs_{a}_{s}" for a in ("ib_write_bw", "rstream") for s in ("64KiB", "1MiB")]
    return paths


def test_bench_quick(rxe_pair: RxePair, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out),
                           "--compare", "pyverbs=--no-post-thread", "--rounds", "1"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"bench failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    doc = json.loads((out / "bench.json").read_text())
    assert doc["errors"] == []
    for path in expected_figures(doc):
        value = figure(doc, path)
        assert isinstance(value, int | float) and value > 0, f"{path} = {value!r}"
    for proxy in PROXIES:  # idle CPU may be 0.0 (no tick in the window): present, not negative
        assert figure(doc, f"rdmaproxy.idle_cpu_pct.{proxy}") >= 0
    for run in ("download_1", "download_8", "upload_1", "upload_8"):  # untimed, checksummed
        assert figure(doc, f"rdmaproxy.content_check.{run}.content_verified") is True
    meta = doc["meta"]
    assert meta["uname"] and meta["git_rev"] and meta["date"]
    assert {rxe_pair.a.device, rxe_pair.b.device} <= set(meta["rdma_devices"])
    assert all(d["netdev_mtu"] for d in meta["rdma_devices"].values())
    (paired,) = doc["paired"]["rounds"]  # --quick: one round of anchors and downloads
    for key in ("ib_write_bw", "rstream", "download_1", "download_8"):
        assert paired[key]["mib_s"] > 0, key
    assert paired["download_1"]["system_cpu_pct"]["busy"] > 0
    (compared,) = doc["compare"]["pyverbs"]["rounds"]  # the --no-post-thread variant ran too
    assert compared["1"]["mib_s"] > 0 and compared["8"]["mib_s"] > 0
    assert {b["result"] for b in doc["bars"]} <= {"PASS", "FAIL"}
    assert all(len(b["rounds"]) == 1 for b in doc["bars"][:3])
    assert (out / "bench.png").stat().st_size > 10_000
    assert "== bars" in done.stdout
