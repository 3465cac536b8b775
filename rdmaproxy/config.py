"""``rdmaproxy serve`` options: the argument parser, value parsers and `ServeConfig`.

`parse_serve_args` turns a ``serve`` command line into a validated, frozen `ServeConfig`.
Every unusable value ends the program the argparse way: exit status 2 and **one** line on
stderr, ``rdmaproxy serve: error: <flag>: <problem>`` (no usage dump). Files named by
options (``--secret-file``, ``--users``) are read here, so their problems are reported the
same way.

Modes: with ``--listen`` the proxy is an RDMA node (``--peer`` adds peers to connect to,
``--secret-file`` is then required); without it the proxy is *direct*: it serves SOCKS and
dials destinations over TCP itself. A proxy with neither ``--socks`` nor ``--listen`` would
do nothing and is refused.

The admin socket directory (``run_dir``) is ``$RDMAPROXY_RUN_DIR`` when set; otherwise
``/run/rdmaproxy`` when this user may create or write it, else ``$XDG_RUNTIME_DIR/rdmaproxy``,
else ``/tmp/rdmaproxy-$UID``. ``rdmaproxy status`` looks in the same places
(`status_run_dirs`).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import attrs

from rdmaproxy.errors import ConfigError
from rdmaproxy.pool import MAX_RING_SIZE, MIN_RING_SIZE, PoolLayout, format_size
from rdmaproxy.socks import users as socks_users
from rdmaproxy.socks.users import UserTable, load_users
from rdmaproxy.wire import load_secret

__all__ = [
    "DEFAULT_ACK_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_RING_SIZE",
    "LOG_LEVELS",
    "MAX_UNIX_PATH",
    "RUN_DIR_ENV",
    "HostPort",
    "OneLineArgumentParser",
    "ServeConfig",
    "add_serve_arguments",
    "config_from_args",
    "default_name",
    "default_run_dir",
    "format_hostport",
    "parse_hostport",
    "parse_serve_args",
    "parse_size",
    "socket_path_for",
    "status_run_dirs",
]

#: (host, port). For ``--listen`` / ``--peer`` the host is an IP literal (IPv6 without brackets).
HostPort = tuple[str, int]

DEFAULT_POOL_SIZE: Final = 256 * 1024 * 1024
DEFAULT_RING_SIZE: Final = 4 * 1024 * 1024
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
MIN_CHUNK_SIZE: Final = 4 * 1024
MAX_CHUNK_SIZE: Final = 1024 * 1024
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: RC ACK timeout exponent: 4.096 us * 2**16 = 268 ms before a lost packet is re-sent (see
#: --ack-timeout). rdma_cm's own choice here is 19 (2.1 s), which turns every packet lost at
#: the end of a burst into a two-second stall.
DEFAULT_ACK_TIMEOUT: Final = 16
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
RUN_DIR_ENV: Final = "RDMAPROXY_RUN_DIR"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH: Final = 107
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@attrs.frozen
class ServeConfig:
    """Everything ``rdmaproxy serve`` was told. Built by `parse_serve_args` (validated) or
    directly (tests, embedding: no validation beyond the types)."""

    #: SOCKS listeners; port 0 picks a free port (``rdmaproxy status`` shows the real one).
    socks: tuple[HostPort, ...] = ()
    #: rdma_cm listen address of this node (also the source IP of its peer connections).
    listen: HostPort | None = None
    #: Peers to connect to (their ``--listen`` addresses).
    peers: tuple[HostPort, ...] = ()
    #: Shared secret for peer authentication (from ``--secret-file``).
    secret: bytes | None = attrs.field(default=None, repr=False)
    secret_file: Path | None = None
    users: UserTable | None = None
    users_file: Path | None = None
    pool_size: int = DEFAULT_POOL_SIZE
    ring_size: int = DEFAULT_RING_SIZE
    #: Largest payload of one RDMA WRITE (and one socket read on the sending side).
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Post send requests from a thread of their own, through ctypes, without the GIL
    #: (rdmaproxy/verbs/poster.py); False posts through pyverbs from the event loop.
    post_thread: bool | None = None  # None: auto (on for software devices, node.py)
    name: str = "rdmaproxy"
    #: Path of the admin socket; None: no admin socket (embedding, tests).
    admin_socket: Path | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: Local ACK timeout of the RC queue pairs, as the verbs exponent (4.096 us * 2**n).
    ack_timeout: int = DEFAULT_ACK_TIMEOUT
    #: A logging level name: "DEBUG", "INFO", "WARNING" or "ERROR".
    log_level: str = "INFO"

    @property
    def rdma(self) -> bool:
        """True when this proxy runs an RDMA node (``--listen`` or ``--peer`` given)."""
        return self.listen is not None or bool(self.peers)

    @property
    def mode(self) -> str:
        """``"rdma"`` or ``"direct"``."""
        return "rdma" if self.rdma else "direct"


# ------------------------------------------------------------------------------ parsers


def format_hostport(hp: HostPort) -> str:
    """``host:port``, IPv6 literals in brackets."""
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str, *, ip_only: bool, allow_port_zero: bool = False) -> HostPort:
    """Parse ``HOST:PORT`` / ``[IPv6]:PORT``; ValueError with a short reason."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
        port_text = rest[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        if ":" in host:
            raise ValueError(f"put IPv6 addresses in brackets: [{host}]:{port_text}")
    if not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}..65535")
    if ip_only:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
    elif not host or any(c.isspace() for c in host):
        raise ValueError(f"invalid host {host!r}")
    return (host, port)


