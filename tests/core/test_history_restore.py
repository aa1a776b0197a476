"""A conversation continued on another engine from its `history` (the turns as heard, with
their codes): what a client rebuilds on the next server when its server is gone."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from engine_kit import build_engine, load_parts, state_of
from engine_kit import say_all as _say
from engine_kit import until as _until

from core import PastTurn, SamplingParams, UserTurn


@pytest.fixture(scope="module")
def parts(tiny_dirs):
    return load_parts(tiny_dirs)


async def _cut_reply(conv, text: str, played_s: float) -> None:
    """A reply interrupted after its first chunk (at least one frame); the listener heard
    `played_s`."""
    stream = conv.speak()
    stream.push_text(text)
    stream.end_text()
    async for _ in stream:
        break
    count = len(conv.turns)
    stream.cancel(played_s)
    await stream.wait()
    await _until(lambda: len(conv.turns) > count)


async def test_a_conversation_continues_on_another_engine_from_its_history(parts):
    """Prevents a rebuilt call losing or changing context: the second engine holds the same
    rows (voice, user speech codes, replies as heard) and speaks the next turn alike."""
    rng = np.random.default_rng(3)
    ref = (0.1 * rng.standard_normal(24000 * 2)).astype(np.float32)
    speech = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    first, second = build_engine(parts), build_engine(parts)
    try:
        voice = await first.load_voice(ref, sample_rate=24000)
        conv = first.conversation(voice=voice, sampling=SamplingParams(seed=4))
        await _say(conv.speak(user=UserTurn("Hi there.", speech, 16000)), "Hello, how are you?")
        await _cut_reply(conv, "This reply is a long one and gets interrupted early on.", 0.1)
        past = conv.history
        assert [(p.role, p.text, p.frames) for p in past] == [
            (t.role, t.text, t.frames) for t in conv.turns]
        assert past[0].frames > 0 and past[2].frames == 1  # speech codes; 0.1 s heard = 1 frame
        assert past[1].text_ids and all(isinstance(i, int) for i in past[1].text_ids)

        moved = second.conversation(voice=voice, sampling=conv.sampling, history=past)
        assert moved.turns == conv.turns  # known at once, before the engine thread ran
        assert torch.equal(state_of(moved).history.rows(), state_of(conv).history.rows())

        again = SamplingParams(temperature=0.0)  # greedy: the random stream's position aside
        here = await _say(conv.speak(user=UserTurn("Go on."), sampling=again), "Sure thing.")
        there = await _say(moved.speak(user=UserTurn("Go on."), sampling=again), "Sure thing.")
        assert here and b"".join(c.pcm for c in here) == b"".join(c.pcm for c in there)
        assert moved.turns == conv.turns
        assert torch.equal(moved.history[-1].codes, conv.history[-1].codes)
    finally:
        first.close()
        second.close()


async def test_a_history_the_model_cannot_use_is_refused_without_taking_a_slot(parts):
    """Prevents a bad (or hostile) history crashing the engine thread or leaking a slot: each
    is a TypeError/ValueError at the call, and every slot stays free."""
    engine = build_engine(parts, max_conversations=1)
    try:
        good = torch.zeros(3, 16, dtype=torch.long)
        bad = [
            (TypeError, ["not a turn"]),
            (ValueError, [PastTurn("system", "x")]),
            (ValueError, [PastTurn("assistant", "x", torch.zeros(3, 8, dtype=torch.long))]),
            (ValueError, [PastTurn("assistant", "x", good + 5000, (1,))]),
            (ValueError, [PastTurn("assistant", "x", good, (10**9,))]),
            (ValueError, [PastTurn("user", "x", good - 1)]),
        ]
        for error, history in bad:
            with pytest.raises(error):
                engine.conversation(history=history)
        conv = engine.conversation(history=[PastTurn("user", "Hello."),
                                            PastTurn("assistant", "Hi.", good, (1, 2))])
        assert [t.role for t in conv.turns] == ["user", "assistant"]
        assert await _say(conv.speak(), "Nice to meet you.")
    finally:
        engine.close()


async def test_turns_listener_is_told_of_each_history_change(parts):
    """Prevents a server polling for history changes: the listener runs after each change
    (user turn, reply, cut) and `turns` already shows the change when it runs."""
    engine = build_engine(parts)
    try:
        conv = engine.conversation(sampling=SamplingParams(seed=1))
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, ...]] = []
        conv.on_turns_changed(lambda: loop.call_soon_threadsafe(
            seen.append, tuple(t.role for t in conv.turns)))
        await conv.add_user_turn("Hello.")
        await _say(conv.speak(), "Hi.")
        await _until(lambda: seen and seen[-1] == ("user", "assistant"))
        assert ("user",) in seen
        conv.on_turns_changed(None)
        count = len(seen)
        await conv.add_user_turn("Again.")
        await asyncio.sleep(0.05)  # would the engine thread still call the removed listener?
        assert len(seen) == count
    finally:
        engine.close()


def test_past_turn_is_a_value():
    turn = PastTurn("assistant", "Hi.", torch.zeros(2, 16, dtype=torch.long), (5, 6))
    assert turn.frames == 2 and PastTurn("user", "x").frames == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        turn.text = "changed"  # type: ignore[misc]
