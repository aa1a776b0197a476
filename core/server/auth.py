"""Who may talk to the server: the operator's shared secret, or a client token signed with it.

The shared secret (`MOSS_SERVER_TOKEN` or a file) is the operator's; give each agent process a
signed token instead (`moss-tts token --client NAME --ttl 3600`): it names the client, expires,
and cannot be turned back into the secret. Both are compared in constant time. A signed token
is `moss1.<client>.<expiry unix s>.<hex HMAC-SHA256 of "moss1.<client>.<expiry>">`.
"""

from __future__ import annotations

import hmac
import os
import re
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

SIGNED_PREFIX = "moss1"
_CLIENT = re.compile(r"[A-Za-z0-9_-]{1,64}")

TOKEN_ENV = "MOSS_SERVER_TOKEN"
MIN_TOKEN_CHARS = 16


class ServeError(Exception):
    """A setting the operator can fix (token, address): one line, like the CLI's errors."""


def read_token(token_file: Path | None, environ: dict[str, str] | None = None) -> str:
    """The shared secret: from the file when given, else from `MOSS_SERVER_TOKEN`.

    Raises:
        ServeError: no token, an unreadable file, or a token shorter than 16 characters.
    """
    environ = os.environ if environ is None else environ
    if token_file is not None:
        try:
            token = token_file.expanduser().read_text().strip()
        except OSError as exc:
            raise ServeError(f"--token-file {token_file}: {exc.strerror or exc}") from exc
    else:
        token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ServeError(f"no token: set {TOKEN_ENV} or pass --token-file (clients send it as "
                         "'Authorization: Bearer <token>')")
    if len(token) < MIN_TOKEN_CHARS:
        raise ServeError(f"the token has {len(token)} characters; use at least "
                         f"{MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")
    return token


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: `client` is None for the shared secret (the operator)."""

    client: str | None


def sign_token(secret: str, client: str, ttl_s: float, *, now: float | None = None) -> str:
    """A token for `client` (letters, digits, '-', '_'; at most 64) valid `ttl_s` seconds."""
    if not _CLIENT.fullmatch(client):
        raise ValueError(f"client must be 1-64 letters, digits, '-' or '_', got {client!r}")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    body = f"{SIGNED_PREFIX}.{client}.{int((time.time() if now is None else now) + ttl_s)}"
    return f"{body}.{_mac(secret, body)}"


def authenticate(secret: str, header: str | None, *, now: float | None = None) -> Caller | None:
    """`Authorization: Bearer <token>`: the caller, or None for a missing, wrong or expired token."""
    if not header or not header.startswith("Bearer "):
        return None
    token = header[len("Bearer "):]
    if hmac.compare_digest(token.encode(), secret.encode()):
        return Caller(None)
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != SIGNED_PREFIX or not parts[2].isdigit():
        return None
    body = ".".join(parts[:3])
    if not hmac.compare_digest(parts[3].encode(), _mac(secret, body).encode()):
        return None
    if int(parts[2]) <= (time.time() if now is None else now):
        return None
    return Caller(parts[1])


def _mac(secret: str, body: str) -> str:
    return hmac.new(secret.encode(), body.encode(), sha256).hexdigest()
