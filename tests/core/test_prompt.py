"""Prompt rows against the upstream conformance rows, and the delay layout's invariants.

Deliberate differences from upstream, stated exactly (see core/prompt.py):
1. Turn 0: upstream repeats `<|im_end|>\\n` after the system/voice block (rows 185-186 and 187-188
   of its `turn_input_ids`); our rows are upstream's with rows 185-186 removed.
2. A rebuilt assistant turn ends with its EOS row `[<|text_pad|>, 1026, 1024 x 15]`; upstream's
   cache (`conversation_rows`) has no such row after assistant turn 1.
3. Assistant text ids come from whole-text tokenization; upstream's conformance run consumed the
   ids of its segmenting `push_text`, so the prefill/step tests feed its consumed ids.
Everything else (system, voice, user text+audio, text-only user turn, turn 2, prefill, steps) is
row-for-row equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from core.errors import CheckpointError, InvalidAudioError
from core.model.config import ModelConfig
from core.prompt import DELAY, PromptBuilder, TokenIds
from core.text import encode_text, load_tokenizer
from core.tiny import write_tiny_tokenizer

DOUBLED = slice(185, 187)  # upstream's first `<|im_end|>\n` pair on turn 0
TEXT_PAD, BOS, EOS, PAD = 426, 1025, 1026, 1024


@pytest.fixture(scope="module")
def ref(conformance_dir: Path) -> dict[str, Any]:
    npz = np.load(conformance_dir / "ref_outputs.npz")
    out: dict[str, Any] = {k: torch.from_numpy(npz[k]) for k in npz.files if k.startswith("tts/")}
    for name in ("wav_prompt", "wav_user1", "wav_user2"):
        out[name] = torch.from_numpy(npz[f"codec/{name}/codes32"][:16].T.copy())
    out["json"] = json.loads((conformance_dir / "ref_outputs.json").read_text())
    return out


@pytest.fixture(scope="module")
def config(conformance_dir: Path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((conformance_dir / "model" / "config.json").read_text()))


@pytest.fixture(scope="module")
def pb(config: ModelConfig, conformance_dir: Path) -> PromptBuilder:
    tok = load_tokenizer(conformance_dir / "model")
    return PromptBuilder(tok, TokenIds.from_tokenizer(tok, config))


@pytest.fixture(scope="module")
def tiny_pb(tmp_path_factory: pytest.TempPathFactory, config: ModelConfig) -> PromptBuilder:
    model_dir = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(model_dir)
    tok = load_tokenizer(model_dir)
    return PromptBuilder(tok, TokenIds.from_tokenizer(tok, config))


def _without_doubled(rows: torch.Tensor, pb: PromptBuilder) -> torch.Tensor:
    pair = [pb.ids.im_end, *pb.ids.newline]
    assert rows[185:189, 0].tolist() == pair + pair, "upstream layout changed"
    return torch.cat([rows[: DOUBLED.start], rows[DOUBLED.stop :]])


def _head(pb: PromptBuilder, ref: dict[str, Any]) -> torch.Tensor:
    return torch.cat([pb.system_rows(), pb.voice_rows(ref["wav_prompt"])])


def test_token_ids_from_tokenizer(pb: PromptBuilder) -> None:
    """Wrong special ids put garbage in the text column of every prompt row."""
    ids = pb.ids
    assert (ids.endoftext, ids.im_start, ids.im_end) == (422, 423, 424)
    assert (ids.audio_pad_text, ids.text_pad) == (425, 426)
    assert (ids.audio_pad, ids.audio_bos, ids.audio_eos) == (PAD, BOS, EOS)
    assert ids.newline == tuple(pb.tokenizer.encode("\n", add_special_tokens=False))


def test_token_ids_disagreeing_with_config(pb: PromptBuilder, config: ModelConfig) -> None:
    """A tokenizer from another checkpoint must be refused at load, not produce wrong rows."""
    fields = dict(text_pad_id=426, audio_pad_text_id=425, audio_pad_code=PAD)
    fields |= dict(audio_bos_code=BOS, audio_eos_code=EOS, rvq=16)
    TokenIds.from_tokenizer(pb.tokenizer, SimpleNamespace(**fields))
    with pytest.raises(CheckpointError, match="text_pad_id"):
        TokenIds.from_tokenizer(pb.tokenizer, SimpleNamespace(**(fields | {"text_pad_id": 425})))
    with pytest.raises(CheckpointError, match="audio_pad_text_id"):
        bad = fields | {"audio_pad_text_id": 7}
        TokenIds.from_tokenizer(pb.tokenizer, SimpleNamespace(**bad))
    with pytest.raises(CheckpointError, match="text vocab"):
        bad = fields | {"text_vocab_size": 424}
        TokenIds.from_tokenizer(pb.tokenizer, SimpleNamespace(**bad))

    class NoTextPad:
        def __init__(self, tok: Any) -> None:
            self.tok = tok

        def encode(self, text: str, **kw: Any) -> list[int]:
            return [60, 61] if text == "<|text_pad|>" else self.tok.encode(text, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.tok, name)

    with pytest.raises(CheckpointError, match="<\\|text_pad\\|>"):
        TokenIds.from_tokenizer(NoTextPad(pb.tokenizer), config)


@pytest.mark.parametrize("scenario", ["text_audio", "text_only"])
def test_turn0_rows_match_upstream(pb: PromptBuilder, ref: dict[str, Any], scenario: str) -> None:
    """Prompt rows that differ from what the checkpoint was run with change the voice and the
    words; only the documented doubled `<|im_end|>\\n` may differ."""
    user_audio = ref["wav_user1"] if scenario == "text_audio" else None
    rows = torch.cat(
        [
            _head(pb, ref),
            pb.user_rows(ref["json"]["texts"]["user1"], user_audio, first=True),
            pb.assistant_prefix_rows(first=False),
        ]
    )
    expected = _without_doubled(ref[f"tts/{scenario}/turn_input_ids"], pb)
    assert rows.dtype == torch.long and rows.device.type == "cpu"
    assert torch.equal(rows, expected)


def test_turn2_rows_match_upstream(pb: PromptBuilder, ref: dict[str, Any]) -> None:
    """A later user turn (short text, BOS on its last token, user audio) must match exactly."""
    rows = torch.cat(
        [
            pb.user_rows(ref["json"]["texts"]["user2"], ref["wav_user2"], first=False),
            pb.assistant_prefix_rows(first=False),
        ]
    )
    assert torch.equal(rows, ref["tts/turn2/turn_input_ids"])


@pytest.mark.parametrize("scenario", ["text_only", "text_audio", "turn2"])
def test_prefill_and_step_rows_match_upstream(
    pb: PromptBuilder, ref: dict[str, Any], scenario: str
) -> None:
    """The 12-row text lead with BOS, and each fed-back frame row, must be upstream's exactly:
    an off-by-one here shifts text against audio for the whole turn."""
    consumed = ref["json"]["tts"][scenario]["text_tokens_consumed"]
    prefill = ref[f"tts/{scenario}/prefill_input_ids"]
    assert torch.equal(pb.prefill_rows(consumed), prefill[-DELAY:])
    frames, steps = ref[f"tts/{scenario}/frames"], ref[f"tts/{scenario}/step_input_ids"]
    rows = [
        pb.step_row(None if consumed[DELAY - 1 + k] == TEXT_PAD else consumed[DELAY - 1 + k], f)
        for k, f in enumerate(frames[: len(steps)], start=1)
    ]
    assert torch.equal(torch.cat(rows), steps)


def test_rebuilt_conversation_matches_upstream_cache(pb: PromptBuilder, ref: dict[str, Any]):
    """Rebuilding a conversation from rows (after trimming or eviction) must reproduce the cache
    the model continued from, plus the two documented differences."""
    texts, facts = ref["json"]["texts"], ref["json"]["tts"]
    consumed1 = facts["text_audio"]["text_tokens_consumed"]
    eos_frame = facts["text_audio"]["eos_frame"]
    consumed2 = facts["turn2"]["text_tokens_consumed"]
    n_steps2 = ref["tts/turn2/step_input_ids"].shape[0]
    frames2 = ref["tts/turn2/frames"]
    ours = torch.cat(
        [
            _head(pb, ref),
            pb.user_rows(texts["user1"], ref["wav_user1"], first=True),
            pb.assistant_prefix_rows(first=False),
            pb.assistant_turn_rows(
                [t for t in consumed1 if t != TEXT_PAD], ref["tts/text_audio/frames"][:eos_frame]
            ),
            pb.user_rows(texts["user2"], ref["wav_user2"], first=False),
            pb.assistant_prefix_rows(first=False),
            pb.prefill_rows(consumed2),
            *[
                pb.step_row(consumed2[DELAY - 1 + k], frames2[k - 1])
                for k in range(1, n_steps2 + 1)
            ],
        ]
    )
    upstream = _without_doubled(ref["tts/conversation_rows"], pb)
    end_turn1 = 259 - 2  # upstream row 259 opens turn 2; two rows fewer after difference 1
    eos_row = torch.full((1, 17), PAD)
    eos_row[0, 0], eos_row[0, 1] = TEXT_PAD, EOS
    expected = torch.cat([upstream[:end_turn1], eos_row, upstream[end_turn1:]])
    assert torch.equal(ours, expected)


def test_whole_text_ids_differ_from_upstream_segments(pb: PromptBuilder, ref: dict[str, Any]):
    """Documents difference 3: upstream's segmenting push_text splits "of the " | "streaming"
    into a lone space token; whole-text tokenization does not (same text, different ids)."""
    text = ref["json"]["texts"]["assistant1"]
    consumed = [t for t in ref["json"]["tts"]["text_audio"]["text_tokens_consumed"] if t != 426]
    ours = encode_text(pb.tokenizer, text)
    assert ours != consumed
    assert pb.tokenizer.decode(ours) == pb.tokenizer.decode(consumed) == text


def _step_rows(pb: PromptBuilder, ids: list[int], frames: torch.Tensor) -> torch.Tensor:
    """What the engine feeds: prefill, then [next text or pad, previous frame] per frame."""
    lead = min(len(ids), DELAY) or 1
    rows = [pb.prefill_rows(ids)]
    for k in range(1, frames.shape[0] + 1):
        j = lead - 1 + k
        rows.append(pb.step_row(ids[j] if j < len(ids) else None, frames[k - 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("n_text", [0, 1, 5, 11, 12, 13, 30])
@pytest.mark.parametrize("n_frames", [0, 1, 4, 25])
def test_assistant_turn_rows_equal_streamed_rows_plus_eos(
    tiny_pb: PromptBuilder, n_text: int, n_frames: int
) -> None:
    """A turn rebuilt after interruption or trimming must be exactly what was streamed (plus the
    EOS row), or the next turn continues from a context the model never produced."""
    gen = torch.Generator().manual_seed(n_text * 100 + n_frames)
    ids = torch.randint(0, 422, (n_text,), generator=gen).tolist()
    frames = torch.randint(0, 1024, (n_frames, 16), generator=gen)
    rows = tiny_pb.assistant_turn_rows(ids, frames)
    streamed = _step_rows(tiny_pb, ids, frames)
    assert torch.equal(rows[:-1], streamed[: rows.shape[0] - 1])
    assert rows[-1, 1].item() == EOS and (rows[-1, 2:] == PAD).all()
    assert (rows[:, 1] == BOS).sum() == 1 and (rows[:, 1] == EOS).sum() == 1
    spoken = [t for t in rows[:, 0].tolist() if t != TEXT_PAD]
    assert spoken == ids[: DELAY + n_frames + 1]  # text past the EOS row was never spoken


def test_user_rows_layouts(tiny_pb: PromptBuilder) -> None:
    """User turns: BOS 12 rows into long text, on the last token of short text, and never an EOS
    row hidden inside text that is too long for its audio (upstream's quirk, core/prompt.py)."""
    pb = tiny_pb
    codes = torch.randint(0, 1024, (3, 16), generator=torch.Generator().manual_seed(0))
    prefix = 1 + len(encode_text(pb.tokenizer, "user\n"))  # "<|im_start|>user\n" rows

    def layout(text: str) -> tuple[int, int, int, int]:
        rows = pb.user_rows(text, codes, first=True)
        n_text = len(encode_text(pb.tokenizer, text.strip()))
        col = rows[:, 1].tolist()
        return n_text, col.index(BOS) - prefix, col.index(EOS) - prefix, rows.shape[0] - prefix

    n, bos, eos, total = layout("hi there")  # short: BOS on the last text token
    assert (bos, eos, total) == (n - 1, n + 3, n + 4)
    n, bos, eos, total = layout("123456789012345")  # digits: one token each; 12 <= n <= 3 + 13
    assert n >= DELAY and (bos, eos, total) == (DELAY - 1, DELAY + 3, DELAY + 4)
    n, bos, eos, total = layout("1" * 40)  # too long for 3 frames
    assert n > 3 + 13 and eos == total - 1 == n - 1 and bos == eos - 4
    rows = pb.user_rows("", codes, first=False)  # audio only: BOS on the role's newline row
    newline_row = len(pb.ids.newline) + prefix  # after "<|im_end|>\n"
    assert rows[:, 1].tolist().index(BOS) == newline_row and rows[newline_row, 0] == 198
    text_only = pb.user_rows("  hi  ", None, first=True)
    assert (text_only[:, 1:] == PAD).all() and text_only.shape[0] == prefix + 1


def test_bad_input_is_rejected(tiny_pb: PromptBuilder) -> None:
    """Malformed codes or ids must fail with a precise error at the call, not as a CUDA
    index error deep in the model."""
    pb = tiny_pb
    ok = torch.zeros(4, 16, dtype=torch.long)
    with pytest.raises(InvalidAudioError, match=r"\[frames, 16\]"):
        pb.voice_rows(torch.zeros(16, dtype=torch.long))
    with pytest.raises(InvalidAudioError, match="integer"):
        pb.voice_rows(ok.float())
    with pytest.raises(InvalidAudioError, match="audio ids"):
        pb.voice_rows(ok + 1024)  # pad is not a codec code
    with pytest.raises(InvalidAudioError, match="no frames"):
        pb.voice_rows(ok[:0])
    with pytest.raises(InvalidAudioError):
        pb.user_rows("hi", ok[:, :8], first=True)
    with pytest.raises(ValueError, match="text or audio"):
        pb.user_rows("   ", None, first=True)
    with pytest.raises(TypeError):
        pb.user_rows(b"hi", None, first=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        pb.prefill_rows([5, 427])
    with pytest.raises(ValueError, match="outside"):
        pb.step_row(-1, ok[0])
    with pytest.raises(InvalidAudioError, match="one frame"):
        pb.step_row(5, ok[:2])
    with pytest.raises(InvalidAudioError):
        pb.step_row(5, torch.full((16,), 1027))
    fed_back = ok[0].clone()
    fed_back[3] = BOS  # a sampled special on codebook 3 is fed back as upstream does
    assert pb.step_row(None, fed_back)[0, 4] == BOS
