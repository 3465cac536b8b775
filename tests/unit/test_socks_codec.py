"""Unit tests of the sans-I/O SOCKS codec (no I/O at all)."""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Iterable

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmaproxy.socks.codec import (
    MAX_HOSTNAME,
    MAX_MESSAGE,
    MAX_SOCKS4_USERID,
    NEED_DATA,
    AuthMethod,
    AuthRequest,
    BoundAddress,
    ConnectRequest,
    Destination,
    Event,
    MethodSelected,
    ProtocolError,
    Socks4Reply,
    Socks5Reply,
    SocksServerConnection,
    State,
    UsageError,
    socks4_code,
    socks4_reply,
    socks5_reply,
)

# --------------------------------------------------------------------------- helpers

GREETING_NOAUTH = b"\x05\x01\x00"
GREETING_USERPASS = b"\x05\x01\x02"


def s5_request(cmd: int, atyp: int, addr: bytes, port: int) -> bytes:
    return bytes((5, cmd, 0, atyp)) + addr + struct.pack(">H", port)


def s5_connect_ipv4(ip: str = "192.0.2.1", port: int = 80) -> bytes:
    return s5_request(1, 1, ipaddress.IPv4Address(ip).packed, port)


def s5_connect_domain(name: bytes, port: int = 80, cmd: int = 1) -> bytes:
    return s5_request(cmd, 3, bytes((len(name),)) + name, port)


def s4_request(
    ip: str, port: int, userid: bytes = b"", host: bytes | None = None, cmd: int = 1
) -> bytes:
    data = bytes((4, cmd)) + struct.pack(">H", port) + ipaddress.IPv4Address(ip).packed
    data += userid + b"\x00"
    if host is not None:
        data += host + b"\x00"
    return data


def userpass(user: bytes, password: bytes, ver: int = 1) -> bytes:
    return bytes((ver, len(user))) + user + bytes((len(password),)) + password


def state(conn: SocksServerConnection) -> State:
    """The codec's state (a call, so that mypy does not narrow it across assertions)."""
    return conn.state


def events_of(conn: SocksServerConnection, data: bytes = b"") -> list[Event]:
    """Feed ``data`` and collect events until NEED_DATA or a state needing a decision."""
    if data:
        conn.receive_data(data)
    out: list[Event] = []
    while conn.state in (State.GREETING, State.AUTH, State.REQUEST):
        ev = conn.next_event()
        if ev is NEED_DATA:
            break
        out.append(ev)
    return out


def one_event(conn: SocksServerConnection, data: bytes = b"") -> Event:
    evs = events_of(conn, data)
    assert len(evs) == 1, evs
    return evs[0]


# --------------------------------------------------------------------------- SOCKS5


def test_socks5_noauth_connect_ipv4() -> None:
    conn = SocksServerConnection()
    assert state(conn) is State.GREETING
    assert conn.next_event() is NEED_DATA
    ev = one_event(conn, b"\x05\x02\x00\x01")
    assert ev == MethodSelected(AuthMethod.NO_AUTH, b"\x05\x00")
    assert state(conn) is State.REQUEST
    assert conn.version == 5
    ev = one_event(conn, s5_connect_ipv4("192.0.2.1", 8080))
    assert ev == ConnectRequest(5, Destination("192.0.2.1", 8080, "ipv4"))
    assert state(conn) is State.REQUEST_PENDING
    reply = conn.accept(BoundAddress("10.0.0.1", 1234))
    assert reply == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x04\xd2"
    assert state(conn) is State.ESTABLISHED
    assert conn.trailing_data == (b"", False)


def test_socks5_connect_ipv6_and_ipv6_bound() -> None:
    conn = SocksServerConnection()
    addr = ipaddress.IPv6Address("2001:db8::1").packed
    evs = events_of(conn, GREETING_NOAUTH + s5_request(1, 4, addr, 443))
    assert evs[1] == ConnectRequest(5, Destination("2001:db8::1", 443, "ipv6"))
    reply = conn.accept(BoundAddress("::1", 5))
    assert reply == b"\x05\x00\x00\x04" + ipaddress.IPv6Address("::1").packed + b"\x00\x05"


