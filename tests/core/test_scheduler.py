"""The scheduling policy on synthetic clocks: no torch, no threads, no wall time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.engine.scheduler import (
    ListenerClock,
    PrefillChunk,
    StreamDemand,
    chunk_ready,
    plan_step,
)

FRAME = 0.08


def _plan(demands, max_batch=64, prefill_chunk=64, lead_s=1.0):
    return plan_step(demands, max_batch=max_batch, prefill_chunk=prefill_chunk, lead_s=lead_s)


def test_every_ready_stream_advances_when_budgets_allow():
    """A stream with text and room under its lead cap must never be skipped (audio gaps)."""
    demands = [StreamDemand(i, decode=True, buffered_s=0.1 * i) for i in range(5)]
    plan = _plan(demands)
    assert sorted(plan.decode) == [0, 1, 2, 3, 4]
    assert plan.frames == 5 and not plan.prefill


def test_least_buffered_goes_first_when_the_batch_is_full():
    """Over the frame budget, the stream about to run dry must be served (no underrun)."""
    demands = [StreamDemand(i, decode=True, buffered_s=b) for i, b in enumerate([0.9, 0.0, 0.5, 0.2])]
    plan = _plan(demands, max_batch=2)
    assert plan.decode == (1, 3)


def test_streams_over_the_lead_cap_wait_and_report_when_to_wake():
    """A stream far ahead of real time must not burn compute; the engine must know when to wake."""
    demands = [StreamDemand(0, decode=True, buffered_s=1.3), StreamDemand(1, decode=True, buffered_s=1.1)]
    plan = _plan(demands, lead_s=1.0)
    assert plan.empty
    assert plan.wake_in_s == pytest.approx(0.1)
    assert _plan(demands, lead_s=None).decode == (1, 0)  # no cap: capacity mode


def test_starved_stream_is_not_planned():
    """A stream without text must wait, never be fed padding mid-turn."""
    plan = _plan([StreamDemand(0, decode=False), StreamDemand(1, decode=True)])
    assert plan.decode == (1,)


def test_long_prefill_is_chunked_and_never_stalls_decoding():
    """A new turn with a long history must not freeze streams that are already speaking."""
    demands = [StreamDemand(0, prefill_rows=1000, prefill_samples=True)]
    demands += [StreamDemand(i, decode=True, buffered_s=0.3) for i in range(1, 9)]
    plan = _plan(demands, prefill_chunk=128)
    assert plan.prefill == (PrefillChunk(0, 128, False),)
    assert sorted(plan.decode) == list(range(1, 9))
    assert plan.rows == 128 + 8


def test_prefill_that_completes_the_lead_samples_the_first_frame():
    """Only the chunk that ends the lead may sample frame 0 (earlier chunks emit no audio)."""
    plan = _plan([StreamDemand(0, prefill_rows=40, prefill_samples=True)], prefill_chunk=64)
    assert plan.prefill == (PrefillChunk(0, 40, True),)
    assert plan.frames == 1
    plan = _plan([StreamDemand(0, prefill_rows=40, prefill_samples=False)], prefill_chunk=64)
    assert plan.prefill == (PrefillChunk(0, 40, False),) and plan.frames == 0


def test_first_frames_come_before_prefix_only_prefill():
    """A turn whose text lead is ready gets the prefill budget before one still waiting for text."""
    demands = [
        StreamDemand(0, prefill_rows=50, prefill_samples=False, arrival=0.0),
        StreamDemand(1, prefill_rows=30, prefill_samples=True, arrival=1.0),
        StreamDemand(2, prefill_rows=50, prefill_samples=False, arrival=0.5),
    ]
    plan = _plan(demands, prefill_chunk=60)
    assert plan.prefill == (PrefillChunk(1, 30, True), PrefillChunk(0, 30, False))


def test_a_full_frame_budget_defers_new_first_frames_behind_starving_streams():
    """A stream already underrunning outranks a new turn's first frame when frames are scarce."""
    demands = [
        StreamDemand(0, prefill_rows=12, prefill_samples=True),
        StreamDemand(1, decode=True, buffered_s=-0.05),
    ]
    plan = _plan(demands, max_batch=1)
    assert plan.decode == (1,) and not plan.prefill


