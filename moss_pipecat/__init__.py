"""Pipecat plugin for MOSS-TTS-Realtime: `MossTTSService` and its user-turn companion."""

from core import __version__
from moss_pipecat.tts import MossTTSService, MossTTSSettings
from moss_pipecat.turns import MossUserTurnCapture

__all__ = ["MossTTSService", "MossTTSSettings", "MossUserTurnCapture", "__version__"]