def test_socks5_connect_domain() -> None:
    conn = SocksServerConnection()
    evs = events_of(conn, GREETING_NOAUTH + s5_connect_domain(b"example.com", 443))
    assert evs[1] == ConnectRequest(5, Destination("example.com", 443, "domain"))
    assert conn.accept() == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("name", "dest"),
    [
        (b"127.0.0.1", Destination("127.0.0.1", 80, "ipv4")),
        (b"::0001", Destination("::1", 80, "ipv6")),
        (b"a" * MAX_HOSTNAME, Destination("a" * MAX_HOSTNAME, 80, "domain")),
        (b"under_score.example", Destination("under_score.example", 80, "domain")),
    ],
)
def test_socks5_domain_forms(name: bytes, dest: Destination) -> None:
    conn = SocksServerConnection()
    evs = events_of(conn, GREETING_NOAUTH + s5_connect_domain(name))
    assert evs[1] == ConnectRequest(5, dest)


@pytest.mark.parametrize("name", [b"", b"bad host", b"nul\x00", b"caf\xc3\xa9.example", b"\x7f"])
def test_socks5_invalid_domain_is_host_unreachable(name: bytes) -> None:
    conn = SocksServerConnection()
    evs = events_of(conn, GREETING_NOAUTH + s5_connect_domain(name))
    assert isinstance(evs[1], ProtocolError)
    assert evs[1].reply == socks5_reply(Socks5Reply.HOST_UNREACHABLE)
    assert state(conn) is State.CLOSED


@pytest.mark.parametrize("cmd", [2, 3, 0, 4, 0xFF])
def test_socks5_unsupported_commands(cmd: int) -> None:
    conn = SocksServerConnection()
    evs = events_of(conn, GREETING_NOAUTH + s5_request(cmd, 1, b"\x7f\x00\x00\x01", 80) + b"x")
    assert isinstance(evs[1], ProtocolError)
    assert evs[1].reply[:2] == b"\x05\x07"
    assert evs[1].reply == socks5_reply(Socks5Reply.COMMAND_NOT_SUPPORTED)
    assert state(conn) is State.CLOSED


def test_socks5_bind_waits_for_whole_request_before_replying() -> None:
    conn = SocksServerConnection()
    events_of(conn, GREETING_NOAUTH)
    assert events_of(conn, s5_connect_domain(b"example.com", cmd=2)[:-1]) == []
    ev = one_event(conn, b"\x50")
    assert isinstance(ev, ProtocolError) and ev.reply[1] == 0x07


@pytest.mark.parametrize("atyp", [0, 2, 5, 0xFF])
def test_socks5_unknown_atyp(atyp: int) -> None:
    conn = SocksServerConnection()
    evs = events_of(conn, GREETING_NOAUTH + bytes((5, 1, 0, atyp)))
    assert isinstance(evs[1], ProtocolError)
    assert evs[1].reply == socks5_reply(Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED)


def test_socks5_unknown_atyp_with_bind_is_command_not_supported() -> None:
    conn = SocksServerConnection()
    evs = events_of(conn, GREETING_NOAUTH + bytes((5, 2, 0, 9)))
    assert isinstance(evs[1], ProtocolError) and evs[1].reply[1] == 0x07


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",  # VER 4 in a SOCKS5 request
        b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50",  # RSV 1
        b"\x00",  # VER 0, detected on the first byte
        b"\x05\x01\xff",  # RSV detected on the third byte
    ],
)
def test_socks5_malformed_request_is_general_failure(request_bytes: bytes) -> None:
    conn = SocksServerConnection()
    evs = events_of(conn, GREETING_NOAUTH + request_bytes)
    assert isinstance(evs[1], ProtocolError)
    assert evs[1].reply == socks5_reply(Socks5Reply.GENERAL_FAILURE)
    assert state(conn) is State.CLOSED


@pytest.mark.parametrize("greeting", [b"\x05\x01\x02", b"\x05\x00", b"\x05\x02\x01\x03"])
def test_socks5_no_acceptable_method_without_auth(greeting: bytes) -> None:
    conn = SocksServerConnection()
    ev = one_event(conn, greeting)
    assert isinstance(ev, ProtocolError)
    assert ev.reply == b"\x05\xff"
    assert "no acceptable authentication method" in ev.message
    assert state(conn) is State.CLOSED


def test_unknown_version_closes_without_reply() -> None:
    conn = SocksServerConnection()
    ev = one_event(conn, b"GET / HTTP/1.1\r\n\r\n")
    assert ev == ProtocolError("unknown SOCKS version 0x47", b"")
    assert conn.version is None


