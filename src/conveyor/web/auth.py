"""Bearer tokens: read-write (`--token`) and read-only (`--read-token`), or $CONVEYOR_API_TOKENS.

With tokens set, every route but /healthz needs one: `Authorization: Bearer T` for programs, or the
dashboard's session cookie, set by signing in with a token (POST /session) so no token ever rides
in a URL. Tokens are compared in constant time, each against every configured one, and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import UsageError

READ, WRITE = "read", "write"
#: RFC 6750's b64token: what a bearer token may hold (so `read:` / `write:` prefixes are unambiguous)
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
ENV = "CONVEYOR_API_TOKENS"
ENV_HELP = (f"${ENV}: tokens separated by commas or whitespace, each `write:TOKEN` or `read:TOKEN` "
            "(a bare TOKEN is read-write)")
SESSION_COOKIE = "conveyor_session"
MAX_SESSIONS = 10_000


def _checked(token: str, where: str) -> str:
    if not _TOKEN.match(token):
        raise UsageError(f"{where}: a token may hold only letters, digits and . _ ~ + / = - (and must not be empty)")
    return token


def parse_env_tokens(text: str) -> tuple[list[str], list[str]]:
    """$CONVEYOR_API_TOKENS → (read-write tokens, read-only tokens)."""
    write: list[str] = []
    read: list[str] = []
    for n, entry in enumerate(re.split(r"[\s,]+", text.strip()), 1):
        if not entry:
            continue
        scope, sep, token = entry.partition(":")
        if not sep:
            scope, token = WRITE, entry
        if scope not in (READ, WRITE):
            raise UsageError(f"${ENV}, entry {n}: the scope must be read or write, not {scope[:20]!r}")
        (write if scope == WRITE else read).append(_checked(token, f"${ENV}, entry {n}"))
    return write, read


@dataclass
class Tokens:
    """The configured tokens and the dashboard's signed-in sessions (kept in this process only)."""

    write: list[str] = field(default_factory=list)
    read: list[str] = field(default_factory=list)
    _sessions: dict[str, str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        for token in self.write:
            _checked(token, "--token")
        for token in self.read:
            _checked(token, "--read-token")

    def __repr__(self) -> str:  # never the tokens themselves
        return f"Tokens(write={len(self.write)}, read={len(self.read)})"

    @classmethod
    def from_options(cls, write: Iterable[str], read: Iterable[str], env: str | None) -> Tokens:
        write, read = list(write), list(read)
        if env:
            more_write, more_read = parse_env_tokens(env)
            write += more_write
            read += more_read
        return cls(write, read)

    @property
    def enabled(self) -> bool:
        return bool(self.write or self.read)

    def scope_of(self, token: str) -> str | None:
        """write, read or None. Every configured token is compared (constant time each), so the
        time taken says nothing about which one matched or how much of it."""
        given = token.encode()
        scope = None
        for candidate, its in [(t, WRITE) for t in self.write] + [(t, READ) for t in self.read]:
            if hmac.compare_digest(given, candidate.encode()) and scope != WRITE:
                scope = its
        return scope

    def open_session(self, scope: str) -> str:
        """A dashboard session: a random id (256 bits) for the cookie, never the token itself."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            while len(self._sessions) >= MAX_SESSIONS:  # the oldest sign-in goes first
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[sid] = scope
        return sid

    def session_scope(self, sid: str) -> str | None:
        # a dict lookup, not a constant-time compare: a session id is 256 random bits, which no
        # timing of a hash lookup narrows down
        with self._lock:
            return self._sessions.get(sid)

    def close_session(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
