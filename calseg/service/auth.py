"""Users, API tokens, ownership checks and the bad-token rate limiter.

Tokens look like ``cs_`` + 43 URL-safe characters (32 random bytes from :mod:`secrets`, 256
bits). Only their sha256 (hex) is stored, in ``api_tokens.token_sha256``; the token itself is
shown once, when it is created. Requests send ``Authorization: Bearer <token>``.

Ownership: a user sees and touches only rows whose ``owner_id`` is theirs (jobs, recordings;
datasets, models, artifacts and metrics through their job); an admin sees everything. What a
user may not see is answered exactly like what does not exist (404), so ids of other users'
data cannot be probed.

The embedded default (``make serve``, ``make demo``) needs no manual step:
:func:`ensure_local_token` creates the admin user ``local`` and writes a token to
``settings.token_file`` (``var/token``, mode 0600) on first start.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload, make_transient_to_detached

from calseg.service.models import ApiToken, User, utcnow

TOKEN_PREFIX = "cs_"
TOKEN_RE = re.compile(r"^cs_[A-Za-z0-9_-]{43}$")
"""What a well-formed token looks like (anything else is rejected without a database query)."""
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
LOCAL_USER = "local"
"""The admin user of the embedded default."""
LAST_USED_RESOLUTION = timedelta(seconds=60)
"""``api_tokens.last_used_at`` is written at most once a minute per token (not per request)."""
TOKEN_CACHE_S = 5.0
"""Seconds an api process reuses a verified token's user without a database query (every
authenticated request paid one query before). Bound on staleness: a token revoked from
another process (``calseg tokens revoke``), or a user changed there, stops working in every
api process within this many seconds; one revoked with :func:`revoke_token` in the same
process stops at once. Unknown and revoked tokens are never cached."""


class _TokenCache:
    """(database URL, token sha256) -> (expiry on the monotonic clock, a detached copy of
    the token's user). Keyed by database too: one process may talk to several (tests)."""

    max_entries = 10_000

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[float, User]] = {}
        self._lock = threading.Lock()

    def get(self, digest: tuple[str, str]) -> User | None:
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None:
                return None
            if hit[0] <= time.monotonic():
                del self._entries[digest]
                return None
            return hit[1]

    def put(self, digest: tuple[str, str], user: User) -> None:
        copy = User(id=user.id, name=user.name, is_admin=user.is_admin, created_at=user.created_at)
        make_transient_to_detached(copy)
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + TOKEN_CACHE_S, copy)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_token_cache = _TokenCache()


def forget_cached_tokens() -> None:
    """Drop this process's token cache (done by :func:`revoke_token`; tests)."""
    _token_cache.clear()


HOW_TO_GET_A_TOKEN = (
    "send 'Authorization: Bearer <token>'. On the embedded service (make serve) the token is "
    "in var/token and the page URL with it is printed at start-up; on a shared server an "
    "admin creates one with `calseg tokens create <user>`"
)


class AuthError(ValueError):
    """A user or token operation cannot be done (name taken, unknown user or token, ...)."""


def new_token() -> str:
    """A new random token: ``cs_`` + 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """sha256 (hex, 64 characters) of a token: what the database stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or ""):
        raise AuthError(
            f"invalid {what} name {name!r}: 1-64 characters, letters, digits and ._@- "
            "(starting with a letter or digit)"
        )
    return name


def create_user(session: Session, name: str, *, is_admin: bool = False) -> User:
    """Insert a user (committed).

    Raises:
        AuthError: the name is invalid or taken.
    """
    _check_name(name, "user")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise AuthError(f"user {name!r} exists already")
    user = User(name=name, is_admin=is_admin)
    session.add(user)
    session.commit()
    return user


