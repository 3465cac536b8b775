"""The pure parts of the pyverbs peeks: sockaddr parsing and the listener-address check."""

from __future__ import annotations

import socket
import struct
import sys

from rdmaproxy.verbs._native import parse_sockaddr
from rdmaproxy.verbs.cm import _same_host

_FAMILY = "<H" if sys.byteorder == "little" else ">H"


def sockaddr_in(host: str, port: int) -> bytes:
    raw = struct.pack(_FAMILY, socket.AF_INET) + struct.pack("!H", port)
    return (raw + socket.inet_aton(host)).ljust(128, b"\0")


def sockaddr_in6(host: str, port: int) -> bytes:
    raw = struct.pack(_FAMILY, socket.AF_INET6) + struct.pack("!HI", port, 0)
    return (raw + socket.inet_pton(socket.AF_INET6, host)).ljust(128, b"\0")


def test_parse_sockaddr_in() -> None:
    assert parse_sockaddr(sockaddr_in("10.99.0.2", 40123)) == ("10.99.0.2", 40123)


def test_parse_sockaddr_in6() -> None:
    assert parse_sockaddr(sockaddr_in6("fe80::1", 7471)) == ("fe80::1", 7471)


def test_parse_sockaddr_other_family_or_short() -> None:
    assert parse_sockaddr(bytes(128)) is None  # AF_UNSPEC: not a route we can trust
    assert parse_sockaddr(sockaddr_in("10.0.0.1", 1)[:10]) is None


def test_same_host() -> None:
    assert _same_host("10.99.0.1", "10.99.0.1")
    assert not _same_host("10.99.0.2", "10.99.0.1")
    assert _same_host("10.99.0.1", "0.0.0.0")  # a wildcard listener
    assert _same_host("::ffff:10.99.0.1", "10.99.0.1")
    assert not _same_host("garbage", "10.99.0.1")
