"""The `make demo` example runs its scripted dialogue through a real pipeline into WAV files."""

from __future__ import annotations

import wave

from moss_pc_support import load_example

from moss_pipecat import MossTTSService


async def test_dialogue_to_wav_writes_every_turn(engine, tmp_path) -> None:
    """`make demo` must produce one non-empty WAV per reply, the whole dialogue and a transcript
    showing both sides of the conversation as the engine kept it."""
    demo = load_example("pipecat_dialogue_to_wav")
    voice = demo.write_demo_voice(tmp_path / "voice.wav")
    tts = MossTTSService(engine=engine, settings=MossTTSService.Settings(voice=str(voice), seed=0))
    turns = await demo.run_dialogue(tts, tokens_per_s=0)
    paths = demo.write_outputs(tmp_path / "out", turns, tts)
    names = sorted(p.name for p in paths)
    assert names == ["dialogue.wav", "transcript.txt", "turn_1.wav", "turn_2.wav", "turn_3.wav"]
    for path in paths[:3]:
        with wave.open(str(path)) as f:
            assert f.getframerate() == 24000 and f.getnframes() > 0
    lines = (tmp_path / "out" / "transcript.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["user", "assistant"] * 3
    assert tts.conversation.voice is not None
