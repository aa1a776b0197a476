"""Shared fixtures: one tiny checkpoint per test session, and a leak check after every test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Two cores are shared by the test process and its engine thread: one intra-op thread each.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Upstream-written checkpoints and upstream outputs on them: tests/fixtures/conformance/README.md
CONFORMANCE_DIR = REPO_ROOT / "tests" / "fixtures" / "conformance"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model_dir, codec_dir) of a tiny random checkpoint in the official layout."""
    from core.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def conformance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conformance pack as upstream wrote it, links into `tests/fixtures/conformance`.

    `codec_ctx064` is upstream's codec with 0.64 s windows: the same weights as `codec`, so the
    repository stores only its config and the weights are linked in here.
    """
    pack = tmp_path_factory.mktemp("conformance")
    for item in CONFORMANCE_DIR.iterdir():
        if item.name != "codec_ctx064":
            (pack / item.name).symlink_to(item, target_is_directory=item.is_dir())
    ctx064 = pack / "codec_ctx064"
    ctx064.mkdir()
    (ctx064 / "config.json").symlink_to(CONFORMANCE_DIR / "codec_ctx064" / "config.json")
    (ctx064 / "model.safetensors").symlink_to(CONFORMANCE_DIR / "codec" / "model.safetensors")
    return pack


def _engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("moss-") and t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaked_engine_threads() -> Iterator[None]:
    """A test that forgets engine.close() leaves a scheduler thread spinning: fail that test."""
    before = _engine_threads()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _engine_threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = {t for t in leaked if t.is_alive()}
    assert not leaked, f"engine threads left running: {sorted(t.name for t in leaked)}"
