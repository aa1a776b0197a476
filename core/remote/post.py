"""A minimal HTTP/1.1 POST over asyncio streams: the one request the client makes besides its
sockets (`POST /v1/voices`), without adding an HTTP client dependency."""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 64 << 20


async def post(url: str, body: bytes, headers: dict[str, str], *,
               timeout_s: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """POST `body` to `url`; (status, lower-cased headers, body). Raises OSError or
    TimeoutError when the server cannot be reached or answers nothing usable in time."""
    return await asyncio.wait_for(_post(url, body, headers), timeout_s)


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl.create_default_context() if secure else None, limit=MAX_HEAD_BYTES)
    try:
        lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}",
                 f"Content-Length: {len(body)}", "Connection: close",
                 *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        answer = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                answer[name.strip().lower()] = value.strip()
        length = answer.get("content-length")
        if length is not None and length.isdigit() and int(length) <= MAX_BODY_BYTES:
            data = await reader.readexactly(int(length))
        else:
            data = await reader.read(MAX_BODY_BYTES)
        return status, answer, data
    except (ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise OSError(f"malformed HTTP answer from {url}: {exc!r}") from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