def test_greeting_with_all_methods_selects_noauth() -> None:
    conn = SocksServerConnection()
    ev = one_event(conn, b"\x05\xff" + bytes(range(255)))
    assert ev == MethodSelected(AuthMethod.NO_AUTH, b"\x05\x00")


# --------------------------------------------------------------------------- RFC 1929


def test_userpass_success_carries_username_into_request() -> None:
    conn = SocksServerConnection(auth_required=True)
    ev = one_event(conn, b"\x05\x02\x00\x02")
    assert ev == MethodSelected(AuthMethod.USERNAME_PASSWORD, b"\x05\x02")
    assert state(conn) is State.AUTH
    ev = one_event(conn, userpass(b"alice", b"s3cret"))
    assert ev == AuthRequest(b"alice", b"s3cret")
    assert "s3cret" not in repr(ev)
    assert state(conn) is State.AUTH_PENDING
    with pytest.raises(UsageError):
        conn.next_event()
    assert conn.authenticate(True) == b"\x01\x00"
    assert conn.username == b"alice"
    ev = one_event(conn, s5_connect_ipv4())
    assert ev == ConnectRequest(5, Destination("192.0.2.1", 80, "ipv4"), username=b"alice")


def test_userpass_wrong_credentials() -> None:
    conn = SocksServerConnection(auth_required=True)
    events_of(conn, GREETING_USERPASS + userpass(b"alice", b"wrong") + s5_connect_ipv4())
    assert state(conn) is State.AUTH_PENDING
    assert conn.authenticate(False) == b"\x01\x01"
    assert state(conn) is State.CLOSED
    assert conn.username is None
    assert conn.trailing_data == (b"", False)
    with pytest.raises(UsageError):
        conn.next_event()


def test_userpass_required_but_not_offered() -> None:
    conn = SocksServerConnection(auth_required=True)
    ev = one_event(conn, GREETING_NOAUTH)
    assert isinstance(ev, ProtocolError) and ev.reply == b"\x05\xff"


def test_userpass_bad_subnegotiation_version() -> None:
    conn = SocksServerConnection(auth_required=True)
    evs = events_of(conn, GREETING_USERPASS + userpass(b"a", b"b", ver=5))
    assert isinstance(evs[1], ProtocolError)
    assert evs[1].reply == b"\x01\x01"
    assert state(conn) is State.CLOSED


def test_userpass_empty_fields_and_max_lengths_parse() -> None:
    for user, password in [(b"", b""), (b"u" * 255, b"p" * 255), (b"\x00\xff", b":")]:
        conn = SocksServerConnection(auth_required=True)
        evs = events_of(conn, GREETING_USERPASS + userpass(user, password))
        assert evs[1] == AuthRequest(user, password)


# --------------------------------------------------------------------------- SOCKS4 / 4a


def test_socks4_connect() -> None:
    conn = SocksServerConnection()
    ev = one_event(conn, s4_request("192.0.2.7", 25, b"fred"))
    assert ev == ConnectRequest(4, Destination("192.0.2.7", 25, "ipv4"), socks4_userid=b"fred")
    assert conn.version == 4
    assert conn.accept(BoundAddress("10.1.2.3", 4000)) == b"\x00\x5a\x0f\xa0\x0a\x01\x02\x03"


def test_socks4_accept_with_ipv6_bound_sends_zeros() -> None:
    conn = SocksServerConnection()
    one_event(conn, s4_request("192.0.2.7", 25))
    assert conn.accept(BoundAddress("::1", 4000)) == b"\x00\x5a" + bytes(6)


@pytest.mark.parametrize("code", list(Socks5Reply)[1:])
def test_socks4_reject_maps_every_failure_to_5b(code: Socks5Reply) -> None:
    conn = SocksServerConnection()
    one_event(conn, s4_request("192.0.2.7", 25))
    assert conn.reject(code) == b"\x00\x5b" + bytes(6)
    assert state(conn) is State.CLOSED


def test_socks4a_hostname() -> None:
    conn = SocksServerConnection()
    ev = one_event(conn, s4_request("0.0.0.1", 80, b"", b"example.org") + b"GET")
    assert ev == ConnectRequest(4, Destination("example.org", 80, "domain"), socks4_userid=b"")
    assert conn.trailing_data == (b"GET", False)


def test_socks4_ip_zero_is_not_socks4a() -> None:
    conn = SocksServerConnection()
    ev = one_event(conn, s4_request("0.0.0.0", 80) + b"example.org\x00")
    assert isinstance(ev, ConnectRequest)
    assert ev.destination == Destination("0.0.0.0", 80, "ipv4")
    assert conn.trailing_data[0] == b"example.org\x00"


