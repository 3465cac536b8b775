"""Wire formats (no I/O except `load_secret`): control messages, immediate data,
rdma_cm private data, and the HMAC peer proof. See docs/design.md.

Control message: ``u8 type | u8 reserved (0) | u16 body length | body``, every integer
little-endian, at most `CTRL_MSG_MAX` bytes in all. Addresses are SOCKS5-style: ``atyp u8``
then 4 bytes (1, IPv4), ``u8 len`` + name (3, domain, UTF-8) or 16 bytes (4, IPv6), then
``port u16`` (little-endian like every integer here).

Decoding anything the peer sent raises `WireError` (a `ProtocolViolation`) with a message
that says what is wrong; constructing a message with out-of-range fields raises ValueError.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any, ClassVar, Self

import attrs

from rdmaproxy.errors import ConfigError, ProtocolViolation

__all__ = [
    "CTRL_MSG_MAX",
    "HEADER_SIZE",
    "IMM_SLOT_BITS",
    "MAX_IMM_SLOT",
    "NONCE_SIZE",
    "PRIVATE_DATA_MAGIC",
    "PRIVATE_DATA_MAX",
    "PROOF_SIZE",
    "PROTOCOL_VERSION",
    "Address",
    "Atyp",
    "Closed",
    "Fin",
    "Hello",
    "ImmKind",
    "Message",
    "MsgType",
    "Open",
    "Opened",
    "PrivateData",
    "ProofRole",
    "Refused",
    "Rst",
    "WireError",
    "compute_proof",
    "decode_imm",
    "decode_message",
    "decode_private_data",
    "encode_imm",
    "load_secret",
    "make_nonce",
    "verify_proof",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
CTRL_MSG_MAX = 512
HEADER_SIZE = 4
PROOF_SIZE = 32
NONCE_SIZE = 16
#: rdma_cm private data of a connect request holds at most 56 bytes (IB CM REQ).
PRIVATE_DATA_MAX = 56
PRIVATE_DATA_MAGIC = b"RDPX"
IMM_SLOT_BITS = 28
MAX_IMM_SLOT = (1 << IMM_SLOT_BITS) - 1

_HEADER = struct.Struct("<BBH")


class WireError(ProtocolViolation):
    """Bytes from the peer that do not decode."""


class MsgType(enum.IntEnum):
    HELLO = 1
    OPEN = 2
    OPENED = 3
    REFUSED = 4
    FIN = 5
    CLOSED = 6
    RST = 7


class Atyp(enum.IntEnum):
    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class ImmKind(enum.IntEnum):
    #: Payload written at the receiver's head; the completion's byte count advances the head.
    DATA = 1
    #: As DATA, and the sender is short of ring space: write the tail back once anything drains.
    DATA_WANT_TAIL = 2
    #: A new tail (the receiver's consumer cursor) written into the sender's control block.
    TAIL = 3


class ProofRole(enum.StrEnum):
    CONNECTOR = "connector"
    ACCEPTOR = "acceptor"


# ------------------------------------------------------------------- field validation


def _uint(bits: int) -> Callable[[Any, attrs.Attribute[int], int], None]:
    limit = 1 << bits

    def check(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise ValueError(f"{attr.name} must be a u{bits}, got {value!r}")

    return check


_u8, _u16, _u32, _u64 = _uint(8), _uint(16), _uint(32), _uint(64)


def _canonical_host(host: str) -> str:
    """IP literals in canonical text form (so round trips are exact); names unchanged."""
    if not isinstance(host, str):
        raise ValueError(f"host must be a str, got {host!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        encoded = host.encode("utf-8", "surrogatepass")
        if not 1 <= len(encoded) <= 255:
            raise ValueError(
                f"domain name must be 1..255 bytes in UTF-8, got {len(encoded)}"
            ) from None
        try:
            host.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"domain name {host!r} is not valid Unicode text") from None
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise ValueError(f"scoped IPv6 address {host!r} cannot be sent to a peer")
    return str(ip)


@attrs.define(frozen=True, slots=True)
class Address:
    """A (host, port) destination or bound address; ``atyp`` follows from ``host``."""

    host: str = attrs.field(converter=_canonical_host)
    port: int = attrs.field(validator=_u16)

    @property
    def atyp(self) -> Atyp:
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return Atyp.DOMAIN
        return Atyp.IPV4 if ip.version == 4 else Atyp.IPV6

    def encode(self) -> bytes:
        atyp = self.atyp
        if atyp is Atyp.DOMAIN:
            name = self.host.encode("utf-8")
            raw = bytes([atyp, len(name)]) + name
        else:
            raw = bytes([atyp]) + ipaddress.ip_address(self.host).packed
        return raw + struct.pack("<H", self.port)

    def __str__(self) -> str:
        if self.atyp is Atyp.IPV6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _decode_address(body: bytes, pos: int) -> tuple[Address, int]:
    """Decode an address at ``pos``; return it and the position after it."""
    if pos >= len(body):
        raise WireError("address truncated: missing atyp")
    atyp = body[pos]
    pos += 1
    if atyp == Atyp.IPV4:
        size = 4
    elif atyp == Atyp.IPV6:
        size = 16
    elif atyp == Atyp.DOMAIN:
        if pos >= len(body):
            raise WireError("address truncated: missing domain length")
        size = body[pos]
        pos += 1
        if size == 0:
            raise WireError("empty domain name")
    else:
        raise WireError(f"bad address type (atyp) {atyp}: expected 1, 3 or 4")
    if pos + size + 2 > len(body):
        raise WireError(f"address truncated: atyp {atyp} needs {size} address bytes + port")
    raw = body[pos : pos + size]
    (port,) = struct.unpack_from("<H", body, pos + size)
    if atyp == Atyp.DOMAIN:
        try:
            host = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"domain name is not valid UTF-8: {raw!r}") from exc
    elif atyp == Atyp.IPV4:
        host = str(ipaddress.IPv4Address(raw))
    else:
        host = str(ipaddress.IPv6Address(raw))
    try:
        return Address(host, port), pos + size + 2
    except ValueError as exc:
        raise WireError(f"bad address: {exc}") from exc


# ---------------------------------------------------------------------- control messages


@attrs.define(frozen=True, slots=True)
class Message:
    """Base of the control messages. ``TYPE`` is the wire type."""

    TYPE: ClassVar[MsgType]

    def _body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def _decode_body(cls, body: bytes) -> Self:
        raise NotImplementedError

    def encode(self) -> bytes:
        body = self._body()
        msg = _HEADER.pack(self.TYPE, 0, len(body)) + body
        if len(msg) > CTRL_MSG_MAX:  # pragma: no cover - no message can be this long
            raise ValueError(f"{type(self).__name__} encodes to {len(msg)} > {CTRL_MSG_MAX}")
        return msg


def _fixed(body: bytes, fmt: struct.Struct, name: str) -> tuple[object, ...]:
    if len(body) != fmt.size:
        raise WireError(f"{name} body must be {fmt.size} bytes, got {len(body)}")
    return fmt.unpack(body)


@attrs.define(frozen=True, slots=True)
class Hello(Message):
    """First message each way: the sender's pool and its proof of the shared secret."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    _S: ClassVar[struct.Struct] = struct.Struct("<HIQII32s")

    version: int = attrs.field(validator=_u16)
    rkey: int = attrs.field(validator=_u32)
    pool_addr: int = attrs.field(validator=_u64)
    n_slots: int = attrs.field(validator=_u32)
    ring_size: int = attrs.field(validator=_u32)
    proof: bytes = attrs.field()

    @proof.validator
    def _check_proof(self, _attr: attrs.Attribute[bytes], value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != PROOF_SIZE:
            raise ValueError(f"proof must be {PROOF_SIZE} bytes")

    def _body(self) -> bytes:
        return self._S.pack(
            self.version, self.rkey, self.pool_addr, self.n_slots, self.ring_size, self.proof
        )

    @classmethod
    def _decode_body(cls, body: bytes) -> Self:
        version, rkey, addr, n_slots, ring_size, proof = _fixed(body, cls._S, "HELLO")
        return cls(version, rkey, addr, n_slots, ring_size, proof)  # type: ignore[arg-type]


@attrs.define(frozen=True, slots=True)
class Open(Message):
    """Open a stream to ``dest``; the opener's slot and the address of its ring."""

    TYPE: ClassVar[MsgType] = MsgType.OPEN
    _S: ClassVar[struct.Struct] = struct.Struct("<IQ")

    opener_slot: int = attrs.field(validator=_u32)
    ring_addr: int = attrs.field(validator=_u64)
    dest: Address = attrs.field(validator=attrs.validators.instance_of(Address))

    def _body(self) -> bytes:
        return self._S.pack(self.opener_slot, self.ring_addr) + self.dest.encode()

    @classmethod
    def _decode_body(cls, body: bytes) -> Self:
        if len(body) < cls._S.size:
            raise WireError(f"OPEN body truncated: {len(body)} bytes")
        slot, addr = cls._S.unpack_from(body)
        dest, end = _decode_address(body, cls._S.size)
        if end != len(body):
            raise WireError(f"OPEN has {len(body) - end} trailing bytes after the address")
        return cls(slot, addr, dest)


@attrs.define(frozen=True, slots=True)
class Opened(Message):
    """Egress connected: both slots, the acceptor's ring address, the bound address."""

    TYPE: ClassVar[MsgType] = MsgType.OPENED
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQ")

    opener_slot: int = attrs.field(validator=_u32)
    acceptor_slot: int = attrs.field(validator=_u32)
    ring_addr: int = attrs.field(validator=_u64)
    bound: Address = attrs.field(validator=attrs.validators.instance_of(Address))

    def _body(self) -> bytes:
        head = self._S.pack(self.opener_slot, self.acceptor_slot, self.ring_addr)
        return head + self.bound.encode()

    @classmethod
    def _decode_body(cls, body: bytes) -> Self:
        if len(body) < cls._S.size:
            raise WireError(f"OPENED body truncated: {len(body)} bytes")
        opener, acceptor, addr = cls._S.unpack_from(body)
        bound, end = _decode_address(body, cls._S.size)
        if end != len(body):
            raise WireError(f"OPENED has {len(body) - end} trailing bytes after the address")
        return cls(opener, acceptor, addr, bound)


@attrs.define(frozen=True, slots=True)
class Refused(Message):
    """The open failed; ``code`` is the SOCKS5 reply code (1..255) for the client."""

    TYPE: ClassVar[MsgType] = MsgType.REFUSED
    _S: ClassVar[struct.Struct] = struct.Struct("<IB")

    opener_slot: int = attrs.field(validator=_u32)
    code: int = attrs.field(validator=_u8)

    @code.validator
    def _check_code(self, _attr: attrs.Attribute[int], value: int) -> None:
        if value == 0:
            raise ValueError("REFUSED code must be a SOCKS5 failure code, not 0 (succeeded)")

    def _body(self) -> bytes:
        return self._S.pack(self.opener_slot, self.code)

    @classmethod
    def _decode_body(cls, body: bytes) -> Self:
        slot, code = _fixed(body, cls._S, "REFUSED")
        return cls(slot, code)  # type: ignore[arg-type]


@attrs.define(frozen=True, slots=True)
class Fin(Message):
    """No more data after byte ``final_head`` into the receiver's ``slot``."""

    TYPE: ClassVar[MsgType] = MsgType.FIN
    _S: ClassVar[struct.Struct] = struct.Struct("<IQ")

    slot: int = attrs.field(validator=_u32)
    final_head: int = attrs.field(validator=_u64)

    def _body(self) -> bytes:
        return self._S.pack(self.slot, self.final_head)

    @classmethod
    def _decode_body(cls, body: bytes) -> Self:
        slot, head = _fixed(body, cls._S, "FIN")
        return cls(slot, head)  # type: ignore[arg-type]


_SLOT_ONLY = struct.Struct("<I")


@attrs.define(frozen=True, slots=True)
class Closed(Message):
    """The sender drained the FIN'd direction; no more tail updates into ``slot``."""

    TYPE: ClassVar[MsgType] = MsgType.CLOSED

    slot: int = attrs.field(validator=_u32)

    def _body(self) -> bytes:
        return _SLOT_ONLY.pack(self.slot)

    @classmethod
    def _decode_body(cls, body: bytes) -> Self:
        (slot,) = _fixed(body, _SLOT_ONLY, "CLOSED")
        return cls(slot)  # type: ignore[arg-type]


@attrs.define(frozen=True, slots=True)
class Rst(Message):
    """Abort the stream whose receiver slot is ``slot``."""

    TYPE: ClassVar[MsgType] = MsgType.RST

    slot: int = attrs.field(validator=_u32)

    def _body(self) -> bytes:
        return _SLOT_ONLY.pack(self.slot)

    @classmethod
    def _decode_body(cls, body: bytes) -> Self:
        (slot,) = _fixed(body, _SLOT_ONLY, "RST")
        return cls(slot)  # type: ignore[arg-type]


_MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Open, Opened, Refused, Fin, Closed, Rst)
}


