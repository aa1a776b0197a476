"""MOSS-TTS-Realtime for LiveKit Agents: `from moss_livekit import TTS`.

Import this module at the top of the agent file (on the main thread): LiveKit requires plugins to
register there, and `python agent.py download-files` then fetches the weights ahead of time.
"""

from __future__ import annotations

import os

from livekit.agents import Plugin

from core import __version__

from .engine import (
    DEFAULT_CODEC,
    DEFAULT_MODEL,
    RECOMMENDED_INITIALIZE_TIMEOUT_S,
    USERDATA_KEY,
    WeightsDownloadError,
    close_shared_engines,
    engine_occupancy,
    load_fnc,
    prewarm,
    register_engine,
    shared_engine,
)
from .errors import MossTTSError
from .log import logger
from .tts import TTS

__all__ = [  # what an agent calls; the stream classes come from `TTS.stream()`/`synthesize()`
    "TTS",
    "MossTTSError",
    "prewarm",
    "load_fnc",
    "shared_engine",
    "register_engine",
    "close_shared_engines",
    "engine_occupancy",
    "USERDATA_KEY",
    "RECOMMENDED_INITIALIZE_TIMEOUT_S",
    "DEFAULT_MODEL",
    "DEFAULT_CODEC",
    "__version__",
]


class MossPlugin(Plugin):
    """Registers the plugin with LiveKit and downloads the weights on `download-files`."""

    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__ or "moss_livekit", logger)

    def download_files(self) -> None:
        """Fetch model and codec into the Hugging Face cache (override with MOSS_MODEL/MOSS_CODEC).

        Local directories are left alone; hub ids are downloaded, so later loads work offline.

        Raises:
            WeightsDownloadError: a repo could not be fetched; its one-line message names the
                repo, the cause and the `hf download` command. LiveKit's CLI prints it and exits
                with status 1 instead of a page of traceback.
        """
        from core.errors import CheckpointError
        from core.hub import resolve_pretrained

        failures = []
        for repo in (
            os.environ.get("MOSS_MODEL", DEFAULT_MODEL),
            os.environ.get("MOSS_CODEC", DEFAULT_CODEC),
        ):
            if os.path.isdir(repo):
                logger.info("%s is a local directory; nothing to download", repo)
                continue
            try:
                resolve_pretrained(repo)
            except CheckpointError as exc:
                failures.append(str(exc))
            else:
                logger.info("%s is ready in the Hugging Face cache", repo)
        if failures:
            raise WeightsDownloadError("cannot download the weights: " + "; ".join(failures))


Plugin.register_plugin(MossPlugin())
