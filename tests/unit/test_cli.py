"""The ``rdmaproxy`` command line, run as ``python -m rdmaproxy`` subprocesses."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rdmaproxy import __version__
from rdmaproxy.cli import build_parser, format_status, main
from rdmaproxy.config import RUN_DIR_ENV

TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rpc-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rdmaproxy", *args],
        env=os.environ | {RUN_DIR_ENV: str(run_dir), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_version(run_dir: Path) -> None:
    out = run(run_dir, "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"rdmaproxy {__version__}"


def test_no_command_prints_help_and_exits_2(run_dir: Path) -> None:
    out = run(run_dir)
    assert out.returncode == 2
    assert "serve" in out.stderr and "status" in out.stderr


def test_every_flag_is_documented_in_help(run_dir: Path) -> None:
    _, subparsers = build_parser()
    for command, parser in subparsers.items():
        out = run(run_dir, command, "--help")
        assert out.returncode == 0
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{command} {action.option_strings} has no help"
            for flag in action.option_strings:
                assert flag in out.stdout, f"{flag} missing from `rdmaproxy {command} --help`"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["serve"], "error: nothing to serve: give --socks"),
        (["serve", "--socks", "127.0.0.1"], "error: argument --socks: expected HOST:PORT"),
        (["serve", "--socks", "a:1", "--pool-size", "lots"], "error: argument --pool-size:"),
        (["serve", "--socks", "a:1", "--ring-size", "5000"], "error: argument --ring-size:"),
        (["serve", "--listen", "10.0.0.1:1"], "error: argument --secret-file: is required"),
        (["serve", "--socks", "a:1", "--peer", "10.0.0.2:1"], "error: argument --peer:"),
        (["serve", "--socks", "a:1", "--log-level", "x"], "error: argument --log-level:"),
        (["serve", "--sock", "a:1"], "error: unrecognized arguments: --sock"),
        (["status", "--name", "a", "--socket", "b"], "error: argument --socket: not allowed"),
        (["frobnicate"], "error: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(run_dir: Path, args: list[str], fragment: str) -> None:
    out = run(run_dir, *args)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.endswith("\n"), out.stderr
    assert fragment in out.stderr
    assert out.stderr.startswith("rdmaproxy")


def test_bad_users_file(run_dir: Path) -> None:
    users = run_dir / "users"
    users.write_text("alice:secret\nalice:again\n")
    out = run(run_dir, "serve", "--socks", "127.0.0.1:0", "--users", str(users))
    assert out.returncode == 2
    assert out.stderr == (
        f"rdmaproxy serve: error: argument --users: {users}:2: duplicate user 'alice' "
        "(first defined on line 1)\n"
    )


def test_bad_secret_file(run_dir: Path) -> None:
    secret = run_dir / "secret"
    secret.write_text("\n")
    out = run(run_dir, "serve", "--listen", "10.0.0.1:7471", "--secret-file", str(secret))
    assert out.returncode == 2
    assert out.stderr == (
        f"rdmaproxy serve: error: argument --secret-file: secret file {secret}: is empty "
        "(it must hold the shared secret)\n"
    )
    out = run(run_dir, "serve", "--listen", "10.0.0.1:7471", "--secret-file", str(run_dir / "no"))
    assert out.returncode == 2
    assert "argument --secret-file: secret file" in out.stderr and "No such file" in out.stderr


def test_startup_failure_is_one_line_exit_1(run_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = run(run_dir, "serve", "--socks", f"127.0.0.1:{port}", "--log-level", "error")
    assert out.returncode == 1
    assert out.stderr == (
        f"rdmaproxy: error: --socks 127.0.0.1:{port}: cannot listen: Address already in use\n"
    )
    assert list(run_dir.iterdir()) == []  # the admin socket was removed again


def test_status_with_nothing_running(run_dir: Path) -> None:
    out = run(run_dir, "status")
    assert out.returncode == 1
    assert out.stderr == f"rdmaproxy status: no rdmaproxy is running (looked in {run_dir})\n"
    out = run(run_dir, "status", "--json", "--name", "nope")
    assert out.returncode == 1 and "no proxy named 'nope' is running" in out.stderr
    out = run(run_dir, "status", "--socket", str(run_dir / "x.sock"))
    assert out.returncode == 1 and "no such socket" in out.stderr


def test_status_reports_stale_sockets(run_dir: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run_dir / "dead.sock"))
    s.close()
    out = run(run_dir, "status")
    assert out.returncode == 1
    assert f"{run_dir / 'dead.sock'}: stale socket, no proxy listening; ignored" in out.stderr
    assert "no rdmaproxy is running" in out.stderr


def test_main_returns_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert main(["serve", "--pool-size", "1x", "--socks", "a:1"]) == 2
    err = capsys.readouterr().err
    assert "argument --pool-size" in err


def test_format_status_rdma_block() -> None:
    doc = {
        "name": "node-a",
        "pid": 7,
        "mode": "rdma",
        "started_at": 1000.0,
        "now": 1061.0,
        "socks": [{"host": "127.0.0.1", "port": 1080}],
        "listen": {"host": "10.99.0.1", "port": 7471},
        "peers": [{"peer": "10.99.0.2:7471", "state": "connected", "streams": 1}],
        "pool": {"size": 64 << 20, "ring_size": 1 << 20, "slots_total": 63},
        "node": {"device": "rxe0"},
        "totals": {
            "streams": 1, "by_state": {"OPEN": 1}, "slots_total": 63, "slots_used": 1,
            "slots_free": 62, "ring_size": 1 << 20, "bytes_client_to_remote": 2048,
            "bytes_remote_to_client": 0,
        },
        "streams": [
            {"slot": 0, "role": "ingress", "peer": "10.99.0.2:7471", "peer_slot": 5,
             "state": "OPEN", "client": {"host": "127.0.0.1", "port": 5555},
             "dest": {"host": "example.com", "port": 443}, "bytes_client_to_remote": 2048,
             "bytes_remote_to_client": 0, "age_s": 3.0},
        ],
    }  # fmt: skip
    lines = format_status(doc, "/run/rdmaproxy/node-a.sock").splitlines()
    assert lines[0] == "== node-a: pid 7, rdma, up 1m01s, socket /run/rdmaproxy/node-a.sock"
    assert lines[1:6] == [
        "socks:   127.0.0.1:1080",
        "listen:  10.99.0.1:7471",
        "device:  rxe0",
        "peers:   10.99.0.2:7471 connected (streams 1)",
        "pool:    64 MiB, 63 rings of 1 MiB",
    ]
    assert lines[6].startswith("totals:  1 streams (OPEN 1); pool slots 1 used / 62 free of 63")
    assert lines[7].split()[0] == "SLOT"
    assert lines[8].split()[:5] == ["0", "ingress", "10.99.0.2:7471", "5", "OPEN"]
