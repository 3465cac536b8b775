"""Unit and property tests of rdmaproxy.wire."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdmaproxy.errors import ConfigError, ProtocolViolation
from rdmaproxy.wire import (
    CTRL_MSG_MAX,
    MAX_IMM_SLOT,
    NONCE_SIZE,
    PRIVATE_DATA_MAX,
    PROTOCOL_VERSION,
    Address,
    Atyp,
    Closed,
    Fin,
    Hello,
    ImmKind,
    Message,
    MsgType,
    Open,
    Opened,
    PrivateData,
    ProofRole,
    Refused,
    Rst,
    WireError,
    compute_proof,
    decode_imm,
    decode_message,
    decode_private_data,
    encode_imm,
    load_secret,
    make_nonce,
    verify_proof,
)

# ------------------------------------------------------------------------ strategies

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), u32)
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


domain = (
    st.text(min_size=1, max_size=80)
    .filter(lambda s: 1 <= len(s.encode("utf-8", "surrogatepass")) <= 255)
    .filter(lambda s: not _is_ip(s))
    .filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))
)
addresses = st.builds(Address, st.one_of(ipv4, ipv6, domain), st.integers(0, 65535))

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello, st.integers(0, 65535), u32, u64, u32, u32, st.binary(min_size=32, max_size=32)
    ),
    st.builds(Open, u32, u64, addresses),
    st.builds(Opened, u32, u32, u64, addresses),
    st.builds(Refused, u32, st.integers(1, 255)),
    st.builds(Fin, u32, u64),
    st.builds(Closed, u32),
    st.builds(Rst, u32),
)


# ------------------------------------------------------------------------ messages


@given(messages)
def test_message_round_trip(msg: Message) -> None:
    raw = msg.encode()
    assert len(raw) <= CTRL_MSG_MAX
    mtype, reserved, length = struct.unpack_from("<BBH", raw)
    assert mtype == msg.TYPE and reserved == 0 and length == len(raw) - 4
    assert decode_message(raw) == msg
    assert decode_message(memoryview(raw)) == msg
    assert decode_message(bytearray(raw)) == msg


def test_known_encodings() -> None:
    assert Rst(7).encode() == bytes([7, 0, 4, 0, 7, 0, 0, 0])
    assert Closed(0x01020304).encode() == bytes([6, 0, 4, 0, 4, 3, 2, 1])
    assert Fin(1, 2**40).encode() == bytes([5, 0, 12, 0, 1, 0, 0, 0]) + (2**40).to_bytes(
        8, "little"
    )
    assert Refused(3, 5).encode() == bytes([4, 0, 5, 0, 3, 0, 0, 0, 5])
    raw = Open(2, 0x1000, Address("10.0.0.1", 443)).encode()
    assert raw[:4] == bytes([2, 0, 19, 0])
    assert raw[4:16] == struct.pack("<IQ", 2, 0x1000)
    assert raw[16:] == bytes([1, 10, 0, 0, 1]) + struct.pack("<H", 443)
    raw = Opened(2, 9, 0xABC, Address("example.com", 80)).encode()
    assert raw[20:] == bytes([3, 11]) + b"example.com" + struct.pack("<H", 80)
    raw = Opened(2, 9, 0xABC, Address("::1", 80)).encode()
    assert raw[20:] == bytes([4]) + bytes(15) + b"\x01" + struct.pack("<H", 80)
    hello = Hello(1, 0xDEAD, 0x7F0000001000, 63, 1 << 20, bytes(range(32)))
    raw = hello.encode()
    assert len(raw) == 4 + 54
    assert raw[:4] == bytes([1, 0, 54, 0])


def test_longest_message_fits() -> None:
    longest = Opened(2**32 - 1, 2**32 - 1, 2**64 - 1, Address("a" * 255, 65535))
    assert len(longest.encode()) <= CTRL_MSG_MAX


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "truncated"),
        (b"\x07\x00\x04", "truncated"),
        (bytes([7, 0, 4, 0, 1, 0, 0]), "length mismatch"),
        (bytes([7, 0, 3, 0, 1, 0, 0, 0]), "length mismatch"),
        (bytes([7, 0, 4, 0, 1, 0, 0, 0, 0]), "length mismatch"),
        (bytes([99, 0, 0, 0]), "unknown control message type 99"),
        (bytes([0, 0, 0, 0]), "unknown control message type 0"),
        (bytes([7, 0, 5, 0, 1, 0, 0, 0, 0]), "RST body must be 4 bytes, got 5"),
        (bytes([6, 0, 0, 0]), "CLOSED body must be 4 bytes, got 0"),
        (bytes([5, 0, 4, 0, 1, 0, 0, 0]), "FIN body must be 12 bytes"),
        (bytes([1, 0, 10, 0]) + bytes(10), "HELLO body must be 54 bytes"),
        (bytes([4, 0, 5, 0, 1, 0, 0, 0, 0]), "not 0"),
        (bytes([2, 0, 3, 0, 1, 2, 3]), "OPEN body truncated"),
        (bytes([2, 0, 12, 0]) + bytes(12), "missing atyp"),
        (bytes([2, 0, 15, 0]) + bytes(12) + bytes([2, 0, 0]), "bad address type"),
        (bytes([2, 0, 15, 0]) + bytes(12) + bytes([1, 0, 0]), "truncated"),
        (bytes([2, 0, 13, 0]) + bytes(12) + bytes([3]), "missing domain length"),
        (bytes([2, 0, 16, 0]) + bytes(12) + bytes([3, 0, 0, 0]), "empty domain"),
        (bytes([2, 0, 17, 0]) + bytes(12) + bytes([3, 2, 0xFF, 0xFE, 80]), "truncated"),
        (bytes([2, 0, 18, 0]) + bytes(12) + bytes([3, 2, 0xFF, 0xFE, 80, 0]), "not valid UTF-8"),
        (
            bytes([2, 0, 20, 0]) + bytes(12) + bytes([1, 1, 2, 3, 4, 80, 0, 9]),
            "1 trailing bytes",
        ),
        (bytes([3, 0, 16, 0]) + bytes(16), "OPENED body truncated|missing atyp"),
        (bytes([3, 0, 21, 0]) + bytes(16) + bytes([1, 1, 2, 3, 4]), "truncated"),
    ],
)
def test_malformed_messages(raw: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_message(raw)


def test_too_long_message() -> None:
    raw = bytes([7, 0]) + struct.pack("<H", 600) + bytes(600)
    with pytest.raises(WireError, match="too long"):
        decode_message(raw)
    with pytest.raises(WireError, match="too long"):
        decode_message(memoryview(bytes(CTRL_MSG_MAX + 1)))


def test_wire_error_is_protocol_violation() -> None:
    assert issubclass(WireError, ProtocolViolation)


def test_reserved_byte_is_ignored() -> None:
    raw = bytearray(Rst(3).encode())
    raw[1] = 0xFF
    assert decode_message(bytes(raw)) == Rst(3)


@given(st.binary(max_size=600))
def test_random_bytes_only_raise_wire_error(raw: bytes) -> None:
    try:
        msg = decode_message(raw)
    except WireError:
        return
    assert decode_message(msg.encode()) == msg


def test_domain_that_is_an_ip_literal_decodes_as_that_ip() -> None:
    raw = bytes([2, 0, 23, 0]) + bytes(12) + bytes([3, 7]) + b"1.2.3.4" + bytes(2)
    msg = decode_message(raw)
    assert isinstance(msg, Open) and msg.dest == Address("1.2.3.4", 0)
    assert msg.dest.atyp is Atyp.IPV4


@given(st.integers(0, 12), st.binary(max_size=300))
def test_random_bodies_only_raise_wire_error(mtype: int, body: bytes) -> None:
    raw = struct.pack("<BBH", mtype, 0, len(body)) + body
    try:
        msg = decode_message(raw)
    except WireError:
        return
    assert decode_message(msg.encode()) == msg


@given(messages, st.data())
def test_corrupted_messages_only_raise_wire_error(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(msg.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode_message(bytes(raw[:cut]))
    except WireError:
        pass


# ------------------------------------------------------------------------ addresses


def test_address_atyp_and_canonical_form() -> None:
    assert Address("10.1.2.3", 1).atyp is Atyp.IPV4
    assert Address("example.org", 1).atyp is Atyp.DOMAIN
    a = Address("2001:DB8:0:0::1", 8080)
    assert a.atyp is Atyp.IPV6
    assert a.host == "2001:db8::1"
    assert str(a) == "[2001:db8::1]:8080"
    assert str(Address("h", 2)) == "h:2"
    assert Address("2001:DB8::1", 1) == Address("2001:db8::1", 1)


@pytest.mark.parametrize(
    ("host", "port", "match"),
    [
        ("", 80, "1..255 bytes"),
        ("a" * 256, 80, "1..255 bytes"),
        ("é" * 128, 80, "1..255 bytes"),  # 256 bytes in UTF-8
        ("ok", 65536, "u16"),
        ("ok", -1, "u16"),
        ("fe80::1%eth0", 80, "scoped"),
        ("bad\udcff", 80, "not valid Unicode"),
    ],
)
def test_bad_addresses(host: str, port: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Address(host, port)


def test_address_host_must_be_str() -> None:
    with pytest.raises(ValueError, match="str"):
        Address(b"x", 1)  # type: ignore[arg-type]


def test_message_field_validation() -> None:
    with pytest.raises(ValueError, match="u32"):
        Rst(2**32)
    with pytest.raises(ValueError, match="u64"):
        Fin(1, -1)
    with pytest.raises(ValueError, match="u32"):
        Closed(True)
    with pytest.raises(ValueError, match="proof"):
        Hello(1, 1, 1, 1, 1, b"short")
    with pytest.raises(ValueError, match="u8"):
        Refused(1, 256)
    with pytest.raises(TypeError):
        Open(1, 1, ("a", 1))  # type: ignore[arg-type]


# ------------------------------------------------------------------------ immediates


@given(st.sampled_from(list(ImmKind)), st.integers(0, MAX_IMM_SLOT))
def test_imm_round_trip(kind: ImmKind, slot: int) -> None:
    imm = encode_imm(kind, slot)
    assert 0 <= imm <= 0xFFFFFFFF
    assert decode_imm(imm) == (kind, slot)
    # what lands in the wr's __be32 field (host order in memory) is the value in big endian
    assert struct.pack("=I", imm) == struct.pack(">I", (kind << 28) | slot)


def test_imm_known_values() -> None:
    assert encode_imm(ImmKind.DATA, 5) == socket.htonl(0x10000005)
    assert encode_imm(2, 0) == socket.htonl(0x20000000)
    assert decode_imm(socket.htonl(0x3FFFFFFF)) == (ImmKind.TAIL, MAX_IMM_SLOT)
    if sys.byteorder == "little":
        assert encode_imm(ImmKind.TAIL, 1) == 0x01000030


def test_imm_errors() -> None:
    with pytest.raises(ValueError, match="unknown immediate kind"):
        encode_imm(0, 1)
    with pytest.raises(ValueError, match="28 bits"):
        encode_imm(ImmKind.DATA, MAX_IMM_SLOT + 1)
    with pytest.raises(ValueError, match="28 bits"):
        encode_imm(ImmKind.DATA, -1)
    with pytest.raises(WireError, match="unknown immediate kind 0"):
        decode_imm(socket.htonl(0x00000001))
    with pytest.raises(WireError, match="unknown immediate kind 15"):
        decode_imm(socket.htonl(0xF0000001))
    with pytest.raises(WireError, match="u32"):
        decode_imm(2**32)
    with pytest.raises(WireError, match="u32"):
        decode_imm(-1)


@given(st.integers(0, 2**32 - 1))
def test_decode_imm_total(imm: int) -> None:
    try:
        kind, slot = decode_imm(imm)
    except WireError:
        return
    assert encode_imm(kind, slot) == imm


# ------------------------------------------------------------------------ private data


def test_private_data_round_trip() -> None:
    nonce = make_nonce()
    assert len(nonce) == NONCE_SIZE and nonce != make_nonce()
    pd = PrivateData(nonce)
    raw = pd.encode()
    assert len(raw) == 22 <= PRIVATE_DATA_MAX
    assert raw.startswith(b"RDPX")
    assert decode_private_data(raw) == pd
    assert pd.version == PROTOCOL_VERSION


def test_private_data_padding_ignored() -> None:
    """The IB CM hands the full private data area over, zero padded."""
    pd = PrivateData(bytes(range(16)))
    assert decode_private_data(pd.encode() + bytes(34)) == pd
    assert decode_private_data(memoryview(pd.encode() + bytes(34))) == pd


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (None, "no rdma_cm private data"),
        (b"", "no rdma_cm private data"),
        (b"RDPX\x01\x00", "too short"),
        (b"XXXX" + bytes(18), "magic b'XXXX'.*not an rdmaproxy node"),
        (b"RDPX\x03\x00" + bytes(16), "version 3, this node speaks 2"),
    ],
)
def test_private_data_errors(raw: bytes | None, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_private_data(raw)


def test_private_data_validation() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        PrivateData(b"short")
    with pytest.raises(ValueError, match="u16"):
        PrivateData(bytes(16), version=70000)


# ------------------------------------------------------------------------ proofs

SECRET = b"correct horse battery staple"


def test_proof_is_hmac_sha256() -> None:
    nc, na = bytes(16), bytes(range(16))
    expected = hmac.new(SECRET, b"connector" + nc + na, hashlib.sha256).digest()
    assert compute_proof(SECRET, ProofRole.CONNECTOR, nc, na) == expected
    assert compute_proof(SECRET, "connector", nc, na) == expected
    assert len(expected) == 32


def test_proof_verification() -> None:
    nc, na = make_nonce(), make_nonce()
    proof = compute_proof(SECRET, "acceptor", nc, na)
    assert verify_proof(SECRET, "acceptor", nc, na, proof)
    assert not verify_proof(SECRET, "connector", nc, na, proof)  # no reflection
    assert not verify_proof(b"other secret", "acceptor", nc, na, proof)
    assert not verify_proof(SECRET, "acceptor", na, nc, proof)  # nonce order matters
    assert not verify_proof(SECRET, "acceptor", nc, make_nonce(), proof)
    assert not verify_proof(SECRET, "acceptor", nc, na, proof[:-1])
    assert not verify_proof(SECRET, "acceptor", nc, na, bytes(32))


def test_proof_argument_errors() -> None:
    with pytest.raises(ValueError, match="role"):
        compute_proof(SECRET, "server", bytes(16), bytes(16))
    with pytest.raises(ValueError, match="nonce_acceptor"):
        compute_proof(SECRET, "acceptor", bytes(16), bytes(15))
    with pytest.raises(ValueError, match="empty"):
        compute_proof(b"", "acceptor", bytes(16), bytes(16))


# ------------------------------------------------------------------------ secret file


def test_load_secret(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"s3cret value\n")
    f.chmod(0o600)
    assert load_secret(f) == b"s3cret value"
    f.write_bytes(b"s3cret\r\n\n")
    assert load_secret(str(f)) == b"s3cret"
    f.write_bytes(b"  spaced  ")
    assert load_secret(f) == b"  spaced  "


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n\n"])
def test_load_secret_empty(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "secret"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(f"secret file {f}: is empty")):
        load_secret(f)


def test_load_secret_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(
        ConfigError, match=re.escape(f"secret file {missing}: cannot read it: No such file")
    ):
        load_secret(missing)
    with pytest.raises(ConfigError, match=r"not a regular file|Is a directory"):
        load_secret(tmp_path)
    if os.geteuid() != 0:  # root reads anything
        f = tmp_path / "locked"
        f.write_bytes(b"x")
        f.chmod(0)
        with pytest.raises(ConfigError, match="Permission denied"):
            load_secret(f)


def test_load_secret_warns_when_shared(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "secret"
    f.write_bytes(b"x\n")
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="rdmaproxy.wire"):
        assert load_secret(f) == b"x"
    assert "group/others" in caplog.text and "644" in caplog.text
    caplog.clear()
    f.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="rdmaproxy.wire"):
        load_secret(f)
    assert caplog.text == ""


def test_msg_types_are_distinct() -> None:
    assert len({t.value for t in MsgType}) == 7
