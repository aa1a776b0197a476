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
CONFORMANCE_DIR = REPO_ROOT.parent / "shared" / "conformance"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model_dir, codec_dir) of a tiny random checkpoint in the official layout."""
    from core.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """The upstream-written conformance pack: beside the repo in CI and team checkouts.

    A user with only the repository has no pack; the pack's own README asks that the suite still
    passes for them, so only the tests that read it are skipped, with the path in the reason.
    """
    if not CONFORMANCE_DIR.is_dir():
        pytest.skip(f"conformance pack not present at {CONFORMANCE_DIR}")
    return CONFORMANCE_DIR


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
