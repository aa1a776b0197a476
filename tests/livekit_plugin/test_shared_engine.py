"""One engine per worker process: LiveKit's setup function, THREAD executor and load function."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from livekit.agents import JobExecutorType, JobProcess, Plugin

import moss_livekit
from core import EngineConfig

CONFIG = EngineConfig(max_streams=2, max_conversations=4, max_frames_per_turn=8, lead_s=None,
                      kv_num_blocks=64, kv_block_size=32)


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Each test starts and ends without shared engines (they own a device thread)."""
    moss_livekit.close_shared_engines()
    yield
    moss_livekit.close_shared_engines()


def test_rooms_in_threads_load_the_engine_once(tiny_dirs, fresh_registry) -> None:
    """Prevents: every room thread of a THREAD-executor worker loading its own copy of the
    model (gigabytes of GPU memory per room)."""
    model_dir, codec_dir = tiny_dirs
    procs = [
        JobProcess(executor_type=JobExecutorType.THREAD, user_arguments=None, http_proxy=None)
        for _ in range(4)
    ]
    threads = [
        threading.Thread(
            target=moss_livekit.prewarm,
            args=(proc,),
            kwargs={"model": model_dir, "codec": codec_dir, "device": "cpu", "config": CONFIG},
        )
        for proc in procs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    engines = {id(proc.userdata[moss_livekit.USERDATA_KEY]) for proc in procs}
    assert len(engines) == 1
    engine = procs[0].userdata[moss_livekit.USERDATA_KEY]
    assert moss_livekit.shared_engine(model_dir, codec_dir, device="cpu", config=CONFIG) is engine


async def test_tts_without_engine_prewarms_the_shared_one(tiny_dirs, fresh_registry) -> None:
    """Prevents: a TTS built from paths loading the model on the first reply (seconds of
    silence) or loading a second copy next to the worker's engine."""
    model_dir, codec_dir = tiny_dirs
    plugin = moss_livekit.TTS(model=model_dir, codec=codec_dir, device="cpu", engine_config=CONFIG)
    assert plugin.engine is None
    plugin.prewarm()
    await plugin._prewarm_task
    shared = moss_livekit.shared_engine(model_dir, codec_dir, device="cpu", config=CONFIG)
    assert plugin.engine is shared
    await plugin.aclose()


async def test_load_fnc_follows_open_conversations(tiny_dirs, fresh_registry) -> None:
    """Prevents: LiveKit dispatch sending rooms to a worker whose engine cannot admit another
    conversation (the default load function only measures CPU)."""
    model_dir, codec_dir = tiny_dirs
    engine = moss_livekit.shared_engine(model_dir, codec_dir, device="cpu", config=CONFIG)
    assert moss_livekit.load_fnc() == 0.0
    convs = [engine.conversation() for _ in range(CONFIG.max_conversations)]
    assert moss_livekit.load_fnc() == 1.0
    for conv in convs:
        await conv.aclose()


def test_an_engine_built_elsewhere_can_report_its_load(tiny_dirs, fresh_registry) -> None:
    """Prevents: a worker that builds its own Engine (custom dtype, device) being invisible to
    the load function."""
    from core import Engine

    model_dir, codec_dir = tiny_dirs
    engine = Engine.from_pretrained(model_dir, codec_dir, device="cpu", config=CONFIG)
    assert moss_livekit.register_engine(engine) is engine
    conv = engine.conversation()
    assert moss_livekit.load_fnc() == pytest.approx(1 / CONFIG.max_conversations)
    conv.close()


def test_plugin_is_registered_for_download_files() -> None:
    """Prevents: `python agent.py download-files` skipping the MOSS weights."""
    plugins = [p for p in Plugin.registered_plugins if isinstance(p, moss_livekit.MossPlugin)]
    assert len(plugins) == 1
    assert plugins[0].version == moss_livekit.__version__