def decode_message(buf: bytes | bytearray | memoryview) -> Message:
    """Decode exactly one control message occupying all of ``buf``. Raises WireError."""
    size = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
    if size > CTRL_MSG_MAX:
        raise WireError(f"control message too long: {size} bytes > {CTRL_MSG_MAX}")
    data = bytes(buf)
    if len(data) < HEADER_SIZE:
        raise WireError(f"control message truncated: {len(data)} bytes, header needs 4")
    mtype, _reserved, length = _HEADER.unpack_from(data)
    if length != len(data) - HEADER_SIZE:
        raise WireError(
            f"length mismatch: header says {length} body bytes, {len(data) - HEADER_SIZE} received"
        )
    cls = _MESSAGE_TYPES.get(mtype)
    if cls is None:
        raise WireError(f"unknown control message type {mtype}")
    try:
        return cls._decode_body(data[HEADER_SIZE:])
    except WireError as exc:
        raise WireError(f"malformed {cls.TYPE.name}: {exc}") from exc
    except (ValueError, struct.error) as exc:
        raise WireError(f"malformed {cls.TYPE.name}: {exc}") from exc


# ---------------------------------------------------------------------- immediate data


def encode_imm(kind: ImmKind | int, slot: int) -> int:
    """The value to give pyverbs as ``imm_data``: kind<<28 | slot, in network byte order."""
    try:
        kind = ImmKind(kind)
    except ValueError:
        raise ValueError(f"unknown immediate kind {kind!r}") from None
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= MAX_IMM_SLOT:
        raise ValueError(f"slot {slot!r} does not fit the immediate's {IMM_SLOT_BITS} bits")
    return socket.htonl((int(kind) << IMM_SLOT_BITS) | slot)