def test_playback_clock_detects_underruns_but_not_text_starvation():
    """An underrun means the listener heard a gap the engine caused, not a slow LLM."""
    clock = ListenerClock()
    assert not clock.deliver(0.0, 0.08)
    assert clock.buffered_s(0.05) == pytest.approx(0.03)
    assert not clock.deliver(0.07, 0.24)  # arrives before the first chunk finished
    assert clock.buffered_s(0.10, pending_s=0.08) == pytest.approx(0.22 + 0.08)
    assert clock.deliver(0.50, 0.08)  # late: 0.32 of audio had played out by 0.32
    assert not clock.deliver(0.90, 0.08, starved=True)  # waited for text: not an underrun


def _simulate(n_streams, max_batch, tick_s, lead_s, seconds):
    """Synthetic clock: each tick costs `tick_s`; every produced frame is delivered at once."""
    clocks = [ListenerClock() for _ in range(n_streams)]
    frames = [0] * n_streams
    underruns, now = 0, 0.0
    max_ahead = 0.0
    while now < seconds:
        demands = [StreamDemand(i, decode=True, buffered_s=clocks[i].buffered_s(now))
                   for i in range(n_streams)]
        plan = plan_step(demands, max_batch=max_batch, prefill_chunk=64, lead_s=lead_s)
        if plan.empty:
            now += plan.wake_in_s or tick_s
            continue
        now += tick_s
        for sid in plan.decode:
            underruns += clocks[sid].deliver(now, FRAME)
            frames[sid] += 1
            max_ahead = max(max_ahead, clocks[sid].buffered_s(now))
    return frames, underruns, max_ahead


def test_deadline_order_keeps_every_stream_real_time_when_capacity_suffices():
    """8 streams, 4 frames per 20 ms tick (1.6x real time overall): nobody may underrun, and
    the lead cap must bound how far any stream runs ahead."""
    frames, underruns, max_ahead = _simulate(8, 4, 0.02, lead_s=0.5, seconds=5.0)
    assert underruns == 0
    assert max_ahead <= 0.5 + FRAME + 1e-9
    assert max(frames) - min(frames) <= 1  # fair: no stream falls behind the others


def test_overload_spreads_the_shortfall_instead_of_starving_one_stream():
    """Beyond capacity every stream slows equally (least-buffered first), none stops entirely."""
    frames, _, _ = _simulate(8, 2, 0.02, lead_s=0.5, seconds=2.0)
    assert min(frames) > 0 and max(frames) - min(frames) <= 1


def _ramp(frame_period_s, *, early_cut, frames=40, chunk_frames=3):
    """One stream sampling a frame every `frame_period_s` through the engine's chunk ramp
    (1, then never more than already delivered, up to `chunk_frames`): chunk sizes, underruns."""
    clock, sizes, underruns = ListenerClock(), [], 0
    emitted = pending = 0
    for k in range(1, frames + 1):
        now, pending = k * frame_period_s, pending + 1
        due = 1 if emitted == 0 else min(chunk_frames, emitted)
        ahead = None if clock.playback_end is None else clock.buffered_s(now)
        ready = (chunk_ready(pending, due, ahead_s=ahead, frame_s=FRAME) if early_cut
                 else pending >= due)
        if ready:
            underruns += clock.deliver(now, pending * FRAME)
            sizes.append(pending)
            emitted, pending = emitted + pending, 0
    return sizes, underruns