@pytest.mark.parametrize(
    "request_bytes",
    [
        s4_request("192.0.2.1", 80, cmd=2),  # BIND
        s4_request("192.0.2.1", 80, cmd=9),  # unknown command
        s4_request("0.0.0.1", 80, host=b""),  # empty 4a host name
        s4_request("0.0.0.1", 80, host=b"bad host"),
        s4_request("192.0.2.1", 80, userid=b"u" * (MAX_SOCKS4_USERID + 1)),
        s4_request("0.0.0.1", 80, host=b"h" * (MAX_HOSTNAME + 1)),
    ],
)
def test_socks4_rejections(request_bytes: bytes) -> None:
    conn = SocksServerConnection()
    ev = one_event(conn, request_bytes)
    assert isinstance(ev, ProtocolError)
    assert ev.reply == b"\x00\x5b" + bytes(6)
    assert state(conn) is State.CLOSED


def test_socks4_overlong_userid_detected_without_nul() -> None:
    conn = SocksServerConnection()
    data = s4_request("192.0.2.1", 80)[:8] + b"u" * MAX_SOCKS4_USERID
    assert events_of(conn, data) == []  # 255 bytes, no NUL yet: still fine
    ev = one_event(conn, b"u")
    assert isinstance(ev, ProtocolError) and ev.reply[1] == 0x5B


def test_socks4_max_userid_and_hostname_accepted() -> None:
    conn = SocksServerConnection()
    data = s4_request("0.0.0.9", 80, b"u" * MAX_SOCKS4_USERID, b"h" * MAX_HOSTNAME)
    assert len(data) == MAX_MESSAGE
    ev = one_event(conn, data)
    assert isinstance(ev, ConnectRequest) and ev.destination.host == "h" * MAX_HOSTNAME


def test_socks4_rejected_when_auth_required() -> None:
    conn = SocksServerConnection(auth_required=True)
    ev = one_event(conn, s4_request("192.0.2.1", 80, b"alice"))
    assert isinstance(ev, ProtocolError)
    assert ev.reply == socks4_reply(Socks4Reply.REJECTED)
    assert "authentication is required" in ev.message


# --------------------------------------------------------------------------- trailing data, EOF


def test_pipelined_bytes_after_request_are_trailing_data() -> None:
    conn = SocksServerConnection(auth_required=True)
    payload = b"GET / HTTP/1.0\r\n\r\n"
    data = GREETING_USERPASS + userpass(b"u", b"p") + s5_connect_ipv4() + payload
    events_of(conn, data)
    conn.authenticate(True)
    assert isinstance(one_event(conn), ConnectRequest)
    assert conn.trailing_data == (payload, False)
    conn.receive_data(b"more")
    conn.accept()
    assert conn.trailing_data == (payload + b"more", False)


def test_eof_before_anything() -> None:
    conn = SocksServerConnection()
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, ProtocolError) and ev.reply == b""
    assert "closed the connection" in ev.message
    assert state(conn) is State.CLOSED


@pytest.mark.parametrize("cut", range(1, len(GREETING_NOAUTH + s5_connect_ipv4())))
def test_eof_mid_message(cut: int) -> None:
    conn = SocksServerConnection()
    data = (GREETING_NOAUTH + s5_connect_ipv4())[:cut]
    events = events_of(conn, data)
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, ProtocolError) and ev.reply == b"", events
    with pytest.raises(UsageError):
        conn.receive_data(b"x")


def test_eof_after_request_is_reported_with_trailing_data() -> None:
    conn = SocksServerConnection()
    events_of(conn, GREETING_NOAUTH + s5_connect_ipv4() + b"tail")
    conn.receive_data(b"")
    assert conn.trailing_data == (b"tail", True)


def test_data_after_close_is_dropped() -> None:
    conn = SocksServerConnection()
    one_event(conn, b"\x01")
    conn.receive_data(b"x" * 100_000)
    assert conn.trailing_data == (b"", False)


# --------------------------------------------------------------------------- API misuse


def test_usage_errors() -> None:
    conn = SocksServerConnection()
    with pytest.raises(UsageError):
        conn.accept()
    with pytest.raises(UsageError):
        conn.reject(Socks5Reply.GENERAL_FAILURE)
    with pytest.raises(UsageError):
        conn.authenticate(True)
    events_of(conn, GREETING_NOAUTH + s5_connect_ipv4())
    with pytest.raises(UsageError):
        conn.reject(Socks5Reply.SUCCEEDED)
    with pytest.raises(UsageError):
        conn.next_event()
    conn.accept()
    with pytest.raises(UsageError):
        conn.accept()
    with pytest.raises(UsageError):
        conn.next_event()