_SIZE_RE: Final = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``"65536"``, ``"64K"``, ``"64M"``, ``"64MiB"``, ``"1G"``, ``"1GiB"``, ``"512B"``.

    Suffixes are binary (K = 1024) and case-insensitive; ``KB``/``MB``/``GB`` are refused
    as ambiguous. ValueError with a short reason.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (use bytes or a K/M/G suffix: 64M, 64MiB, 1G)")
    digits, unit, b = m.groups()
    if b is not None and b.lower() == "b" and unit:
        raise ValueError(f"{text!r} is ambiguous: write {digits}{unit.upper()}iB or {digits}{unit}")
    if b is not None and b.lower() == "ib" and not unit:
        raise ValueError(f"{text!r} is not a size (use bytes or a K/M/G suffix: 64M, 64MiB, 1G)")
    return int(digits) * _SIZE_UNITS[unit.lower()]


def _parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {text!r}")
    return value


# ----------------------------------------------------------------------------- run dirs


def _usable_dir(path: Path) -> bool:
    """``path`` is a directory this process may create files in, or could be created."""
    if path.is_dir():
        return os.access(path, os.W_OK | os.X_OK)
    parent = path.parent
    return not path.exists() and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def _candidate_run_dirs() -> list[Path]:
    dirs = [Path("/run/rdmaproxy")]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        dirs.append(Path(xdg) / "rdmaproxy")
    dirs.append(Path(f"/tmp/rdmaproxy-{os.getuid()}"))
    return dirs


def default_run_dir() -> Path:
    """Where ``serve`` puts its admin socket by default (module docstring)."""
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env)
    candidates = _candidate_run_dirs()
    for path in candidates[:-1]:
        if _usable_dir(path):
            return path
    return candidates[-1]


def status_run_dirs() -> list[Path]:
    """Where ``status`` looks for admin sockets: ``$RDMAPROXY_RUN_DIR`` alone when set, else
    every default location (a proxy may run as another user)."""
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return [Path(env)]
    seen: list[Path] = []
    for path in _candidate_run_dirs():
        if path not in seen:
            seen.append(path)
    return seen


