"""Text in: normalisation of odd input and incremental tokenization of LLM text deltas.

The assistant text arrives as deltas of any size (a character, half a surrogate pair, a sentence).
`IncrementalTokenizer.push` returns only ids that can no longer change, so the engine can feed one
text token per audio frame while the LLM is still writing; `push(...) + ... + flush()` equals the
one-shot `encode_text(tokenizer, whole_text)`. Upstream's `push_text` does not: it tokenizes each
segment on its own, so "of the " + "streaming" gives a lone space token the whole text never has.

Normalisation policy (`normalize_text`, and `TextNormalizer` for streams; both give the same text
for any split of the input, and applying them twice changes nothing):

* Surrogates: a UTF-16 pair, even split across two deltas, becomes its code point; a lone
  surrogate is dropped (it is not text, and the Rust tokenizer cannot take it).
* Line breaks: CRLF and lone CR become LF; VT, FF, NEL, U+2028 and U+2029 become LF as well.
* Control characters (Unicode category Cc, NUL included) other than TAB and LF are dropped.
* Invisible format characters are dropped: ZWSP U+200B, word joiner U+2060, BOM U+FEFF, soft
  hyphen U+00AD, Mongolian vowel separator U+180E and the bidi marks/embeddings/isolates. ZWJ and
  ZWNJ stay: emoji sequences and Persian/Indic spelling need them.
* NFC, as the Qwen tokenizer's own normalizer does; the stream holds back the characters that a
  later combining character could still compose with.
* Special-token markup in the text (e.g. a literal `<|im_end|>` from the LLM) is tokenized as plain
  text, never as the special token: the text column must not be able to close a turn.

Cost: each push re-tokenizes only the uncommitted tail (normally the last word or two), so a long
turn costs O(its length). A single pre-token (one "word"; for Chinese a whole run without
punctuation) longer than `MAX_PENDING_CHARS` is cut early at a token boundary at least
`_FORCED_MARGIN` characters before its end; only such pathological runs can differ from the
one-shot tokenization.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path
from typing import Any

from core.errors import CheckpointError

MAX_PENDING_CHARS = 256
_FORCED_MARGIN = 64

_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Held back until the next delta: a high surrogate (its low half may follow) and a CR followed
# only by surrogates (they may all be dropped as lone ones, and then an LF may still follow).
_HELD_TAIL = re.compile("\r[\ud800-\udfff]*\\Z|[\ud800-\udbff]\\Z")
_NEWLINES = {0x0B: "\n", 0x0C: "\n", 0x85: "\n", 0x2028: "\n", 0x2029: "\n"}
_INVISIBLE = (
    [0x00AD, 0x180E, 0x200B, 0x200E, 0x200F, 0x2060, 0xFEFF]
    + list(range(0x202A, 0x202F))
    + list(range(0x2066, 0x206A))
)


def _build_translation() -> dict[int, str | None]:
    table: dict[int, str | None] = {cp: None for cp in _INVISIBLE}
    for cp in list(range(0x00, 0x20)) + list(range(0x7F, 0xA0)):
        if cp not in (0x09, 0x0A):
            table[cp] = None
    table.update(_NEWLINES)
    return table


_TRANSLATION = _build_translation()


def _clean(text: str) -> str:
    """Character-level part of the policy (no NFC); callers keep CR and high surrogates at ends."""
    text = _SURROGATE_PAIR.sub(
        lambda m: m.group().encode("utf-16", "surrogatepass").decode("utf-16"), text
    )
    text = _LONE_SURROGATE.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.translate(_TRANSLATION)


def normalize_text(text: str) -> str:
    """Apply the whole normalisation policy (module docstring) to a complete text."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return unicodedata.normalize("NFC", _clean(text))


@functools.cache
def _composes_backward() -> frozenset[str]:
    """Starters that NFC may still merge with the character before them (NFC_QC=Maybe starters).

    Second characters of canonical two-character decompositions, plus Hangul medial and final
    jamo (composed algorithmically, absent from the decomposition table).
    """
    chars = {chr(cp) for cp in range(0x1161, 0x1176)} | {chr(cp) for cp in range(0x11A8, 0x11C3)}
    for cp in range(0x20000):
        decomposition = unicodedata.decomposition(chr(cp))
        if decomposition and not decomposition.startswith("<"):
            parts = decomposition.split()
            if len(parts) == 2:
                chars.add(chr(int(parts[1], 16)))
    return frozenset(chars)


def _stable_start(ch: str) -> bool:
    """True if NFC of `...|ch...` never reaches across the boundary before `ch`."""
    return unicodedata.combining(ch) == 0 and ch not in _composes_backward()