def test_chunk_ramp_cuts_early_instead_of_letting_the_listener_run_dry():
    """Near full load (a frame every 75 ms: 64 streams on a busy CPU) the fixed ramp's 2- and
    3-frame chunks arrive after the audio before them played out; cutting a chunk early when
    the listener's audio would end before the rest of it arrives keeps every chunk on time."""
    assert _ramp(0.075, early_cut=False)[1] > 0
    sizes, underruns = _ramp(0.075, early_cut=True)
    assert underruns == 0
    assert max(sizes) == 3  # once the listener is far enough ahead, chunks still grow


def test_chunk_ramp_is_unchanged_when_the_engine_is_fast():
    """Well under real time the early cut never fires: the same chunks (no extra overhead)."""
    assert _ramp(0.01, early_cut=True) == _ramp(0.01, early_cut=False)
    assert _ramp(0.01, early_cut=True)[0][:4] == [1, 1, 2, 3]


def test_chunk_ready_holds_the_first_chunk_and_never_cuts_an_empty_one():
    """Before playback starts nothing can run dry (a larger first chunk fills as configured);
    with no frame pending there is nothing to send."""
    assert not chunk_ready(1, 3, ahead_s=None, frame_s=FRAME)
    assert not chunk_ready(0, 3, ahead_s=0.0, frame_s=FRAME)
    assert chunk_ready(1, 3, ahead_s=0.15, frame_s=FRAME)  # 2 frames to go need 0.16 s
    assert not chunk_ready(1, 3, ahead_s=0.16, frame_s=FRAME)
    assert chunk_ready(3, 3, ahead_s=None, frame_s=FRAME)


@st.composite
def _demands(draw):
    n = draw(st.integers(0, 12))
    out = []
    for sid in range(n):
        kind = draw(st.sampled_from(["decode", "prefill", "lead", "idle"]))
        buffered = draw(st.floats(-0.5, 2.0))
        if kind == "decode":
            out.append(StreamDemand(sid, decode=True, buffered_s=buffered))
        elif kind in ("prefill", "lead"):
            out.append(StreamDemand(sid, prefill_rows=draw(st.integers(1, 300)),
                                    prefill_samples=kind == "lead", arrival=draw(st.floats(0, 5))))
        else:
            out.append(StreamDemand(sid))
    return out


@settings(max_examples=200, deadline=None)
@given(_demands(), st.integers(1, 8), st.integers(1, 256), st.sampled_from([None, 0.5, 1.0]))
def test_plans_respect_budgets_and_serve_everyone_when_they_fit(demands, max_batch, chunk, lead):
    """Whatever the mix, a tick never exceeds its budgets, never plans a stream twice or a
    capped one, and when everything fits, nobody eligible is left out."""
    plan = plan_step(demands, max_batch=max_batch, prefill_chunk=chunk, lead_s=lead)
    by_sid = {d.sid: d for d in demands}
    sids = list(plan.decode) + [c.sid for c in plan.prefill]
    assert len(sids) == len(set(sids))
    assert plan.frames <= max_batch
    assert sum(c.rows for c in plan.prefill) <= chunk
    for sid in plan.decode:
        d = by_sid[sid]
        assert d.decode and (lead is None or d.buffered_s < lead)
    for c in plan.prefill:
        d = by_sid[c.sid]
        assert 0 < c.rows <= d.prefill_rows
        assert c.samples == (d.prefill_samples and c.rows == d.prefill_rows)
    eligible_decode = [d for d in demands if d.decode and (lead is None or d.buffered_s < lead)]
    prefills = [d for d in demands if d.prefill_rows]
    if (len(eligible_decode) + sum(d.prefill_samples for d in prefills) <= max_batch
            and sum(d.prefill_rows for d in prefills) <= chunk):
        assert sorted(plan.decode) == sorted(d.sid for d in eligible_decode)
        assert {c.sid for c in plan.prefill} == {d.sid for d in prefills}
    if plan.empty and any(d.decode for d in demands):
        assert plan.wake_in_s is not None and plan.wake_in_s >= 0
