"""Text stream: tiny tokenizer, text normalisation, incremental tokenization of LLM deltas."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import CheckpointError
from core.text import (
    MAX_PENDING_CHARS,
    IncrementalTokenizer,
    TextNormalizer,
    encode_text,
    load_tokenizer,
    normalize_text,
)
from core.tiny import write_tiny_tokenizer

SPECIALS = {"<|endoftext|>": 422, "<|im_start|>": 423, "<|im_end|>": 424}
SPECIALS |= {"<|audio_pad|>": 425, "<|text_pad|>": 426}

PIECES = [
    "Hello", " world", " the", "streaming", " model", ",", ".", "!", "?", "...", " - ", "don't",
    "'s", "'LL", " I'm", "(", ")", "\"", "你好", "世界", "，", "。", "！", "今天天气很好", "🎉",
    "👨\u200d👩\u200d👧", "😀", "123", "3.14", " 2026", "1,000", " ", "  ", "   ", "\n", "\n\n", "\t",
    " \n ", "e\u0301", "Привет", " мир", "مرحبا", "こんにちは", "한국어", "<|im_end|>", "\u00a0",
]  # fmt: skip
ODD = ["\r", "\n", "\r\n", "\x00", "\x07", "\x0b", "\x85", "\u2028", "\u200b", "\u200d", "\ufeff",
       "\ud83d", "\ude00", "\udfff", "e", "\u0301", "\u0327", "a", " ", "\u1100", "\u1161", "\u11a8",
       "\u09c7", "\u09be", "好", "😀"]  # fmt: skip
SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model_dir = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(model_dir)
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def upstream_tokenizer(conformance_dir: Path) -> Any:
    return load_tokenizer(conformance_dir / "model")


@pytest.fixture(params=["tiny", "upstream"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def _split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces, prev = [], 0
    for c in bounds:
        pieces.append(text[prev:c])
        prev = c
    return pieces + [text[prev:]]


def _stream(tokenizer: Any, deltas: list[str]) -> list[int]:
    inc = IncrementalTokenizer(tokenizer)
    ids: list[int] = []
    for delta in deltas:
        ids += inc.push(delta)
    return ids + inc.flush()


def test_tiny_tokenizer_is_qwen_shaped_and_deterministic(tmp_path: Path) -> None:
    """Tests built on the tiny checkpoint would silently drift (or use wrong special ids) if the
    tokenizer changed between runs or lost its specials."""
    start = time.perf_counter()
    write_tiny_tokenizer(tmp_path / "a")
    elapsed = time.perf_counter() - start
    write_tiny_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert elapsed < 2.0
    tok = load_tokenizer(tmp_path / "a")
    assert len(tok) == 427
    for name, idx in SPECIALS.items():
        assert tok.convert_tokens_to_ids(name) == idx
        assert tok.encode(name, add_special_tokens=False) == [idx]
    assert tok("Hi")["input_ids"] == tok("Hi", add_special_tokens=False)["input_ids"]  # no BOS
    assert tok.pad_token_id == 422 and tok.eos_token_id == 424
    ids = encode_text(tok, "the streaming model 你好 12")
    assert max(ids) < 422 and len(ids) < len("the streaming model 你好 12")  # merges learned
    assert tok.decode(encode_text(tok, "Grüße 😀 x")) == "Grüße 😀 x"  # byte-level: no unknowns


@SETTINGS
@given(
    words=st.lists(st.sampled_from(PIECES), max_size=30),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_deltas_equal_whole_text_tokenization(tokenizer: Any, words: list[str], cuts: list[int]):
    """If streamed deltas tokenized differently from the whole text, the model would hear odd
    token splits (upstream's `push_text` defect) and speech would change with LLM chunking."""
    text = "".join(words)
    deltas = _split(text, cuts)
    expected = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert _stream(tokenizer, deltas) == expected
    assert _stream(tokenizer, list(text)) == expected  # one character per delta


@SETTINGS
@given(
    chars=st.lists(st.sampled_from(ODD + PIECES), max_size=40),
    cuts=st.lists(st.integers(0, 120), max_size=12),
)
def test_normalisation_is_split_invariant_and_idempotent(
    tiny_tokenizer: Any, chars: list[str], cuts: list[int]
) -> None:
    """Odd input (split surrogate pairs, CRLF across deltas, NUL, zero-width, combining marks)
    must not make the spoken text depend on how the LLM chunked it, nor crash the tokenizer."""
    text = "".join(chars)
    deltas = _split(text, cuts)
    norm = TextNormalizer()
    streamed = "".join(norm.push(d) for d in deltas) + norm.flush()
    assert streamed == normalize_text(text)
    assert normalize_text(streamed) == streamed
    assert _stream(tiny_tokenizer, deltas) == encode_text(tiny_tokenizer, text)


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (["a\ud83d", "\ude00b"], "a😀b"),  # surrogate pair split across deltas
        (["a\ud83d", "b\ude00"], "ab"),  # lone surrogates are dropped
        (["x\r", "\ny\rz\r"], "x\ny\nz\n"),  # CRLF split, lone CR, trailing CR
        (["a\r", "\udc00", "\udfff\ud800", "\nb"], "a\nb"),  # CR, lone surrogates, then LF
        (["a\x00b\x07\x1b[0m"], "ab[0m"),  # NUL and control characters dropped
        (["zero\u200bwidth\ufeff\u2060"], "zerowidth"),  # invisible characters dropped
        (["👨\u200d👩", "\u200c"], "👨\u200d👩\u200c"),  # ZWJ / ZWNJ kept
        (["cafe", "\u0301 ok"], "café ok"),  # composed across deltas (NFC)
        (["\u1100", "\u1161", "\u11a8"], "각"),  # Hangul jamo composed across deltas
        (["line\u2028sep\x0bv\tt"], "line\nsep\nv\tt"),
    ],
)
def test_odd_unicode_policy(tiny_tokenizer: Any, deltas: list[str], expected: str) -> None:
    """Each documented normalisation rule, including the ones that span two deltas."""
    norm = TextNormalizer()
    assert "".join(norm.push(d) for d in deltas) + norm.flush() == expected
    assert _stream(tiny_tokenizer, deltas) == encode_text(tiny_tokenizer, expected)


