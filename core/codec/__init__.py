"""MOSS-Audio-Tokenizer: 24 kHz audio <-> 12.5 Hz residual-LFQ codes; batched streaming decode."""

from core.codec.codec import MossAudioCodec
from core.codec.config import CodecConfig
from core.codec.streaming import CodecDecodeState

__all__ = ["CodecConfig", "CodecDecodeState", "MossAudioCodec"]