class TextNormalizer:
    """Streaming `normalize_text`: the concatenation of `push` outputs and `flush()` equals
    `normalize_text` of the concatenated input, for any split."""

    def __init__(self) -> None:
        self._raw_tail = ""  # a trailing CR (and the surrogates after it) or high surrogate
        self._nfc_tail = ""  # cleaned text from the last stable starter on

    def push(self, delta: str) -> str:
        """Feed a delta; return the normalised text that later input cannot change."""
        if not isinstance(delta, str):
            raise TypeError(f"text delta must be str, got {type(delta).__name__}")
        raw = self._raw_tail + delta
        held = _HELD_TAIL.search(raw)
        keep = len(held.group()) if held else 0
        self._raw_tail = raw[len(raw) - keep :]
        buffer = self._nfc_tail + _clean(raw[: len(raw) - keep])
        cut = len(buffer) - 1
        while cut > 0 and not _stable_start(buffer[cut]):
            cut -= 1
        if cut <= 0 and len(buffer) > MAX_PENDING_CHARS:  # endless combining run: bound the tail
            cut = len(buffer) - _FORCED_MARGIN
        cut = max(cut, 0)
        self._nfc_tail = buffer[cut:]
        return unicodedata.normalize("NFC", buffer[:cut])

    def flush(self) -> str:
        """End of text: return everything still held back and reset."""
        tail = self._nfc_tail + _clean(self._raw_tail)
        self._raw_tail = self._nfc_tail = ""
        return unicodedata.normalize("NFC", tail)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """One-shot tokenization of text under the module's policy: the reference for deltas."""
    return _encode(tokenizer, normalize_text(text))[0]


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not text:
        return [], []
    enc = tokenizer(
        text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
    )
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


class IncrementalTokenizer:
    """Text deltas in, text token ids out, with the ids of the unfinished tail held back.

    A boundary between two pre-tokens of the Qwen split regex is final when the character before
    it is not whitespace (the regex looked one character past it at most) or when a non-whitespace
    character follows somewhere (its whitespace alternatives scan to the end of a whitespace run and
    one character beyond, never further). The window keeps the text from the last final boundary
    on; the ids before it are taken from the tokenization of the whole window, because a
    pre-token's extent can depend on the characters after it.
    """

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.pre_tokenizer is None:
            raise CheckpointError(
                "incremental tokenization needs a fast tokenizer with a pre-tokenizer"
            )
        self._tokenizer = tokenizer
        self._pre_tokenize = backend.pre_tokenizer.pre_tokenize_str
        self._normalizer = TextNormalizer()
        self._window = ""  # normalised text not committed yet; starts on a final boundary

    def push(self, delta: str) -> list[int]:
        """Feed a text delta of any size; return the ids that can no longer change."""
        self._window += self._normalizer.push(delta)
        cut = self._final_boundary()
        if cut == 0 and len(self._window) > MAX_PENDING_CHARS:
            return self._commit_forced()
        return self._commit(cut)

    def flush(self) -> list[int]:
        """End of text: return all remaining ids and reset for the next turn."""
        self._window += self._normalizer.flush()
        return self._commit(len(self._window))

    def _final_boundary(self) -> int:
        window = self._window
        for _, (start, _) in reversed(self._pre_tokenize(window)):
            if start > 0 and not (window[start - 1].isspace() and window[start:].isspace()):
                return start
        return 0

    def _commit(self, cut: int) -> list[int]:
        if cut <= 0:
            return []
        ids, offsets = _encode(self._tokenizer, self._window)
        n = len(ids) if cut >= len(self._window) else sum(1 for start, _ in offsets if start < cut)
        self._window = self._window[cut:]
        return ids[:n]

    def _commit_forced(self) -> list[int]:
        ids, offsets = _encode(self._tokenizer, self._window)
        limit = len(self._window) - _FORCED_MARGIN
        n, end = 0, 0
        for i in range(1, len(ids)):  # last token boundary on a character boundary before limit
            if offsets[i - 1][1] <= limit and offsets[i][0] >= offsets[i - 1][1]:
                n, end = i, offsets[i - 1][1]
        self._window = self._window[end:]
        return ids[:n]


def load_tokenizer(model_dir: str | Path) -> Any:
    """Load the checkpoint's tokenizer (AutoTokenizer) from a local model directory."""
    model_dir = Path(model_dir)
    if (
        not (model_dir / "tokenizer.json").is_file()
        and not (model_dir / "tokenizer_config.json").is_file()
    ):
        raise CheckpointError(f"no tokenizer.json / tokenizer_config.json in {model_dir}")
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        # An empty config keeps AutoTokenizer from parsing the model's config.json, whose
        # `moss_tts_realtime` model type transformers does not know (it only logs a warning).
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), config=PretrainedConfig())
    except Exception as exc:  # any loader failure is a bad checkpoint for our callers
        raise CheckpointError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"tokenizer in {model_dir} is not a fast (tokenizers) tokenizer")
    return tokenizer