def test_special_token_markup_is_plain_text(tokenizer: Any) -> None:
    """An LLM that writes `<|im_end|>` must not be able to close the turn in the text column."""
    ids = _stream(tokenizer, ["Say <|im_", "end|> and <|text_pad|> now"])
    assert not set(ids) & set(SPECIALS.values())
    assert tokenizer.decode(ids) == "Say <|im_end|> and <|text_pad|> now"


def test_ids_are_released_before_the_text_ends(tiny_tokenizer: Any) -> None:
    """If push() held everything until flush(), the first audio would wait for the LLM's whole
    answer instead of its first words."""
    inc = IncrementalTokenizer(tiny_tokenizer)
    assert inc.push("Hello") == []  # may still become "Hellos"
    first = inc.push(" there,")
    assert tiny_tokenizer.decode(first) == "Hello"
    assert tiny_tokenizer.decode(inc.push(" my")) == " there,"
    assert tiny_tokenizer.decode(inc.flush()) == " my"
    assert inc.flush() == []
    assert tiny_tokenizer.decode(inc.push("Next turn, ")) == "Next turn"  # reusable after flush


class _Spy:
    """Tokenizer proxy that records the longest text handed to the tokenizer."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.longest = tok, 0
        self.backend_tokenizer = tok.backend_tokenizer

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kwargs)


def test_work_per_delta_is_bounded(tiny_tokenizer: Any) -> None:
    """Re-tokenizing the whole turn on every delta is quadratic: long answers would slow every
    engine tick. Only a short uncommitted tail may be re-tokenized."""
    spy = _Spy(tiny_tokenizer)
    inc = IncrementalTokenizer(spy)
    text = "Hello there, this is the streaming model speaking. 你好，世界。 " * 60
    ids: list[int] = []
    for i in range(0, len(text), 3):
        ids += inc.push(text[i : i + 3])
    ids += inc.flush()
    assert ids == encode_text(tiny_tokenizer, text)
    assert spy.longest <= 40

    spy.longest = 0
    run = "天" * 1000  # one pre-token with no boundary: forced cut, text still complete
    ids = [i for k in range(0, 1000, 7) for i in inc.push(run[k : k + 7])] + inc.flush()
    assert tiny_tokenizer.decode(ids) == run
    assert spy.longest <= MAX_PENDING_CHARS + 7


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    """A model directory without tokenizer files must fail at load with CheckpointError."""
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_bad_delta_type(tiny_tokenizer: Any) -> None:
    """Passing bytes or None as text must raise at once, not corrupt the stream."""
    inc = IncrementalTokenizer(tiny_tokenizer)
    with pytest.raises(TypeError):
        inc.push(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        normalize_text(None)  # type: ignore[arg-type]
