"""Conversation history and its KV cache: canonical rows, reuse by common prefix, trimming,
voice change."""

from __future__ import annotations

import json

import pytest
import torch

from core.engine.commands import TurnsView
from core.engine.conv_state import ConvState
from core.errors import ContextOverflowError
from core.history import History, PrefixRows, common_prefix_len
from core.model import ModelConfig
from core.prompt import PromptBuilder, TokenIds
from core.text import encode_text, load_tokenizer
from core.values import SamplingParams, Voice


class FakePool:
    """Records what the context does to its KV sequence."""

    def __init__(self) -> None:
        self.next = 0
        self.truncations: list[tuple[int, int]] = []
        self.freed: list[int] = []

    def new_sequence(self) -> int:
        self.next += 1
        return self.next

    def truncate(self, seq: int, length: int) -> None:
        self.truncations.append((seq, length))

    def free(self, seq: int) -> None:
        self.freed.append(seq)


class Ctx(History):
    """A history with the engine thread's record of its KV cache beside it (`ConvState`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.state = ConvState(0, self, SamplingParams(seed=0), TurnsView(), cuttable_turns=8)

    def sync_kv(self, pool, target: torch.Tensor) -> torch.Tensor:
        return self.state.sync_kv(pool, target, None)

    def kv_appended(self, rows: torch.Tensor) -> None:
        self.state.kv.append(rows)

    def kv_rows(self) -> torch.Tensor:
        return self.state.kv_rows()

    @property
    def kv_len(self) -> int:
        return self.state.kv.length


@pytest.fixture(scope="module")
def builder(tiny_dirs) -> PromptBuilder:
    model_dir, _ = tiny_dirs
    tok = load_tokenizer(model_dir)
    cfg = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    return PromptBuilder(tok, TokenIds.from_tokenizer(tok, cfg))


def _voice(n: int, seed: int) -> Voice:
    g = torch.Generator().manual_seed(seed)
    return Voice(codes=torch.randint(0, 1024, (n, 16), generator=g), key=f"v{seed}", duration_s=n * 0.08)


def _frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (n, 16), generator=torch.Generator().manual_seed(seed))


def _ctx(builder, voice=None, max_rows=32768, trim_target=0.75) -> Ctx:
    return Ctx(builder, PrefixRows(builder), voice=voice, max_rows=max_rows,
               trim_target=trim_target)


def _feed(ctx: Ctx, pool: FakePool, target: torch.Tensor) -> torch.Tensor:
    """Simulate the engine: prefill what sync_kv asks for."""
    rows = ctx.sync_kv(pool, target)
    if rows.shape[0]:
        ctx.kv_appended(rows)
    return rows


def _assistant(ctx, builder, turn_id, text, n_frames, seed=0):
    ids = encode_text(builder.tokenizer, text)
    ctx.add_assistant(turn_id, text, ids, _frames(n_frames, seed))
    return ids


def test_common_prefix_len():
    """The KV is cut exactly where history changed: off by one would keep stale rows."""
    a = torch.arange(20).view(10, 2)
    b = a.clone()
    assert common_prefix_len(a, b) == 10
    b[4, 1] = -1
    assert common_prefix_len(a, b) == 4
    assert common_prefix_len(a[:3], b) == 3
    assert common_prefix_len(a[:0], b) == 0


def test_second_turn_prefills_only_new_rows(builder):
    """Turn 2 must reuse the cache of turn 1 (else every turn re-prefills the whole dialogue)."""
    ctx, pool = _ctx(builder, _voice(20, 1)), FakePool()
    ctx.add_user("Hello there.", None)
    target1 = ctx.begin_assistant(reserve_rows=50)
    assert _feed(ctx, pool, target1).shape[0] == target1.shape[0]
    # What the engine streams for the assistant turn: lead + steps (the EOS row is not fed).
    text_ids = encode_text(builder.tokenizer, "Hi! How can I help you today, my friend?")
    frames = _frames(5)
    streamed = [builder.prefill_rows(text_ids[:12])]
    # Step k (1..5) feeds [text 11+k, frame k-1]; the 6th sample was EOS (never fed back).
    streamed += [builder.step_row(text_ids[12 + k] if 12 + k < len(text_ids) else None, frames[k])
                 for k in range(5)]
    for r in streamed:
        ctx.kv_appended(r)
    ctx.add_assistant(7, "Hi!...", text_ids[:17], frames)
    ctx.add_user("Tell me more.", None)
    target2 = ctx.begin_assistant(reserve_rows=50)
    new = _feed(ctx, pool, target2)
    assert pool.truncations == []  # nothing fed was wrong
    user2 = builder.user_rows("Tell me more.", None, first=False)
    head = builder.assistant_prefix_rows(first=False)
    # New rows: the EOS row of turn 1, the user turn, the assistant prefix.
    assert new.shape[0] == 1 + user2.shape[0] + head.shape[0]
    assert int(new[0, 1]) == builder.ids.audio_eos
    assert torch.equal(ctx.kv_rows(), target2)


def test_interrupted_turn_cuts_the_cache_where_the_heard_turn_differs(builder):
    """After an interruption the unheard text must leave the cache, the rest must stay."""
    ctx, pool = _ctx(builder), FakePool()
    target = ctx.begin_assistant(reserve_rows=50)
    _feed(ctx, pool, target)
    prefix_len = target.shape[0]
    text_ids = encode_text(builder.tokenizer, "one two three four five six seven eight nine ten eleven")
    frames = _frames(6)
    ctx.kv_appended(builder.prefill_rows(text_ids[:12]))
    for k in range(5):
        ctx.kv_appended(builder.step_row(text_ids[12 + k] if 12 + k < len(text_ids) else None, frames[k]))
    heard_ids = encode_text(builder.tokenizer, "one two")
    ctx.add_assistant(3, "one two", heard_ids, frames[:2])
    target2 = ctx.begin_assistant(reserve_rows=50)
    _feed(ctx, pool, target2)
    (seq, keep), = pool.truncations
    assert heard_ids == text_ids[: len(heard_ids)] and len(heard_ids) < 12
    # The heard turn is shorter than the lead, so its BOS moves to its last text row: the cut.
    assert keep == prefix_len + len(heard_ids) - 1
    assert torch.equal(ctx.kv_rows(), target2)


def test_trimming_drops_oldest_turns_keeps_voice_and_current_user_turn(builder):
    """A long dialogue must keep serving: old turns go, the voice and the question stay."""
    voice = _voice(10, 2)
    ctx, pool = _ctx(builder, voice), FakePool()
    for i in range(6):
        ctx.add_user(f"Question number {i}?", None)
        _assistant(ctx, builder, 100 + i, f"Answer number {i} is here.", 8, seed=i)
    ctx.add_user("The current question, please keep me.", None)
    _feed(ctx, pool, ctx.begin_assistant(reserve_rows=0))  # the cache holds everything
    before = list(ctx.turns)
    reserve = 40
    ctx.max_rows = ctx.kv_len + reserve - 1  # one row over budget
    target = ctx.begin_assistant(reserve_rows=reserve)
    assert ctx.trims == 1
    assert ctx.turns == before[len(before) - len(ctx.turns):]  # the oldest turns went
    assert len(ctx.turns) < len(before) and ctx.turns[-1] is before[-1]  # question kept
    assert target.shape[0] + reserve <= 0.75 * ctx.max_rows  # trimmed to the target, not 1 row
    prefix = ctx.prefixes.rows(voice)
    assert torch.equal(target[: prefix.shape[0]], prefix)  # voice block kept
    _feed(ctx, pool, target)
    # Rebuilt from the turn boundary after the voice (the new first turn may share its header).
    assert prefix.shape[0] <= pool.truncations[-1][1] < prefix.shape[0] + 6


def test_overflow_error_when_the_current_turn_cannot_fit(builder):
    """A turn that cannot fit even alone must fail clearly, not loop or corrupt the context."""
    ctx = _ctx(builder, None, max_rows=200)
    ctx.add_user("Hi.", None)
    with pytest.raises(ContextOverflowError, match="max_context_rows"):
        ctx.begin_assistant(reserve_rows=400)
    assert len(ctx.turns) == 1  # the user's turn is not thrown away


def test_unanswered_user_turns_are_trimmed_down_to_the_newest(builder):
    """Prevents a conversation stuck on ContextOverflowError: replies cancelled before any audio
    leave user turns piling up with no assistant turn between them; the oldest must go (the
    newest, which this turn answers, stays)."""
    ctx = _ctx(builder, None)
    ctx.add_user("An early question.", None)
    _assistant(ctx, builder, 100, "An early answer.", 8)
    for i in range(6):
        ctx.add_user(f"The user keeps talking about many things, part {i}.", None)
    before = list(ctx.turns)
    full = ctx.begin_assistant(reserve_rows=0).shape[0]
    ctx.max_rows = full + 40 - 1  # one row over budget with 40 reserved
    target = ctx.begin_assistant(reserve_rows=40)
    assert ctx.trims == 1 and ctx.turns[-1] is before[-1]
    assert ctx.turns == before[len(before) - len(ctx.turns):]
    assert target.shape[0] + 40 <= 0.75 * ctx.max_rows


def test_a_turn_that_cannot_fit_keeps_the_history(builder):
    """Prevents an overflowing turn from deleting the history it then fails to use: the error
    leaves every turn in place."""
    ctx = _ctx(builder, None, max_rows=300)
    ctx.add_user("An early question.", None)
    _assistant(ctx, builder, 100, "An early answer.", 8)
    ctx.add_user("Now a question.", None)
    before = list(ctx.turns)
    with pytest.raises(ContextOverflowError, match="max_context_rows"):
        ctx.begin_assistant(reserve_rows=400)
    assert ctx.turns == before and ctx.trims == 0


def test_voice_change_keeps_only_the_system_block(builder):
    """A new voice must re-prefill the history after the system block, reusing that block."""
    ctx, pool = _ctx(builder, _voice(10, 3)), FakePool()
    ctx.add_user("Hello.", None)
    _feed(ctx, pool, ctx.begin_assistant(reserve_rows=10))
    old = ctx.prefixes.rows(ctx.voice)
    ctx.voice = _voice(12, 4)
    _feed(ctx, pool, ctx.begin_assistant(reserve_rows=10))
    keep = pool.truncations[-1][1]
    # Kept: the system block and the voice block's text header; cut at the first voice frame.
    assert builder.system_rows().shape[0] <= keep == common_prefix_len(old, ctx.prefixes.rows(ctx.voice))
    assert keep < old.shape[0]


def test_prefix_rows_are_built_once_per_voice(builder):
    """The system+voice prefix is shared by every conversation with that voice."""
    cache = PrefixRows(builder)
    v = _voice(10, 5)
    assert cache.rows(v) is cache.rows(Voice(codes=v.codes.clone(), key=v.key, duration_s=0.8))
    assert cache.rows(None).shape[0] == builder.system_rows().shape[0]


def test_late_cancel_rewrites_the_turn_it_names(builder):
    """A reply spoken as several turns is interrupted after all of them were generated: a late
    cut rewrites (or drops) the turn it names, even under a newer turn, and nothing else."""
    ctx = _ctx(builder)
    _assistant(ctx, builder, 1, "First answer.", 4)
    ctx.add_user("And?", None)
    _assistant(ctx, builder, 2, "Second answer.", 4)
    _assistant(ctx, builder, 3, "Third part.", 4)
    assert ctx.replace_assistant(2, "Second", encode_text(builder.tokenizer, "Second"), _frames(1))
    assert [t.text for t in ctx.turns] == ["First answer.", "And?", "Second", "Third part."]
    assert ctx.view()[2].frames == 1
    assert ctx.remove_assistant(3) and ctx.remove_assistant(1)
    assert [t.text for t in ctx.turns] == ["And?", "Second"]
    assert not ctx.replace_assistant(1, "x", [], _frames(1))  # gone: nothing to rewrite
    assert not ctx.remove_assistant(3)


def test_bad_user_turn_fails_when_added(builder):
    """An empty user turn must fail at add time, not break the next assistant turn."""
    ctx = _ctx(builder)
    with pytest.raises(ValueError):
        ctx.add_user("   ", None)
    assert ctx.turns == []
