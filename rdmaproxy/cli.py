"""The ``rdmaproxy`` command: ``serve`` (run a proxy) and ``status`` (ask running ones).

Exit status: 0 success; 1 runtime failure (the proxy could not start, no proxy to show);
2 bad command line (one line on stderr naming the flag).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from rdmaproxy import __version__
from rdmaproxy.admin import AdminError, discover_sockets, query_status
from rdmaproxy.config import (
    OneLineArgumentParser,
    add_serve_arguments,
    config_from_args,
    status_run_dirs,
)
from rdmaproxy.errors import RdmaproxyError
from rdmaproxy.pool import format_size
from rdmaproxy.registry import format_age, format_endpoint, format_table, format_totals
from rdmaproxy.socks import users as socks_users

__all__ = ["build_parser", "format_status", "main"]

PROG = "rdmaproxy"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> tuple[OneLineArgumentParser, dict[str, OneLineArgumentParser]]:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="SOCKS proxy that carries TCP streams between nodes over RDMA.",
        epilog="  app --TCP/SOCKS5--> [rdmaproxy on node A] ==RDMA RC (rdma_cm)==> "
        "[rdmaproxy on node B] --TCP--> target\n\nSee 'rdmaproxy COMMAND --help'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run a proxy: a SOCKS server (--socks) and/or an RDMA node (--listen)",
        description="Run a proxy in the foreground (logs on stderr; SIGINT/SIGTERM stop it). "
        "With --listen it is an RDMA node; with --peer it carries its SOCKS streams to the "
        "peers; with neither it is a direct SOCKS proxy that dials destinations over TCP.",
    )
    add_serve_arguments(serve)
    status = sub.add_parser(
        "status",
        help="show the streams of running proxies",
        description="Show running proxies on this host (all of them unless --name/--socket): "
        "addresses, peers, totals and one line per stream. Exit status 1 when none answers.",
    )
    status.add_argument("--json", action="store_true", help="print JSON (a list without "
                        "--name/--socket, one document with them)")
    which = status.add_mutually_exclusive_group()
    which.add_argument("--name", metavar="NAME", help="only the proxy started with this --name")
    which.add_argument("--socket", metavar="PATH", type=Path,
                       help="only the proxy whose admin socket is PATH (its --admin-socket)")
    assert isinstance(serve, OneLineArgumentParser) and isinstance(status, OneLineArgumentParser)
    return parser, {"serve": serve, "status": status}


# --------------------------------------------------------------------------- serve


def _serve(ns: argparse.Namespace, parser: OneLineArgumentParser) -> int:
    config = config_from_args(ns, parser)
    logging.basicConfig(level=config.log_level, stream=sys.stderr, format=LOG_FORMAT, force=True)
    import trio  # only ``serve`` needs it

    from rdmaproxy.app import run_proxy

    try:
        trio.run(run_proxy, config)
    except (RdmaproxyError, socks_users.ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the signal handler was installed
        return 130
    return 0


# --------------------------------------------------------------------------- status


def _describe_peer(peer: Mapping[str, Any]) -> str:
    name = peer.get("peer") or peer.get("address") or peer.get("name") or "?"
    rest = ", ".join(
        f"{k} {v}" for k, v in peer.items() if k not in ("peer", "address", "name", "state")
    )
    state = peer.get("state")
    return " ".join(str(x) for x in (name, state) if x is not None) + (f" ({rest})" if rest else "")


def format_status(doc: Mapping[str, Any], socket_path: Path | str | None = None) -> str:
    """Render one proxy's status document as a text block."""
    now = float(doc.get("now") or time.time())
    started = doc.get("started_at")
    up = format_age(now - float(started)) if started is not None else "?"
    head = (
        f"== {doc.get('name', '?')}: pid {doc.get('pid', '?')}, {doc.get('mode', '?')}, "
        f"up {up}"
    )
    if socket_path is not None:
        head += f", socket {socket_path}"
    lines = [head]
    socks = doc.get("socks") or []
    lines.append("socks:   " + (", ".join(format_endpoint(s) for s in socks) or "-"))
    lines.append(f"listen:  {format_endpoint(doc.get('listen'))}")
    node = doc.get("node") or {}
    if doc.get("mode") == "rdma":
        if node.get("device") is not None:
            lines.append(f"device:  {node['device']}")
        if node.get("error"):
            lines.append(f"node:    status failed: {node['error']}")
        peers = doc.get("peers") or []
        lines.append("peers:   " + ("; ".join(_describe_peer(p) for p in peers) or "-"))
        pool = doc.get("pool")
        if isinstance(pool, Mapping) and "size" in pool:
            lines.append(
                f"pool:    {format_size(int(pool['size']))}, "
                f"{pool.get('slots_total', '?')} rings of "
                f"{format_size(int(pool.get('ring_size', 0)))}"
            )
    totals = doc.get("totals")
    if isinstance(totals, Mapping):
        lines.append("totals:  " + format_totals(totals, slots=doc.get("mode") == "rdma"))
    lines.append(format_table(doc.get("streams") or []))
    return "\n".join(lines)


def _status(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    dirs = status_run_dirs()
    single = ns.name is not None or ns.socket is not None
    if ns.socket is not None:
        targets = [ns.socket]
    elif ns.name is not None:
        targets = [d / f"{ns.name}.sock" for d in dirs if (d / f"{ns.name}.sock").exists()]
        if not targets:
            print(
                f"{PROG} status: no proxy named {ns.name!r} is running "
                f"(no {ns.name}.sock in {', '.join(map(str, dirs))})",
                file=err,
            )
            return 1
    else:

        def stale(path: Path) -> None:
            print(f"{PROG} status: {path}: stale socket, no proxy listening; ignored", file=err)

        targets = discover_sockets(dirs, on_stale=stale)
        if not targets:
            print(f"{PROG} status: no rdmaproxy is running (looked in "
                  f"{', '.join(map(str, dirs))})", file=err)
            return 1

    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in targets:
        try:
            docs.append((path, query_status(path)))
        except AdminError as exc:
            print(f"{PROG} status: {exc}", file=err)
            if single:
                return 1
    if not docs:
        return 1
    if ns.json:
        if single:
            json.dump(docs[0][1], out, indent=2)
        else:
            json.dump([doc | {"admin_socket": str(path)} for path, doc in docs], out, indent=2)
        out.write("\n")
    else:
        out.write("\n\n".join(format_status(doc, path) for path, doc in docs) + "\n")
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser, subparsers = build_parser()
    try:
        ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
        if ns.command == "serve":
            return _serve(ns, subparsers["serve"])
        if ns.command == "status":
            return _status(ns, sys.stdout, sys.stderr)
        parser.print_help(sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help, --version, errors
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
