"""Sans-I/O server side of the SOCKS handshake: SOCKS4, SOCKS4a, SOCKS5 (RFC 1928), RFC 1929.

In the style of h11: this module owns the state machine, never does I/O and never blocks.
The caller (``rdmaproxy.socks.server``) feeds bytes with :meth:`SocksServerConnection.receive_data`
and pulls events with :meth:`SocksServerConnection.next_event`; bytes to send back are either
carried by the event (``reply`` of :class:`MethodSelected` and :class:`ProtocolError`, which the
codec decides on its own) or returned by the method with which the caller makes a decision
(:meth:`~SocksServerConnection.authenticate`, :meth:`~SocksServerConnection.accept`,
:meth:`~SocksServerConnection.reject`).

Driving loop::

    conn = SocksServerConnection(auth_required=users is not None)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some(n))  # b"" means EOF
        elif isinstance(event, MethodSelected):
            await stream.send_all(event.reply)
        elif isinstance(event, AuthRequest):
            ok = users.check(event.username, event.password)
            await stream.send_all(conn.authenticate(ok))
            if not ok:
                close
        elif isinstance(event, ProtocolError):
            await stream.send_all(event.reply)  # may be empty
            close
        else:  # ConnectRequest
            ... connect, then send conn.accept(bound) or conn.reject(code);
            ... conn.trailing_data holds bytes the client sent after its request.

Error handling contract: no byte sequence fed to ``receive_data`` makes any method raise. Malformed
or unsupported input yields a :class:`ProtocolError` event whose ``reply`` is the protocol's
answer (empty when the protocol has none), after which the connection is in state ``CLOSED`` and
the caller must close it. :class:`UsageError` is raised only when the *caller* breaks the API
contract (e.g. ``accept()`` before a request was received).

Buffering is bounded: whenever ``next_event()`` returns ``NEED_DATA`` the buffer holds less than
:data:`MAX_MESSAGE` bytes, since every handshake message has a maximum length (SOCKS4 USERID and
SOCKS4a host names are capped at 255 bytes here; the protocol itself has no cap).

Decisions where the RFCs are silent:

* The first byte selects the protocol: 0x05 SOCKS5, 0x04 SOCKS4/4a, anything else is a protocol
  error closed without reply (there is no protocol in which to answer).
* With ``auth_required`` only method 0x02 (username/password) is acceptable; otherwise only 0x00.
  A client offering neither gets ``05 FF`` and is closed (also for NMETHODS = 0).
* A malformed SOCKS5 request (VER != 5, RSV != 0) is answered with 0x01 general failure; a
  command other than CONNECT with 0x07 (also when its address type is unknown: CMD comes first);
  an unknown ATYP with 0x08; an invalid domain name (empty, or bytes outside printable ASCII
  0x21..0x7E) with 0x04 host unreachable.
* A domain name that is an IP literal is reported as ``ipv4``/``ipv6`` (canonical form).
* RFC 1929 empty UNAME/PASSWD (the RFC says 1..255) are accepted by the parser and simply fail
  the credential check; a subnegotiation VER != 0x01 is answered ``01 01``.
* SOCKS4 while authentication is required is rejected with 0x5B (SOCKS4 cannot carry a password;
  its USERID is not a credential). SOCKS4 BIND and unknown commands get 0x5B.
* The SOCKS4 USERID is reported as ``socks4_userid`` and is never treated as authenticated.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping
from typing import Final, Literal, TypeAlias

import attrs

__all__ = [
    "MAX_HOSTNAME",
    "MAX_MESSAGE",
    "MAX_SOCKS4_USERID",
    "NEED_DATA",
    "UNSPECIFIED_BOUND",
    "AddressType",
    "AuthMethod",
    "AuthRequest",
    "BoundAddress",
    "Command",
    "ConnectRequest",
    "Destination",
    "DestinationKind",
    "Event",
    "MethodSelected",
    "NeedData",
    "ProtocolError",
    "Socks4Reply",
    "Socks5Reply",
    "SocksServerConnection",
    "State",
    "UsageError",
    "socks4_code",
    "socks4_reply",
    "socks5_reply",
]

MAX_HOSTNAME: Final = 255
"""Longest host name accepted (SOCKS5 has a one-byte length; SOCKS4a is capped to match)."""
MAX_SOCKS4_USERID: Final = 255
"""Longest SOCKS4 USERID accepted (the protocol has no limit; this one bounds buffering)."""
MAX_MESSAGE: Final = 8 + MAX_SOCKS4_USERID + 1 + MAX_HOSTNAME + 1
"""Upper bound of any handshake message (a SOCKS4a request); RFC 1929's is 513, SOCKS5's 262."""

SOCKS4_VERSION: Final = 0x04
SOCKS5_VERSION: Final = 0x05
USERPASS_VERSION: Final = 0x01
_PRINTABLE_ASCII: Final = bytes(range(0x21, 0x7F))


# --------------------------------------------------------------------------- protocol constants


class Socks5Reply(enum.IntEnum):
    """SOCKS5 REP field (RFC 1928 section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks4Reply(enum.IntEnum):
    """SOCKS4 CD field of a reply."""

    GRANTED = 0x5A
    REJECTED = 0x5B


class AuthMethod(enum.IntEnum):
    """SOCKS5 authentication METHOD values (RFC 1928 section 3)."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """CMD values; SOCKS4 uses CONNECT and BIND with the same numbers."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    """SOCKS5 ATYP values."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


def socks4_code(code: Socks5Reply) -> Socks4Reply:
    """Map a SOCKS5 reply code to SOCKS4: success is 0x5A, every failure 0x5B."""
    return Socks4Reply.GRANTED if code == Socks5Reply.SUCCEEDED else Socks4Reply.REJECTED


# --------------------------------------------------------------------------- addresses

DestinationKind: TypeAlias = Literal["ipv4", "ipv6", "domain"]


def _check_port(_instance: object, _attribute: object, value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"port out of range: {value}")


@attrs.frozen
class Destination:
    """Where the client wants to go. ``host`` is an IP literal for ipv4/ipv6, else a name."""

    host: str
    port: int = attrs.field(validator=_check_port)
    kind: DestinationKind

    def __attrs_post_init__(self) -> None:
        if self.kind == "ipv4":
            ipaddress.IPv4Address(self.host)
        elif self.kind == "ipv6":
            ipaddress.IPv6Address(self.host)
        elif self.kind == "domain":
            if not 1 <= len(self.host) <= MAX_HOSTNAME:
                raise ValueError(f"host name length out of range: {len(self.host)}")
        else:
            raise ValueError(f"unknown destination kind: {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "ipv6":
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class BoundAddress:
    """BND.ADDR/BND.PORT of a reply: an IP literal (v4 or v6) and a port."""

    host: str
    port: int = attrs.field(validator=_check_port)

    def __attrs_post_init__(self) -> None:
        ipaddress.ip_address(self.host)

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple[object, ...]) -> BoundAddress:
        """Build from a ``getsockname()`` result (AF_INET or AF_INET6 tuple)."""
        host, port = sockaddr[0], sockaddr[1]
        if not isinstance(host, str) or not isinstance(port, int):
            raise TypeError(f"not an IP socket address: {sockaddr!r}")
        return cls(host, port)

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


UNSPECIFIED_BOUND: Final = BoundAddress("0.0.0.0", 0)


def socks5_reply(code: Socks5Reply, bound: BoundAddress | None = None) -> bytes:
    """``VER REP RSV ATYP BND.ADDR BND.PORT``; ``bound`` defaults to 0.0.0.0:0."""
    if bound is None:
        bound = UNSPECIFIED_BOUND
    ip = ipaddress.ip_address(bound.host)
    atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
    return bytes((SOCKS5_VERSION, code, 0x00, atyp)) + ip.packed + bound.port.to_bytes(2, "big")


def socks4_reply(code: Socks4Reply, bound: BoundAddress | None = None) -> bytes:
    """``VN=0 CD DSTPORT DSTIP``; an IPv6 or absent ``bound`` is sent as 0.0.0.0:0."""
    packed = b"\x00\x00\x00\x00"
    port = 0
    if bound is not None:
        ip = ipaddress.ip_address(bound.host)
        if ip.version == 4:
            packed = ip.packed
            port = bound.port
    return bytes((0x00, code)) + port.to_bytes(2, "big") + packed


# --------------------------------------------------------------------------- events


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by ``next_event()`` when more bytes must be received first."""


@attrs.frozen
class MethodSelected:
    """SOCKS5 greeting accepted; send ``reply`` (``05 <method>``)."""

    method: AuthMethod
    reply: bytes


@attrs.frozen
class AuthRequest:
    """RFC 1929 credentials; answer with ``conn.authenticate(ok)``."""

    username: bytes
    password: bytes = attrs.field(repr=False)


@attrs.frozen
class ConnectRequest:
    """A CONNECT request; answer with ``conn.accept(bound)`` or ``conn.reject(code)``.

    ``username`` is the RFC 1929 user that authenticated (SOCKS5 only); ``socks4_userid`` is the
    unverified SOCKS4 USERID field.
    """

    version: Literal[4, 5]
    destination: Destination
    username: bytes | None = None
    socks4_userid: bytes | None = None


@attrs.frozen
class ProtocolError:
    """The handshake failed; send ``reply`` (possibly empty), then close the connection."""

    message: str
    reply: bytes = b""


Event: TypeAlias = MethodSelected | AuthRequest | ConnectRequest | ProtocolError


class UsageError(RuntimeError):
    """The caller used the codec out of order (never caused by received bytes)."""


# --------------------------------------------------------------------------- state machine


class State(enum.Enum):
    GREETING = "GREETING"
    """Waiting for the first message: a SOCKS5 method offer or a SOCKS4 request."""
    AUTH = "AUTH"
    """Waiting for the RFC 1929 username/password request."""
    AUTH_PENDING = "AUTH_PENDING"
    """AuthRequest emitted; waiting for ``authenticate()``."""
    REQUEST = "REQUEST"
    """Waiting for the SOCKS5 request."""
    REQUEST_PENDING = "REQUEST_PENDING"
    """ConnectRequest emitted; waiting for ``accept()`` or ``reject()``."""
    ESTABLISHED = "ESTABLISHED"
    """Success reply produced; the codec is done, bytes are now payload."""
    CLOSED = "CLOSED"
    """Failed or rejected; the caller must close the connection."""


class _Input(enum.Enum):
    METHOD_NO_AUTH = enum.auto()
    METHOD_USERPASS = enum.auto()
    AUTH_RECEIVED = enum.auto()
    AUTH_OK = enum.auto()
    AUTH_FAILED = enum.auto()
    REQUEST_RECEIVED = enum.auto()
    ACCEPT = enum.auto()
    REJECT = enum.auto()
    ERROR = enum.auto()


_TRANSITIONS: Final[Mapping[tuple[State, _Input], State]] = {
    (State.GREETING, _Input.METHOD_NO_AUTH): State.REQUEST,
    (State.GREETING, _Input.METHOD_USERPASS): State.AUTH,
    (State.GREETING, _Input.REQUEST_RECEIVED): State.REQUEST_PENDING,  # SOCKS4/4a
    (State.GREETING, _Input.ERROR): State.CLOSED,
    (State.AUTH, _Input.AUTH_RECEIVED): State.AUTH_PENDING,
    (State.AUTH, _Input.ERROR): State.CLOSED,
    (State.AUTH_PENDING, _Input.AUTH_OK): State.REQUEST,
    (State.AUTH_PENDING, _Input.AUTH_FAILED): State.CLOSED,
    (State.REQUEST, _Input.REQUEST_RECEIVED): State.REQUEST_PENDING,
    (State.REQUEST, _Input.ERROR): State.CLOSED,
    (State.REQUEST_PENDING, _Input.ACCEPT): State.ESTABLISHED,
    (State.REQUEST_PENDING, _Input.REJECT): State.CLOSED,
}
"""Every legal transition; anything else is a :class:`UsageError`."""


class _Malformed(Exception):
    """Internal: a parser found bad input. Becomes a ProtocolError event."""

    def __init__(self, message: str, reply: bytes) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply


@attrs.frozen
class _Step:
    event: Event
    input: _Input
    consumed: int


def _fail5(message: str, code: Socks5Reply) -> _Malformed:
    return _Malformed(message, socks5_reply(code))


def _fail4(message: str) -> _Malformed:
    return _Malformed(message, socks4_reply(Socks4Reply.REJECTED))


def _domain_destination(raw: bytes, port: int) -> Destination:
    """Validate a host name from the wire; an IP literal becomes an ipv4/ipv6 destination."""
    if not raw:
        raise ValueError("empty host name")
    if len(raw) > MAX_HOSTNAME:
        raise ValueError(f"host name longer than {MAX_HOSTNAME} bytes")
    if raw.translate(None, _PRINTABLE_ASCII):
        raise ValueError(f"host name {raw!r} has bytes outside printable ASCII")
    host = raw.decode("ascii")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return Destination(host, port, "domain")
    return Destination(str(ip), port, "ipv4" if ip.version == 4 else "ipv6")


def _parse_socks4(buf: bytearray, auth_required: bool) -> _Step | None:
    # VN CD DSTPORT(2) DSTIP(4) USERID NUL [HOSTNAME NUL]
    if len(buf) < 8:
        return None
    cmd = buf[1]
    port = int.from_bytes(buf[2:4], "big")
    ip = bytes(buf[4:8])
    nul = buf.find(b"\x00", 8, 8 + MAX_SOCKS4_USERID + 1)
    if nul < 0:
        if len(buf) > 8 + MAX_SOCKS4_USERID:
            raise _fail4(f"SOCKS4 USERID longer than {MAX_SOCKS4_USERID} bytes")
        return None
    userid = bytes(buf[8:nul])
    end = nul + 1
    if ip[:3] == b"\x00\x00\x00" and ip[3] != 0:  # SOCKS4a: 0.0.0.x, x != 0
        nul = buf.find(b"\x00", end, end + MAX_HOSTNAME + 1)
        if nul < 0:
            if len(buf) > end + MAX_HOSTNAME:
                raise _fail4(f"SOCKS4a host name longer than {MAX_HOSTNAME} bytes")
            return None
        raw_host = bytes(buf[end:nul])
        end = nul + 1
        try:
            dest = _domain_destination(raw_host, port)
        except ValueError as exc:
            raise _fail4(f"SOCKS4a: {exc}") from None
    else:
        dest = Destination(str(ipaddress.IPv4Address(ip)), port, "ipv4")
    if cmd != Command.CONNECT:
        name = "BIND" if cmd == Command.BIND else f"{cmd:#04x}"
        raise _fail4(f"SOCKS4 command {name} not supported")
    if auth_required:
        raise _fail4("SOCKS4 refused: authentication is required and SOCKS4 cannot authenticate")
    event = ConnectRequest(version=4, destination=dest, socks4_userid=userid)
    return _Step(event, _Input.REQUEST_RECEIVED, end)


def _parse_greeting(buf: bytearray, auth_required: bool) -> _Step | None:
    if not buf:
        return None
    version = buf[0]
    if version == SOCKS4_VERSION:
        return _parse_socks4(buf, auth_required)
    if version != SOCKS5_VERSION:
        raise _Malformed(f"unknown SOCKS version {version:#04x}", b"")
    # VER NMETHODS METHODS...
    if len(buf) < 2:
        return None
    end = 2 + buf[1]
    if len(buf) < end:
        return None
    offered = bytes(buf[2:end])
    wanted = AuthMethod.USERNAME_PASSWORD if auth_required else AuthMethod.NO_AUTH
    if wanted not in offered:
        raise _Malformed(
            f"no acceptable authentication method: need {wanted.name}, client offered "
            f"[{', '.join(f'{m:#04x}' for m in offered)}]",
            bytes((SOCKS5_VERSION, AuthMethod.NO_ACCEPTABLE)),
        )
    input_ = _Input.METHOD_USERPASS if auth_required else _Input.METHOD_NO_AUTH
    return _Step(MethodSelected(wanted, bytes((SOCKS5_VERSION, wanted))), input_, end)


def _parse_auth(buf: bytearray, auth_required: bool) -> _Step | None:
    # VER ULEN UNAME PLEN PASSWD (RFC 1929)
    if not buf:
        return None
    if buf[0] != USERPASS_VERSION:
        raise _Malformed(
            f"username/password subnegotiation version {buf[0]:#04x} (expected 0x01)",
            bytes((USERPASS_VERSION, 0x01)),
        )
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if len(buf) < 3 + ulen:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    event = AuthRequest(username=bytes(buf[2 : 2 + ulen]), password=bytes(buf[3 + ulen : end]))
    return _Step(event, _Input.AUTH_RECEIVED, end)


def _parse_request(buf: bytearray, auth_required: bool) -> _Step | None:
    # VER CMD RSV ATYP DST.ADDR DST.PORT
    if buf and buf[0] != SOCKS5_VERSION:
        raise _fail5(f"SOCKS5 request with version {buf[0]:#04x}", Socks5Reply.GENERAL_FAILURE)
    if len(buf) >= 3 and buf[2] != 0x00:
        raise _fail5(f"SOCKS5 request with RSV {buf[2]:#04x}", Socks5Reply.GENERAL_FAILURE)
    if len(buf) < 4:
        return None
    cmd, atyp = buf[1], buf[3]
    if cmd != Command.CONNECT:
        try:
            cmd_name = Command(cmd).name
        except ValueError:
            cmd_name = f"{cmd:#04x}"
        unsupported = _fail5(
            f"SOCKS5 command {cmd_name} not supported", Socks5Reply.COMMAND_NOT_SUPPORTED
        )
    else:
        unsupported = None
    if atyp == AddressType.IPV4:
        start, alen = 4, 4
    elif atyp == AddressType.IPV6:
        start, alen = 4, 16
    elif atyp == AddressType.DOMAIN:
        if len(buf) < 5:
            return None
        start, alen = 5, buf[4]
    else:
        if unsupported is not None:
            raise unsupported
        raise _fail5(
            f"SOCKS5 address type {atyp:#04x} not supported",
            Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED,
        )
    end = start + alen + 2
    if len(buf) < end:
        return None
    if unsupported is not None:
        raise unsupported
    raw = bytes(buf[start : start + alen])
    port = int.from_bytes(buf[start + alen : end], "big")
    if atyp == AddressType.IPV4:
        dest = Destination(str(ipaddress.IPv4Address(raw)), port, "ipv4")
    elif atyp == AddressType.IPV6:
        dest = Destination(str(ipaddress.IPv6Address(raw)), port, "ipv6")
    else:
        try:
            dest = _domain_destination(raw, port)
        except ValueError as exc:
            raise _fail5(f"SOCKS5: {exc}", Socks5Reply.HOST_UNREACHABLE) from None
    return _Step(ConnectRequest(version=5, destination=dest), _Input.REQUEST_RECEIVED, end)


_Parser: TypeAlias = Callable[[bytearray, bool], "_Step | None"]

_PARSERS: Final[Mapping[State, _Parser]] = {
    State.GREETING: _parse_greeting,
    State.AUTH: _parse_auth,
    State.REQUEST: _parse_request,
}
"""States in which the codec reads a message from the client, and how."""


class SocksServerConnection:
    """Server side of one SOCKS handshake (any of SOCKS4, SOCKS4a, SOCKS5)."""

    def __init__(self, *, auth_required: bool = False) -> None:
        self._auth_required = auth_required
        self._state = State.GREETING
        self._buf = bytearray()
        self._eof = False
        self._version: Literal[4, 5] | None = None
        self._pending_user: bytes | None = None
        self._user: bytes | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def version(self) -> Literal[4, 5] | None:
        """4 or 5 once the first message is parsed, else None."""
        return self._version

    @property
    def auth_required(self) -> bool:
        return self._auth_required

    @property
    def username(self) -> bytes | None:
        """The RFC 1929 user name that authenticated successfully, if any."""
        return self._user

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Received bytes not consumed by the handshake, and whether EOF was received.

        After a ConnectRequest these are payload the client pipelined before our reply; they
        must be forwarded to the destination before anything else.
        """
        return bytes(self._buf), self._eof

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; ``b""`` means the client sent EOF."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise UsageError("receive_data() with data after EOF")
        if self._state is State.CLOSED:
            return  # nothing more will be parsed; do not let a dead connection buffer
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """Parse the next handshake message, or return NEED_DATA."""
        parser = _PARSERS.get(self._state)
        if parser is None:
            raise UsageError(f"next_event() called in state {self._state.name}")
        if self._version is None and self._buf and self._buf[0] in (4, 5):
            self._version = 4 if self._buf[0] == 4 else 5
        try:
            step = parser(self._buf, self._auth_required)
        except _Malformed as exc:
            self._fail()
            return ProtocolError(exc.message, exc.reply)
        if step is None:
            if self._eof:
                message = (
                    f"client closed the connection during the handshake (state "
                    f"{self._state.name}, {len(self._buf)} bytes of an incomplete message)"
                )
                self._fail()
                return ProtocolError(message)
            return NEED_DATA
        del self._buf[: step.consumed]
        if isinstance(step.event, AuthRequest):
            self._pending_user = step.event.username
        elif isinstance(step.event, ConnectRequest) and self._user is not None:
            step = attrs.evolve(step, event=attrs.evolve(step.event, username=self._user))
        self._transition(step.input)
        return step.event

    def authenticate(self, ok: bool) -> bytes:
        """Answer the AuthRequest; returns ``01 00`` (go on) or ``01 01`` (then close)."""
        if ok:
            self._transition(_Input.AUTH_OK)
            self._user = self._pending_user
            return bytes((USERPASS_VERSION, 0x00))
        self._transition(_Input.AUTH_FAILED)
        self._buf.clear()
        return bytes((USERPASS_VERSION, 0x01))

    def accept(self, bound: BoundAddress | None = None) -> bytes:
        """Grant the ConnectRequest; returns the success reply. ``bound`` = egress address."""
        self._transition(_Input.ACCEPT)
        if self._version == 4:
            return socks4_reply(Socks4Reply.GRANTED, bound)
        return socks5_reply(Socks5Reply.SUCCEEDED, bound)

    def reject(self, code: Socks5Reply) -> bytes:
        """Refuse the ConnectRequest with ``code`` (mapped to 0x5B for SOCKS4); then close."""
        if code == Socks5Reply.SUCCEEDED:
            raise UsageError("reject() with SUCCEEDED; use accept()")
        self._transition(_Input.REJECT)
        self._buf.clear()
        if self._version == 4:
            return socks4_reply(socks4_code(code))
        return socks5_reply(code)

    # ----------------------------------------------------------------------- internals

    def _fail(self) -> None:
        self._transition(_Input.ERROR)
        self._buf.clear()

    def _transition(self, input_: _Input) -> None:
        new = _TRANSITIONS.get((self._state, input_))
        if new is None:
            raise UsageError(f"{input_.name.lower()} is not allowed in state {self._state.name}")
        self._state = new
