"""``rdmaproxy serve`` option parsing and validation (rdmaproxy.config), in process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rdmaproxy import config as config_mod
from rdmaproxy.config import (
    DEFAULT_POOL_SIZE,
    DEFAULT_RING_SIZE,
    RUN_DIR_ENV,
    ServeConfig,
    default_name,
    default_run_dir,
    format_hostport,
    parse_hostport,
    parse_serve_args,
    parse_size,
    socket_path_for,
    status_run_dirs,
)


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run"
    monkeypatch.setenv(RUN_DIR_ENV, str(d))
    return d


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "secret"
    p.write_bytes(b"s3cret\n")
    p.chmod(0o600)
    return p


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Parse ``argv``, expect exit status 2; return the (single) stderr line."""
    with pytest.raises(SystemExit) as info:
        parse_serve_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("rdmaproxy serve: error: ")
    return err.strip()


# ------------------------------------------------------------------------ value parsers


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("65536", 65536),
        ("0", 0),
        ("512B", 512),
        ("4K", 4096),
        ("4k", 4096),
        ("4KiB", 4096),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("64mib", 64 << 20),
        ("1G", 1 << 30),
        (" 2GiB ", 2 << 30),
        ("1T", 1 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a size"),
        ("12x", "not a size"),
        ("1.5G", "not a size"),
        ("-1M", "not a size"),
        ("64MB", "ambiguous"),
        ("1kb", "ambiguous"),
        ("64iB", "not a size"),
        ("M", "not a size"),
    ],
)
def test_parse_size_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_size(text)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:1080", ip_only=True) == ("127.0.0.1", 1080)
    assert parse_hostport("localhost:1080", ip_only=False) == ("localhost", 1080)
    assert parse_hostport("[::1]:7471", ip_only=True) == ("::1", 7471)
    assert parse_hostport("[2001:DB8::1]:1", ip_only=True) == ("2001:db8::1", 1)
    assert parse_hostport("0.0.0.0:0", ip_only=False, allow_port_zero=True) == ("0.0.0.0", 0)
    for text, ip_only, why in [
        ("1.2.3.4", True, "expected HOST:PORT"),
        (":80", False, "expected HOST:PORT"),
        ("::1:80", True, "brackets"),
        ("[1.2.3.4]:80", True, "not an IPv6"),
        ("[::1]80", True, "expected"),
        ("host:http", False, "not a number"),
        ("host:65536", False, "out of range 1..65535"),
        ("host:0", False, "out of range"),
        ("example.com:80", True, "not an IP address"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_hostport(text, ip_only=ip_only)
    assert format_hostport(("::1", 5)) == "[::1]:5"
    assert format_hostport(("a", 5)) == "a:5"


def test_default_name() -> None:
    assert default_name([("127.0.0.1", 1080)], None) == "127.0.0.1-1080"
    assert default_name([("127.0.0.1", 1080)], ("10.99.0.1", 7471)) == "10.99.0.1-7471"
    assert default_name([], ("fe80::1", 7471)) == "fe80__1-7471"
    assert default_name([], None) == "rdmaproxy"


# ------------------------------------------------------------------------------ configs


def test_direct_defaults(run_dir: Path) -> None:
    cfg = parse_serve_args(["--socks", "127.0.0.1:1080"])
    assert cfg.socks == (("127.0.0.1", 1080),)
    assert cfg.listen is None and cfg.peers == () and cfg.secret is None
    assert cfg.mode == "direct" and not cfg.rdma
    assert cfg.users is None
    assert cfg.pool_size == DEFAULT_POOL_SIZE == 256 << 20
    assert cfg.ring_size == DEFAULT_RING_SIZE == 4 << 20
    assert cfg.chunk_size == 1 << 20 and cfg.post_thread is None  # auto: node.py decides
    assert cfg.ack_timeout == 16
    assert cfg.name == "127.0.0.1-1080"
    assert cfg.admin_socket == run_dir / "127.0.0.1-1080.sock"
    assert cfg.handshake_timeout == 10.0 and cfg.connect_timeout == 10.0
    assert cfg.log_level == "INFO"


@pytest.mark.parametrize("value", ["0", "32", "-1", "x"])
def test_bad_ack_timeout_names_the_option(value: str, run_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_serve_args(["--socks", "127.0.0.1:1080", "--ack-timeout", value])
    assert "--ack-timeout" in capsys.readouterr().err


def test_post_thread_flag(run_dir: Path) -> None:
    assert parse_serve_args(["--socks", "127.0.0.1:1080", "--post-thread"]).post_thread
    assert not parse_serve_args(["--socks", "127.0.0.1:1080", "--no-post-thread"]).post_thread


def test_rdma_config(secret_file: Path, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:wonder land\n")
    cfg = parse_serve_args(
        [
            "--socks", "127.0.0.1:1080",
            "--socks", "[::1]:1080",
            "--listen", "10.99.0.1:7471",
            "--peer", "10.99.0.2:7471",
            "--peer", "10.99.0.3:7471",
            "--secret-file", str(secret_file),
            "--users", str(users),
            "--pool-size", "16MiB",
            "--ring-size", "64K",
            "--chunk-size", "16K",
            "--name", "node-a",
            "--admin-socket", str(tmp_path / "a.sock"),
            "--handshake-timeout", "2.5",
            "--connect-timeout", "3",
            "--log-level", "DEBUG",
        ]
    )  # fmt: skip
    assert cfg.socks == (("127.0.0.1", 1080), ("::1", 1080))
    assert cfg.listen == ("10.99.0.1", 7471)
    assert cfg.peers == (("10.99.0.2", 7471), ("10.99.0.3", 7471))
    assert cfg.secret == b"s3cret" and cfg.secret_file == secret_file
    assert "s3cret" not in repr(cfg)
    assert cfg.users is not None and cfg.users.check(b"alice", b"wonder land")
    assert (cfg.pool_size, cfg.ring_size, cfg.chunk_size) == (16 << 20, 64 << 10, 16 << 10)
    assert cfg.name == "node-a" and cfg.admin_socket == tmp_path / "a.sock"
    assert (cfg.handshake_timeout, cfg.connect_timeout) == (2.5, 3.0)
    assert cfg.log_level == "DEBUG" and cfg.mode == "rdma"


def test_egress_only_node(secret_file: Path, run_dir: Path) -> None:
    cfg = parse_serve_args(["--listen", "10.99.0.2:7471", "--secret-file", str(secret_file)])
    assert cfg.socks == () and cfg.peers == () and cfg.rdma
    assert cfg.admin_socket == run_dir / "10.99.0.2-7471.sock"


def test_name_picks_the_socket_and_relative_admin_socket_is_made_absolute(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse_serve_args(["--socks", "a:1", "--name", "x"]).admin_socket == run_dir / "x.sock"
    monkeypatch.chdir(tmp_path)
    cfg = parse_serve_args(["--socks", "a:1", "--admin-socket", "rel.sock"])
    assert cfg.admin_socket == tmp_path / "rel.sock"


def test_serve_config_can_be_built_directly() -> None:
    cfg = ServeConfig(socks=(("127.0.0.1", 0),))
    assert cfg.admin_socket is None and cfg.mode == "direct"


S = ["--socks", "a:1"]
BAD = [
    ([], "nothing to serve: give --socks"),
    (["--socks", "1.2.3.4"], "argument --socks: expected HOST:PORT"),
    (["--socks", "127.0.0.1:99999"], "argument --socks: port 99999"),
    ([*S, *S], "argument --socks: a:1 is given twice"),
    ([*S, "--pool-size", "12x"], "argument --pool-size: '12x' is not a size"),
    ([*S, "--pool-size", "64MB"], "argument --pool-size: '64MB' is ambiguous"),
    ([*S, "--pool-size", "0"], "argument --pool-size: pool size must be"),
    ([*S, "--pool-size", "1M"], "argument --pool-size: pool size 1048576"),
    ([*S, "--ring-size", "3000"], "argument --ring-size: must be a power of two"),
    ([*S, "--ring-size", "2K"], "argument --ring-size: must be a power of two"),
    ([*S, "--ring-size", "4G"], "argument --ring-size: must be a power of two"),
    ([*S, "--chunk-size", "1K"], "argument --chunk-size: must be from 4 KiB to 1 MiB"),
    ([*S, "--chunk-size", "2M"], "argument --chunk-size: must be from 4 KiB to 1 MiB"),
    (["--listen", "foo:1"], "argument --listen: 'foo' is not an IP address"),
    (["--listen", "10.0.0.1:0"], "argument --listen: port 0 is out of range"),
    (["--listen", "10.0.0.1:7471"], "argument --secret-file: is required"),
    ([*S, "--peer", "10.0.0.2:7471"], "argument --peer: needs --listen"),
    ([*S, "--peer", "10.0.0.2"], "argument --peer: expected HOST:PORT"),
    ([*S, "--users", "/nonexistent/u"], "argument --users: /nonexistent/u: cannot read"),
    ([*S, "--name", "a/b"], "argument --name: 'a/b'"),
    ([*S, "--name", ""], "argument --name: ''"),
    ([*S, "--handshake-timeout", "0"], "argument --handshake-timeout: must be a positive"),
    ([*S, "--connect-timeout", "nan"], "argument --connect-timeout: must be a positive"),
    ([*S, "--connect-timeout", "soon"], "argument --connect-timeout: 'soon' is not a number"),
    ([*S, "--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    ([*S, "--admin-socket", "/" + "x" * 120], "argument --admin-socket: admin socket path"),
    ([*S, "--admin-socket", "/tmp"], "argument --admin-socket: /tmp is a directory"),
    ([*S, "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD)
def test_bad_values_exit_2_with_one_line_naming_the_flag(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fragment in fails(argv, capsys)


def test_long_default_socket_path_blames_the_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / ("d" * 90)))
    line = fails(["--socks", "a:1", "--name", "n" * 40], capsys)
    assert "argument --name: admin socket path" in line and "longer than 107 bytes" in line


def test_peer_checks(secret_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--listen", "10.0.0.1:7471", "--secret-file", str(secret_file)]
    line = fails([*base, "--peer", "10.0.0.1:7471"], capsys)
    assert "argument --peer: 10.0.0.1:7471 is this node's own --listen address" in line
    line = fails([*base, "--peer", "10.0.0.2:1", "--peer", "10.0.0.2:1"], capsys)
    assert "argument --peer: 10.0.0.2:1 is given twice" in line
    line = fails([*base, "--peer", "[fd00::2]:7471"], capsys)
    assert "argument --peer: [fd00::2]:7471 is not in the address family of --listen" in line


def test_secret_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listen = ["--listen", "10.0.0.1:7471", "--secret-file"]
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n\n")
    line = fails([*listen, str(empty)], capsys)
    assert f"argument --secret-file: secret file {empty}: is empty" in line
    line = fails([*listen, str(tmp_path / "missing")], capsys)
    assert "argument --secret-file: secret file" in line and "No such file" in line
    line = fails([*listen, str(tmp_path)], capsys)
    assert "argument --secret-file:" in line and str(tmp_path) in line


def test_secret_file_without_rdma_is_refused(
    secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(["--socks", "a:1", "--secret-file", str(secret_file)], capsys)
    assert "argument --secret-file: is only used by an RDMA node" in line


def test_users_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    users.write_text("# users\nalice:ok\nbob\n")
    line = fails(["--socks", "a:1", "--users", str(users)], capsys)
    assert f"argument --users: {users}:3: expected 'user:password'" in line
    users.write_text("# nobody\n")
    line = fails(["--socks", "a:1", "--users", str(users)], capsys)
    assert f"argument --users: {users}: no users defined" in line


def test_users_without_socks_is_refused(
    tmp_path: Path, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users"
    users.write_text("alice:ok\n")
    argv = ["--listen", "10.0.0.1:1", "--secret-file", str(secret_file), "--users", str(users)]
    assert "argument --users: applies to the SOCKS listener" in fails(argv, capsys)


# ----------------------------------------------------------------------------- run dirs


def test_run_dir_from_environment(run_dir: Path) -> None:
    assert default_run_dir() == run_dir
    assert status_run_dirs() == [run_dir]
    assert socket_path_for("x") == run_dir / "x.sock"
    assert socket_path_for("x", Path("/elsewhere")) == Path("/elsewhere/x.sock")


def test_run_dir_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(RUN_DIR_ENV)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    xdg = tmp_path / "rdmaproxy"
    tmp_dir = Path(f"/tmp/rdmaproxy-{os.getuid()}")
    assert status_run_dirs() == [Path("/run/rdmaproxy"), xdg, tmp_dir]

    usable: set[Path] = set()
    monkeypatch.setattr(config_mod, "_usable_dir", lambda p: p in usable)
    assert default_run_dir() == tmp_dir
    usable.add(xdg)
    assert default_run_dir() == xdg
    usable.add(Path("/run/rdmaproxy"))
    assert default_run_dir() == Path("/run/rdmaproxy")

    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert status_run_dirs() == [Path("/run/rdmaproxy"), tmp_dir]


def test_usable_dir(tmp_path: Path) -> None:
    usable = config_mod._usable_dir
    assert usable(tmp_path)
    assert usable(tmp_path / "new")  # can be created
    assert not usable(tmp_path / "missing" / "deeper")
    f = tmp_path / "file"
    f.write_text("")
    assert not usable(f)
