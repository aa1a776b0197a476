"""`moss-tts serve`: refuses to start without a usable token, and the token check itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.cli import main
from core.server.auth import TOKEN_ENV, Caller, authenticate, read_token, sign_token

GOOD = "0123456789abcdef0123"
ROOT = Path(__file__).resolve().parents[2]


def test_serve_refuses_to_start_without_a_token(monkeypatch, capsys, tmp_path):
    """Prevents an engine served to anyone who can reach the port: no token, a short one or an
    unreadable token file is one clear line and exit code 2, before any weights load."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve", "--tiny"]) == 2
    assert "no token" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert main(["serve", "--tiny"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", "--tiny", "--token-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moss-tts: error: --token-file") and err.count("\n") == 1
    monkeypatch.setenv(TOKEN_ENV, GOOD)
    assert main(["serve", "--tiny", "--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--compile"]])
def test_serve_compile_flag_reaches_the_engine_config(monkeypatch, capsys, flags):
    """Prevents `serve --compile` from being dropped on the way: the engine it loads is
    configured with `compile_step` exactly when the flag is given, and the compile time is
    reported (the engine load and the server are stand-ins here; the compile is tested in
    tests/core/test_compiled_step.py)."""
    import core
    import core.server.run

    loaded = []

    class Loaded:
        warmup_s = 12.5 if flags else 0.0

    def from_pretrained(model, codec, *, device, config):
        loaded.append(config)
        return Loaded()

    monkeypatch.setenv(TOKEN_ENV, GOOD)
    monkeypatch.setattr(core.Engine, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(core.server.run, "serve", lambda engine, options, token: None)
    assert main(["serve", "--tiny", "--device", "cpu", *flags]) == 0
    assert [c.compile_step for c in loaded] == [bool(flags)]
    assert ("compiled the frame and codec steps in 12.5 s" in capsys.readouterr().err) == bool(flags)


def test_token_file_wins_and_the_check_is_exact(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(GOOD + "\n")
    assert read_token(secret, environ={TOKEN_ENV: "x" * 40}) == GOOD
    assert read_token(None, environ={TOKEN_ENV: GOOD}) == GOOD
    assert authenticate(GOOD, f"Bearer {GOOD}") == Caller(None)
    for header in (None, "", GOOD, f"Bearer {GOOD}x", f"Bearer {GOOD[:-1]}", f"bearer {GOOD}"):
        assert authenticate(GOOD, header) is None, header


def test_signed_client_tokens_name_their_client_and_expire():
    """Prevents handing the shared secret to every agent process: a signed token names its
    client, stops working at its expiry, and any change to it (or another secret) voids it."""
    token = sign_token(GOOD, "bot-7", 60, now=1000.0)
    assert authenticate(GOOD, f"Bearer {token}", now=1059.0) == Caller("bot-7")
    assert authenticate(GOOD, f"Bearer {token}", now=1060.0) is None  # expired
    assert authenticate("another-secret-0123456789", f"Bearer {token}", now=1000.0) is None
    prefix, client, expiry, mac = token.split(".")
    for forged in (f"{prefix}.bot-8.{expiry}.{mac}", f"{prefix}.{client}.{int(expiry) + 99}.{mac}",
                   f"{prefix}.{client}.{expiry}.{mac[:-1]}0", f"{token}.x", GOOD[:10]):
        assert authenticate(GOOD, f"Bearer {forged}", now=1000.0) is None, forged
    for bad in ("", "a.b", "x" * 65, "émile"):
        with pytest.raises(ValueError, match="client"):
            sign_token(GOOD, bad, 60)
    with pytest.raises(ValueError, match="ttl_s"):
        sign_token(GOOD, "bot", 0)


def test_token_command_prints_a_token_the_server_accepts(capsys, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, GOOD)
    assert main(["token", "--client", "bot-1", "--ttl", "120"]) == 0
    printed = capsys.readouterr().out.strip()
    assert authenticate(GOOD, f"Bearer {printed}") == Caller("bot-1")
    assert main(["token", "--client", "no spaces"]) == 2
    assert "client" in capsys.readouterr().err


@pytest.mark.parametrize("token", ["", "   "])
def test_blank_tokens_are_no_tokens(token):
    with pytest.raises(Exception, match="no token"):
        read_token(None, environ={TOKEN_ENV: token})


async def test_serve_speaks_to_a_remote_engine_and_stops_cleanly_on_sigterm(tmp_path):
    """`moss-tts serve --tiny` end to end, as an operator runs it: /health answers, a
    RemoteEngine speaks a turn through it, and SIGTERM ends the process with code 0."""
    import asyncio
    import os
    import signal
    import socket
    import sys
    import urllib.request

    from core.remote import RemoteEngine

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, TOKEN_ENV: GOOD, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.cli", "serve", "--tiny", "--port", str(port),
        "--max-streams", "2", "--max-conversations", "2", env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            try:
                status = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status)
                break
            except OSError:
                assert proc.returncode is None, (await proc.stderr.read()).decode()
                assert asyncio.get_running_loop().time() < deadline, "server never came up"
                await asyncio.sleep(0.2)
        assert status == 200
        engine = RemoteEngine(url, token=GOOD)
        try:
            conv = engine.conversation()
            stream = conv.speak()
            stream.push_text("Hello over the wire.")
            stream.end_text()
            chunks = [c async for c in stream]
            assert chunks and chunks[-1].final and sum(c.num_samples for c in chunks) > 0
        finally:
            await engine.aclose()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