@pytest.mark.parametrize("code", list(Socks5Reply)[1:])
def test_socks5_reject_codes(code: Socks5Reply) -> None:
    conn = SocksServerConnection()
    events_of(conn, GREETING_NOAUTH + s5_connect_ipv4())
    assert conn.reject(code) == bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))
    assert state(conn) is State.CLOSED


# --------------------------------------------------------------------------- value types


def test_reply_builders_and_mapping() -> None:
    assert socks5_reply(Socks5Reply.CONNECTION_REFUSED) == b"\x05\x05\x00\x01" + bytes(6)
    assert socks5_reply(Socks5Reply.SUCCEEDED, BoundAddress("1.2.3.4", 0x1234)) == (
        b"\x05\x00\x00\x01\x01\x02\x03\x04\x12\x34"
    )
    assert socks4_reply(Socks4Reply.GRANTED, BoundAddress("1.2.3.4", 0x1234)) == (
        b"\x00\x5a\x12\x34\x01\x02\x03\x04"
    )
    assert socks4_code(Socks5Reply.SUCCEEDED) is Socks4Reply.GRANTED
    assert {socks4_code(c) for c in list(Socks5Reply)[1:]} == {Socks4Reply.REJECTED}
    assert [int(c) for c in Socks5Reply] == list(range(9))


def test_value_types_validate() -> None:
    with pytest.raises(ValueError):
        Destination("example.com", 65536, "domain")
    with pytest.raises(ValueError):
        Destination("example.com", 80, "ipv4")
    with pytest.raises(ValueError):
        Destination("1.2.3.4", 80, "ipv6")
    with pytest.raises(ValueError):
        Destination("", 80, "domain")
    with pytest.raises(ValueError):
        Destination("x", 80, "unix")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BoundAddress("localhost", 80)
    with pytest.raises(ValueError):
        BoundAddress("1.2.3.4", -1)
    assert str(Destination("::1", 80, "ipv6")) == "[::1]:80"
    assert str(Destination("a.example", 80, "domain")) == "a.example:80"
    assert str(BoundAddress("::1", 80)) == "[::1]:80"
    assert BoundAddress.from_sockaddr(("::1", 80, 0, 0)) == BoundAddress("::1", 80)
    with pytest.raises(TypeError):
        BoundAddress.from_sockaddr(("/tmp/sock", "x"))
    dest = Destination("a.example", 80, "domain")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        dest.port = 81  # type: ignore[misc]


# --------------------------------------------------------------------------- property-based


def chunked(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@attrs.frozen
class Run:
    events: list[Event]
    sent: bytes
    state: State
    leftover: bytes  # codec trailing data + chunks never fed


def drive(
    chunks: list[bytes], *, auth_required: bool, auth_ok: bool = True, eof: bool = False
) -> Run:
    """Play the server's part: feed one chunk per NEED_DATA, answer everything."""
    conn = SocksServerConnection(auth_required=auth_required)
    it = iter(chunks)
    events: list[Event] = []
    sent = bytearray()
    while conn.state in (State.GREETING, State.AUTH, State.REQUEST):
        ev = conn.next_event()
        if ev is NEED_DATA:
            assert len(conn.trailing_data[0]) < MAX_MESSAGE  # bounded buffering
            chunk = next(it, None)
            if chunk is None:
                if not eof:
                    break
                conn.receive_data(b"")
            else:
                conn.receive_data(chunk)
            continue
        events.append(ev)
        if isinstance(ev, MethodSelected | ProtocolError):
            sent += ev.reply
        elif isinstance(ev, AuthRequest):
            sent += conn.authenticate(auth_ok)
        else:
            assert isinstance(ev, ConnectRequest)
    if conn.state is State.REQUEST_PENDING:
        sent += conn.accept(BoundAddress("127.0.0.1", 1))
    for ev in events[:-1]:
        assert not isinstance(ev, ProtocolError | ConnectRequest)
    if any(isinstance(ev, ProtocolError) for ev in events):
        assert state(conn) is State.CLOSED
    leftover = conn.trailing_data[0] + b"".join(it)
    return Run(events, bytes(sent), conn.state, leftover)


@settings(max_examples=500)
@given(
    data=st.binary(max_size=700),
    cuts=st.lists(st.integers(0, 700), max_size=20),
    auth_required=st.booleans(),
    auth_ok=st.booleans(),
    eof=st.booleans(),
)
def test_fuzz_random_bytes_never_raise(
    data: bytes, cuts: list[int], auth_required: bool, auth_ok: bool, eof: bool
) -> None:
    run = drive(chunked(data, cuts), auth_required=auth_required, auth_ok=auth_ok, eof=eof)
    assert run.state in (State.GREETING, State.AUTH, State.REQUEST, State.ESTABLISHED, State.CLOSED)


@settings(max_examples=300)
@given(
    prefix=st.sampled_from([b"\x05", b"\x04", b"\x05\x01\x00", b"\x05\x01\x00\x05\x01\x00"]),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 700), max_size=20),
    auth_required=st.booleans(),
)
def test_fuzz_plausible_prefixes(
    prefix: bytes, data: bytes, cuts: list[int], auth_required: bool
) -> None:
    whole = prefix + data
    drive(chunked(whole, cuts), auth_required=auth_required, eof=True)