def decode_imm(imm: int) -> tuple[ImmKind, int]:
    """Decode ``wc.imm_data`` as pyverbs returns it (network order). Raises WireError."""
    if isinstance(imm, bool) or not isinstance(imm, int) or not 0 <= imm <= 0xFFFFFFFF:
        raise WireError(f"immediate data {imm!r} is not a u32")
    value = socket.ntohl(imm)
    raw_kind = value >> IMM_SLOT_BITS
    try:
        kind = ImmKind(raw_kind)
    except ValueError:
        raise WireError(f"unknown immediate kind {raw_kind} (immediate {value:#010x})") from None
    return kind, value & MAX_IMM_SLOT


# ------------------------------------------------------------ connection private data

_PRIVATE = struct.Struct("<4sH16s")


def make_nonce() -> bytes:
    """A fresh random nonce for the private data."""
    return secrets.token_bytes(NONCE_SIZE)


@attrs.define(frozen=True, slots=True)
class PrivateData:
    """rdma_cm private data of the connect request and of the accept reply."""

    nonce: bytes = attrs.field()
    version: int = attrs.field(default=PROTOCOL_VERSION, validator=_u16)

    @nonce.validator
    def _check_nonce(self, _attr: attrs.Attribute[bytes], value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")

    def encode(self) -> bytes:
        return _PRIVATE.pack(PRIVATE_DATA_MAGIC, self.version, self.nonce)


def decode_private_data(
    buf: bytes | bytearray | memoryview | None, *, version: int = PROTOCOL_VERSION
) -> PrivateData:
    """Decode and validate private data. Bytes after the nonce are ignored (the IB CM pads
    private data with zeros to its full size). Raises WireError."""
    data = bytes(buf) if buf is not None else b""
    if not data:
        raise WireError("no rdma_cm private data: the peer is not an rdmaproxy node")
    if len(data) < _PRIVATE.size:
        raise WireError(f"rdma_cm private data too short: {len(data)} bytes, need {_PRIVATE.size}")
    magic, peer_version, nonce = _PRIVATE.unpack_from(data)
    if magic != PRIVATE_DATA_MAGIC:
        raise WireError(
            f"rdma_cm private data has magic {magic!r}, expected {PRIVATE_DATA_MAGIC!r}: "
            "the peer is not an rdmaproxy node"
        )
    if peer_version != version:
        raise WireError(
            f"peer speaks rdmaproxy protocol version {peer_version}, this node speaks {version}"
        )
    return PrivateData(nonce=nonce, version=peer_version)


# -------------------------------------------------------------------------- peer proof


def compute_proof(
    secret: bytes, role: ProofRole | str, nonce_connector: bytes, nonce_acceptor: bytes
) -> bytes:
    """HMAC-SHA256(secret, role || nonce_connector || nonce_acceptor)."""
    try:
        role = ProofRole(role)
    except ValueError:
        raise ValueError(f"proof role must be 'connector' or 'acceptor', got {role!r}") from None
    for name, nonce in (("nonce_connector", nonce_connector), ("nonce_acceptor", nonce_acceptor)):
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"{name} must be {NONCE_SIZE} bytes, got {len(nonce)}")
    if not secret:
        raise ValueError("the shared secret is empty")
    msg = role.value.encode("ascii") + nonce_connector + nonce_acceptor
    return hmac.new(secret, msg, hashlib.sha256).digest()


def verify_proof(
    secret: bytes,
    role: ProofRole | str,
    nonce_connector: bytes,
    nonce_acceptor: bytes,
    proof: bytes,
) -> bool:
    """Whether ``proof`` is what a holder of ``secret`` in ``role`` computes (constant time)."""
    expected = compute_proof(secret, role, nonce_connector, nonce_acceptor)
    return hmac.compare_digest(expected, bytes(proof))


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the shared secret from ``path``; trailing newlines are stripped.

    Raises ConfigError naming the file when it cannot be read or holds no secret. Logs a
    warning when the file is readable by group or others.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"secret file {name}: not a regular file")
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"secret file {name}: cannot read it: {exc.strerror}") from exc
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ConfigError(f"secret file {name}: is empty (it must hold the shared secret)")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "secret file %s is accessible by group/others (mode %o); chmod 600 it",
            name,
            stat.S_IMODE(st.st_mode),
        )
    return secret
