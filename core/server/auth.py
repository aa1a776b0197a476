"""The server's shared secret: where it comes from, and the constant-time check of a request."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

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


def token_matches(expected: str, header: str | None) -> bool:
    """`Authorization: Bearer <token>` against the secret, in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), expected.encode())