hostnames = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:",
    min_size=1,
    max_size=MAX_HOSTNAME,
).map(lambda s: s.encode("ascii"))
ports = st.integers(0, 0xFFFF)


@st.composite
def handshakes(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A valid client handshake (without payload) and whether it authenticates."""
    kind = draw(st.sampled_from(["s5", "s5auth", "s4", "s4a"]))
    port = draw(ports)
    if kind in ("s4", "s4a"):
        userid = draw(st.binary(max_size=MAX_SOCKS4_USERID).filter(lambda b: b"\x00" not in b))
        if kind == "s4":
            ip = str(draw(st.ip_addresses(v=4)))
            if ip.startswith("0.0.0."):
                ip = "0.0.0.0"
            return s4_request(ip, port, userid), False
        last = draw(st.integers(1, 255))
        return s4_request(f"0.0.0.{last}", port, userid, draw(hostnames)), False
    auth = kind == "s5auth"
    wanted = 2 if auth else 0
    others = draw(st.lists(st.integers(0, 255), max_size=10))
    methods = bytes([*others, wanted])
    data = bytes((5, len(methods))) + methods
    if auth:
        data += userpass(draw(st.binary(max_size=255)), draw(st.binary(max_size=255)))
    atyp = draw(st.sampled_from([1, 3, 4]))
    if atyp == 1:
        addr = draw(st.ip_addresses(v=4)).packed
    elif atyp == 4:
        addr = draw(st.ip_addresses(v=6)).packed
    else:
        name = draw(hostnames)
        addr = bytes((len(name),)) + name
    return data + s5_request(1, atyp, addr, port), auth


@settings(max_examples=300)
@given(
    hs=handshakes(),
    payload=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 1200), max_size=30),
)
def test_chunking_does_not_change_events(
    hs: tuple[bytes, bool], payload: bytes, cuts: list[int]
) -> None:
    handshake, auth = hs
    whole = handshake + payload
    ref = drive([whole], auth_required=auth)
    assert isinstance(ref.events[-1], ConnectRequest)
    assert ref.state is State.ESTABLISHED
    assert ref.leftover == payload
    split = drive(chunked(whole, cuts), auth_required=auth)
    assert split == ref
    # Byte by byte too (the worst case for a parser).
    assert drive([bytes((b,)) for b in whole], auth_required=auth) == ref


@settings(max_examples=500)
@given(
    hs=handshakes(),
    payload=st.binary(max_size=50),
    mutations=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    truncate=st.integers(0, 2000),
    cuts=st.lists(st.integers(0, 1200), max_size=10),
    auth_required=st.booleans(),
    auth_ok=st.booleans(),
)
def test_fuzz_mutated_handshakes(
    hs: tuple[bytes, bool],
    payload: bytes,
    mutations: list[tuple[int, int]],
    truncate: int,
    cuts: list[int],
    auth_required: bool,
    auth_ok: bool,
) -> None:
    """Valid handshakes with bytes changed or cut off: only documented events, never a raise."""
    data = bytearray(hs[0] + payload)
    for index, value in mutations:
        data[index % len(data)] = value
    whole = bytes(data[: max(1, truncate)])
    drive(chunked(whole, cuts), auth_required=auth_required, auth_ok=auth_ok, eof=True)
