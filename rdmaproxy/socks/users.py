"""The ``--users FILE`` table for RFC 1929 username/password authentication.

File format (UTF-8)::

    # comment
    alice:correct horse battery staple
    bob:pa:ss          <- the password is everything after the first ':'

* One ``user:password`` per line; blank lines and lines whose first non-blank character is ``#``
  are ignored. There are no inline comments (``#`` may occur in passwords).
* The line terminator (``\\n`` or ``\\r\\n``) is removed; nothing else is: the password is
  taken verbatim, including spaces.
* The user name is non-empty, has no whitespace or control characters; user and password are
  each at most 255 bytes in UTF-8 (RFC 1929 field limit); the password is non-empty.
* A user may appear only once; a file without any user is an error.

Errors raise :class:`ConfigError` with a one-line message ``FILE:LINE: problem``.

Passwords are kept only as SHA-256 digests and compared with :func:`hmac.compare_digest`, so the
comparison time depends neither on where the passwords differ nor on their lengths, and an unknown
user costs the same as a wrong password.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator, Mapping
from typing import Final

import attrs

__all__ = ["MAX_FIELD", "ConfigError", "UserTable", "load_users", "parse_users"]

MAX_FIELD: Final = 255
_DUMMY_DIGEST: Final = hashlib.sha256(b"\x00rdmaproxy: no such user\x00").digest()


class ConfigError(Exception):
    """A configuration file is unusable; ``str()`` is a one-line message naming file and line."""


def _digest(password: bytes) -> bytes:
    return hashlib.sha256(password).digest()


@attrs.frozen
class UserTable:
    """User name → password digest. Use :meth:`check` to authenticate."""

    _digests: Mapping[bytes, bytes] = attrs.field(alias="digests")

    @classmethod
    def from_plain(cls, users: Mapping[str, str]) -> UserTable:
        """Build from clear-text ``{user: password}`` (tests, programmatic use)."""
        return cls(
            digests={u.encode("utf-8"): _digest(p.encode("utf-8")) for u, p in users.items()}
        )

    def check(self, username: bytes, password: bytes) -> bool:
        """True iff ``username`` exists and ``password`` is its password."""
        stored = self._digests.get(username)
        ok = hmac.compare_digest(_digest(password), _DUMMY_DIGEST if stored is None else stored)
        return ok and stored is not None

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, username: object) -> bool:
        return username in self._digests

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._digests)

    def __repr__(self) -> str:
        return f"<UserTable: {len(self._digests)} users>"


def _line_error(source: str, lineno: int, problem: str) -> ConfigError:
    return ConfigError(f"{source}:{lineno}: {problem}")


def parse_users(data: bytes | str, *, source: str = "<users>") -> UserTable:
    """Parse users-file content; ``source`` names the file in error messages."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    digests: dict[bytes, bytes] = {}
    first_seen: dict[bytes, int] = {}
    for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _line_error(
                source, lineno, f"not valid UTF-8 (byte {exc.start + 1} of the line)"
            ) from None
        line = line.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep:
            raise _line_error(source, lineno, "expected 'user:password' (no ':' found)")
        if not user:
            raise _line_error(source, lineno, "empty user name")
        if any(c.isspace() or not c.isprintable() for c in user):
            raise _line_error(
                source, lineno, f"user name {user!r} contains whitespace or control characters"
            )
        if not password:
            raise _line_error(source, lineno, f"empty password for user {user!r}")
        user_b = user.encode("utf-8")
        password_b = password.encode("utf-8")
        if len(user_b) > MAX_FIELD:
            raise _line_error(source, lineno, f"user name longer than {MAX_FIELD} bytes")
        if len(password_b) > MAX_FIELD:
            raise _line_error(
                source, lineno, f"password of user {user!r} longer than {MAX_FIELD} bytes"
            )
        if user_b in first_seen:
            raise _line_error(
                source,
                lineno,
                f"duplicate user {user!r} (first defined on line {first_seen[user_b]})",
            )
        first_seen[user_b] = lineno
        digests[user_b] = _digest(password_b)
    if not digests:
        raise ConfigError(f"{source}: no users defined")
    return UserTable(digests=digests)


def load_users(path: str | os.PathLike[str]) -> UserTable:
    """Read and parse a users file; unreadable files also raise :class:`ConfigError`."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read users file: {exc.strerror or exc}") from None
    return parse_users(data, source=name)