def get_user(session: Session, name: str) -> User:
    """The user called ``name``. Raises :class:`AuthError` when there is none."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AuthError(f"there is no user {name!r}; create it with `calseg users create {name}`")
    return user


def create_token(session: Session, user: User, name: str = "default") -> tuple[ApiToken, str]:
    """Issue a token for ``user`` (committed); returns (row, the token in clear).

    The clear token is not stored anywhere: show it to the user now.
    """
    _check_name(name, "token")
    token = new_token()
    row = ApiToken(user_id=user.id, name=name, token_sha256=hash_token(token))
    session.add(row)
    session.commit()
    return row, token


def revoke_token(session: Session, token_id: str) -> ApiToken:
    """Revoke a token by its id (or a unique prefix of it, >= 6 characters); committed.

    Raises:
        AuthError: no such token, or the prefix matches several.
    """
    if len(token_id) < 6:
        raise AuthError("give the token id (or at least its first 6 characters)")
    rows = session.scalars(select(ApiToken).where(ApiToken.id.startswith(token_id))).all()
    if not rows:
        raise AuthError(f"there is no token with id {token_id!r} (see `calseg tokens list`)")
    if len(rows) > 1:
        raise AuthError(f"{len(rows)} tokens start with {token_id!r}; give more characters")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    forget_cached_tokens()
    return row


def authenticate(session: Session, token: str) -> User | None:
    """The user holding ``token``, or None (malformed, unknown or revoked token).

    Updates the token's ``last_used_at`` at most once per :data:`LAST_USED_RESOLUTION`. A
    token verified in the last :data:`TOKEN_CACHE_S` seconds is answered from this process's
    cache (no query; the user is merged into ``session`` without loading).
    """
    if not TOKEN_RE.match(token or ""):
        return None
    digest = hash_token(token)
    key = (str(session.get_bind().url), digest)
    cached = _token_cache.get(key)
    if cached is not None:
        return session.merge(cached, load=False)
    row = session.scalar(
        select(ApiToken)
        .where(ApiToken.token_sha256 == digest)
        .options(joinedload(ApiToken.user))  # one query per request, not two
    )
    if row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    last = row.last_used_at
    if last is not None and last.tzinfo is None:  # SQLite returns naive datetimes
        last = last.replace(tzinfo=now.tzinfo)
    if last is None or now - last > LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    _token_cache.put(key, row.user)
    return row.user


def can_see(user: User | None, owner_id: str | None) -> bool:
    """Whether ``user`` may see a row owned by ``owner_id`` (None user: internal call, yes)."""
    return user is None or user.is_admin or (owner_id is not None and owner_id == user.id)


# ------------------------------------------------------------------------------ rate limit


@dataclass
class BadTokenLimiter:
    """Sliding-window limit on bad tokens per client address (in process memory).

    After ``max_failures`` invalid tokens from one address within ``window_s`` seconds,
    further invalid tokens from that address are answered 429 (``Retry-After``) instead of 401
    until the oldest failure leaves the window. Valid tokens are checked first and always
    accepted (``api.main.current_user``): a user behind the same address as an attacker is
    never locked out. Requests without any token do not count (a page opened without its token
    must not lock its user out). The state is per api process: with several uvicorn workers
    each keeps its own window (the limit is then per worker). The address is the socket peer;
    behind a reverse proxy list it in ``settings.trusted_proxies`` so that its
    ``X-Forwarded-For`` counts (``api.main.client_address``).
    """

    max_failures: int = 20
    window_s: float = 60.0

    def __post_init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, address: str, now: float) -> deque[float]:
        q = self._failures.setdefault(address, deque())
        while q and now - q[0] >= self.window_s:
            q.popleft()
        return q

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None when it is not limited."""
        now = time.monotonic()
        with self._lock:
            q = self._prune(address, now)
            if len(q) < self.max_failures:
                if not q:
                    self._failures.pop(address, None)
                return None
            return max(self.window_s - (now - q[-self.max_failures]), 0.0)

    def failure(self, address: str) -> None:
        """Record one bad token from ``address``."""
        now = time.monotonic()
        with self._lock:
            self._prune(address, now).append(now)
            if len(self._failures) > 100_000:  # bound memory under an address-spraying attack
                for key in list(self._failures)[:50_000]:
                    del self._failures[key]

    def reset(self) -> None:
        """Forget every failure (tests)."""
        with self._lock:
            self._failures.clear()


# ------------------------------------------------------------------------------ embedded


def read_token_file(path: Path) -> str | None:
    """The token stored in ``path``, or None when the file is missing or holds no token."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return text if TOKEN_RE.match(text) else None


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` with mode 0600 (created that way: never world-readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)


def ensure_local_token(session: Session, token_file: Path) -> tuple[str | None, str]:
    """Make sure the embedded default has a working token in ``token_file``.

    * The file holds a valid token: it is kept.
    * The database has no user: admin ``local`` is created with a token, written to the file.
    * User ``local`` exists (e.g. the file was deleted): a new token of ``local`` is written.
    * Other users exist but no ``local``: nothing is created (a server's database);
      returns (None, why).

    Returns:
        (token or None, a sentence saying what was done).
    """
    token = read_token_file(token_file)
    if token is not None and authenticate(session, token) is not None:
        return token, f"using the token in {token_file}"
    local = session.scalar(select(User).where(User.name == LOCAL_USER))
    if local is None:
        if session.scalar(select(User.id).limit(1)) is not None:
            return None, (
                f"this database has users but no {LOCAL_USER!r}: no token written to "
                f"{token_file}; create one with `calseg tokens create <user>`"
            )
        local = create_user(session, LOCAL_USER, is_admin=True)
        what = f"created admin user {LOCAL_USER!r}"
    else:
        what = f"issued a new token for user {LOCAL_USER!r}"
    _, token = create_token(session, local, "embedded")
    write_token_file(token_file, token)
    return token, f"{what}; its token is in {token_file} (mode 0600)"