def socket_path_for(name: str, run_dir: Path | None = None) -> Path:
    """The admin socket of proxy ``name``: ``<run_dir>/<name>.sock``."""
    return (default_run_dir() if run_dir is None else run_dir) / f"{name}.sock"


def default_name(socks: Sequence[HostPort], listen: HostPort | None) -> str:
    """Name derived from the listen address, else the first SOCKS address: ``10.99.0.1-7471``.

    Characters other than letters, digits, ``.`` and ``-`` become ``_`` (IPv6 colons).
    """
    source = listen if listen is not None else (socks[0] if socks else None)
    if source is None:
        return "rdmaproxy"
    host, port = source
    return re.sub(r"[^A-Za-z0-9.-]", "_", f"{host}-{port}")[:64]


# ------------------------------------------------------------------------------ argparse


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but errors are one line: ``PROG: error: MESSAGE`` (status 2, no usage).

    Abbreviated options are not accepted (``--sock`` is not ``--socks``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # one line, whatever argparse composed
        self.exit(2, f"{self.prog}: error: {message}\n")


T = TypeVar("T")


def _typed(parse: Callable[[str], T], what: str) -> Callable[[str], T]:
    """Wrap a value parser so argparse reports its ValueError text (``argument --x: text``)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what
    return convert


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``serve`` option to ``parser``."""
    parser.add_argument(
        "--socks",
        action="append",
        default=[],
        metavar="HOST:PORT",
        type=_typed(lambda t: parse_hostport(t, ip_only=False, allow_port_zero=True), "addr"),
        help="serve SOCKS4/4a/5 on this TCP address (repeatable; [IPv6]:PORT; port 0 picks a "
        "free port). Default: no SOCKS listener (an egress-only node).",
    )
    parser.add_argument(
        "--listen",
        metavar="IP:PORT",
        type=_typed(lambda t: parse_hostport(t, ip_only=True), "addr"),
        help="run an RDMA node: rdma_cm listen address of this node; its IP picks the RDMA "
        "device and is the source address of connections to --peer. Without --listen the "
        "proxy is direct: it dials SOCKS destinations over TCP itself.",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="IP:PORT",
        type=_typed(lambda t: parse_hostport(t, ip_only=True), "addr"),
        help="connect to the RDMA node listening there (its --listen address) and carry SOCKS "
        "streams to it (repeatable; needs --listen).",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        type=Path,
        help="file holding the secret shared with the peers (trailing newlines stripped; "
        "keep it mode 600). Required with --listen/--peer, refused without them.",
    )
    parser.add_argument(
        "--users",
        metavar="FILE",
        type=Path,
        help="require SOCKS5 username/password authentication (RFC 1929) against FILE: one "
        "'user:password' per line, '#' comments. Needs --socks.",
    )
    parser.add_argument(
        "--pool-size",
        metavar="SIZE",
        default=DEFAULT_POOL_SIZE,
        type=_typed(parse_size, "size"),
        help="bytes of pinned (mlocked) memory registered for the stream rings "
        "(64M, 64MiB, 1G or bytes; default 256MiB). Each stream holds one ring on each node.",
    )
    parser.add_argument(
        "--ring-size",
        metavar="SIZE",
        default=DEFAULT_RING_SIZE,
        type=_typed(parse_size, "size"),
        help="receive ring of each stream on this node: a power of two from 4KiB up to what "
        "the pool holds (default 4MiB); the pool holds about pool-size/ring-size streams.",
    )
    parser.add_argument(
        "--chunk-size",
        metavar="SIZE",
        default=DEFAULT_CHUNK_SIZE,
        type=_typed(parse_size, "size"),
        help="largest payload of one RDMA WRITE, from 4KiB to 1MiB and at most a quarter of "
        "the peer's ring (default 1MiB). Fewer, larger WRITEs cost less CPU per byte; "
        "docs/performance.md measures the trade-off.",
    )
    parser.add_argument(
        "--post-thread",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="post RDMA send requests from a thread of their own, through ctypes and without "
        "holding Python's GIL, or (--no-post-thread) through pyverbs from the event loop. "
        "Default: a thread for software devices (Soft-RoCE, siw), which copy a WRITE inside "
        "the post, so the proxy reads sockets meanwhile; pyverbs for hardware RNICs, whose "
        "post only rings a doorbell. docs/performance.md has the measurements.",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="name of this proxy for `rdmaproxy status` and its admin socket "
        "(letters, digits, '.', '_', '-'; default derived from --listen, else the first "
        "--socks address, e.g. 10.99.0.1-7471).",
    )
    parser.add_argument(
        "--admin-socket",
        metavar="PATH",
        type=Path,
        help="path of the admin (status) socket. Default: RUN_DIR/NAME.sock where RUN_DIR is "
        f"${RUN_DIR_ENV}, else /run/rdmaproxy if writable, else $XDG_RUNTIME_DIR/rdmaproxy, "
        "else /tmp/rdmaproxy-$UID.",
    )
    parser.add_argument(
        "--handshake-timeout",
        metavar="SECONDS",
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        type=_typed(_parse_seconds, "seconds"),
        help="drop SOCKS clients that have not sent a complete request by then (default 10).",
    )
    parser.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        default=DEFAULT_CONNECT_TIMEOUT,
        type=_typed(_parse_seconds, "seconds"),
        help="give up connecting to a destination (or a peer) after this long (default 10).",
    )
    parser.add_argument(
        "--ack-timeout",
        metavar="EXP",
        default=DEFAULT_ACK_TIMEOUT,
        type=_typed(int, "integer"),
        help="RC local ACK timeout of the peer connections, as the verbs exponent: a lost "
        "packet is re-sent after 4.096us * 2**EXP, and the connection fails after 7 such "
        "tries without progress. 1 to 31 (default 16: 268 ms; rdma_cm's own 19 is 2.1 s).",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        default="info",
        type=str.lower,
        choices=LOG_LEVELS,
        help="log to stderr at this level: debug, info, warning or error (default info).",
    )


