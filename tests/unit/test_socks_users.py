"""Tests of the --users file parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdmaproxy.socks.users import ConfigError, UserTable, load_users, parse_users


def test_parse_basic_file_with_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(
        b"# proxy users\n"
        b"\n"
        b"alice:correct horse\n"
        b"   # indented comment\n"
        b"bob:pa:ss#not-a-comment\r\n"
        b"\xc3\xa9mile:p\xc3\xa4ss\n"
        b"   \t\n"
    )
    table = load_users(path)
    assert len(table) == 3
    assert set(table) == {b"alice", b"bob", "émile".encode()}
    assert table.check(b"alice", b"correct horse")
    assert table.check(b"bob", b"pa:ss#not-a-comment")
    assert table.check("émile".encode(), "päss".encode())
    assert not table.check(b"alice", b"correct horse ")
    assert not table.check(b"alice", b"")
    assert not table.check(b"carol", b"correct horse")
    assert not table.check(b"", b"")
    assert "correct horse" not in repr(table)


def test_password_is_verbatim() -> None:
    table = parse_users("user:x\nv: spaced \n")
    assert table.check(b"v", b" spaced ")
    assert not table.check(b"v", b"spaced")


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("alice\n", 1, "expected 'user:password'"),
        ("# c\n:pw\n", 2, "empty user name"),
        ("alice:\n", 1, "empty password"),
        ("al ice:pw\n", 1, "whitespace or control"),
        (" alice:pw\n", 1, "whitespace or control"),
        ("a\x01:pw\n", 1, "whitespace or control"),
        ("alice:a\nbob:b\nalice:c\n", 3, "duplicate user 'alice' (first defined on line 1)"),
        ("u" * 256 + ":pw\n", 1, "user name longer than 255 bytes"),
        ("u:" + "é" * 128 + "\n", 1, "longer than 255 bytes"),
    ],
)
def test_errors_name_file_line_and_problem(text: str, line: int, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_users(text, source="/etc/rdmaproxy/users")
    message = str(info.value)
    assert message.startswith(f"/etc/rdmaproxy/users:{line}: ")
    assert problem in message
    assert "\n" not in message


def test_invalid_utf8_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^f:2: not valid UTF-8"):
        parse_users(b"a:b\nc:\xff\n", source="f")


def test_empty_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^f: no users defined$"):
        parse_users("# nobody\n\n", source="f")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"nope: cannot read users file: No such file"):
        load_users(path)


def test_max_lengths_accepted() -> None:
    table = parse_users("u" * 255 + ":" + "p" * 255)
    assert table.check(b"u" * 255, b"p" * 255)


def test_from_plain() -> None:
    table = UserTable.from_plain({"alice": "pw"})
    assert table.check(b"alice", b"pw")
    assert not table.check(b"alice", b"pW")
    assert b"alice" in table