def _fail(error: Callable[[str], NoReturn], flag: str, problem: str) -> NoReturn:
    error(f"argument {flag}: {problem}")


def config_from_args(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> ServeConfig:
    """Validate the parsed ``serve`` options and read the files they name.

    Problems go to ``parser.error`` (one line naming the flag, exit status 2).
    """
    err = parser.error
    socks: list[HostPort] = list(ns.socks)
    listen: HostPort | None = ns.listen
    peers: list[HostPort] = list(ns.peer)

    if not socks and listen is None:
        err(
            "nothing to serve: give --socks HOST:PORT (a SOCKS proxy) and/or --listen IP:PORT "
            "(an RDMA node)"
        )
    for i, hp in enumerate(socks):
        if hp in socks[:i] and hp[1] != 0:
            _fail(err, "--socks", f"{format_hostport(hp)} is given twice")
    if peers and listen is None:
        _fail(
            err,
            "--peer",
            "needs --listen IP:PORT (this node's RDMA address: it picks the device and the "
            "source IP of the connection)",
        )
    for i, hp in enumerate(peers):
        if hp in peers[:i]:
            _fail(err, "--peer", f"{format_hostport(hp)} is given twice")
        if hp == listen:
            _fail(err, "--peer", f"{format_hostport(hp)} is this node's own --listen address")
        if listen is not None:
            if ipaddress.ip_address(hp[0]).version != ipaddress.ip_address(listen[0]).version:
                _fail(
                    err,
                    "--peer",
                    f"{format_hostport(hp)} is not in the address family of --listen "
                    f"{format_hostport(listen)}",
                )
    rdma = listen is not None

    # --- sizes
    ring_size: int = ns.ring_size
    pool_size: int = ns.pool_size
    if ring_size & (ring_size - 1) or not MIN_RING_SIZE <= ring_size <= MAX_RING_SIZE:
        _fail(
            err,
            "--ring-size",
            f"must be a power of two from {format_size(MIN_RING_SIZE)} to "
            f"{format_size(MAX_RING_SIZE)}, got {ring_size} bytes",
        )
    if not 1 <= ns.ack_timeout <= 31:
        _fail(err, "--ack-timeout", f"must be an exponent from 1 to 31, got {ns.ack_timeout}")
    chunk_size: int = ns.chunk_size
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        _fail(
            err,
            "--chunk-size",
            f"must be from {format_size(MIN_CHUNK_SIZE)} to {format_size(MAX_CHUNK_SIZE)}, "
            f"got {chunk_size} bytes",
        )
    try:
        PoolLayout.compute(pool_size, ring_size)
    except ValueError as exc:
        _fail(err, "--pool-size", f"{exc} (--ring-size is {format_size(ring_size)})")

    # --- name and admin socket
    name: str = ns.name if ns.name is not None else default_name(socks, listen)
    if ns.name is not None and not _NAME_RE.fullmatch(name):
        _fail(
            err,
            "--name",
            f"{name!r}: use 1..64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
        )
    if ns.admin_socket is not None:
        admin_socket: Path = ns.admin_socket
        flag = "--admin-socket"
    else:
        admin_socket = socket_path_for(name)
        flag = "--name" if ns.name is not None else "--admin-socket"
    admin_socket = Path(os.path.abspath(admin_socket))
    if len(os.fsencode(admin_socket)) > MAX_UNIX_PATH:
        _fail(
            err,
            flag,
            f"admin socket path {str(admin_socket)!r} is longer than {MAX_UNIX_PATH} bytes "
            f"(a Unix socket limit); choose a shorter --admin-socket or --name",
        )
    if admin_socket.is_dir():
        _fail(err, "--admin-socket", f"{admin_socket} is a directory; give the socket's path")

    # --- files
    secret: bytes | None = None
    if ns.secret_file is not None and not rdma:
        _fail(
            err,
            "--secret-file",
            "is only used by an RDMA node: add --listen IP:PORT (and --peer), or drop it",
        )
    if rdma:
        if ns.secret_file is None:
            _fail(err, "--secret-file", "is required with --listen/--peer (the shared secret)")
        try:
            secret = load_secret(ns.secret_file)
        except ConfigError as exc:
            _fail(err, "--secret-file", str(exc))
    users: UserTable | None = None
    if ns.users is not None:
        if not socks:
            _fail(err, "--users", "applies to the SOCKS listener: give --socks too")
        try:
            users = load_users(ns.users)
        except (ConfigError, socks_users.ConfigError) as exc:
            _fail(err, "--users", str(exc))

    return ServeConfig(
        socks=tuple(socks),
        listen=listen,
        peers=tuple(peers),
        secret=secret,
        secret_file=ns.secret_file,
        users=users,
        users_file=ns.users,
        pool_size=pool_size,
        ring_size=ring_size,
        chunk_size=chunk_size,
        post_thread=ns.post_thread,
        name=name,
        admin_socket=admin_socket,
        handshake_timeout=ns.handshake_timeout,
        connect_timeout=ns.connect_timeout,
        ack_timeout=ns.ack_timeout,
        log_level=str(ns.log_level).upper(),
    )


def make_serve_parser(prog: str = "rdmaproxy serve") -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=prog,
        description="Run the proxy: a SOCKS server (--socks) and/or an RDMA node (--listen).",
    )
    add_serve_arguments(parser)
    return parser


def parse_serve_args(argv: Sequence[str] | None = None) -> ServeConfig:
    """Parse and validate ``serve`` options (``sys.argv[1:]`` when None) into a ServeConfig.

    Exits with status 2 and one line on stderr on any problem.
    """
    parser = make_serve_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return config_from_args(ns, parser)

