"""Engine counters for `RolloutEngine.stats()`: a vLLM stat logger that keeps them instead of
printing them, and the CPU time of the EngineCore processes. Runs in the engine actor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psutil
from vllm.v1.metrics.loggers import StatLoggerBase


class EngineStats:
    """Counters that vLLM's stat loggers (`logger_factory`) update after every engine step."""

    def __init__(self) -> None:
        self.steps = 0
        self.running = 0
        self.max_running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.computed_tokens = 0
        self.busy_s = 0.0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.preemptions = 0

    def logger_factory(self, vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        """`stat_loggers` entry of `AsyncLLM.from_engine_args`."""
        return _Recorder(self)

    def as_dict(self) -> dict[str, float]:
        return {
            "engine/steps": self.steps,
            "engine/running": self.running,
            "engine/max_running": self.max_running,
            "engine/waiting": self.waiting,
            "engine/kv_cache_usage": self.kv_cache_usage,
            "engine/computed_tokens": self.computed_tokens,
            "engine/busy_s": self.busy_s,
            "engine/prompt_tokens": self.prompt_tokens,
            "engine/cached_prompt_tokens": self.cached_tokens,
            "engine/generated_tokens": self.generated_tokens,
            "engine/preemptions": self.preemptions,
        }


class _Recorder(StatLoggerBase):
    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        stats = self.stats
        if scheduler_stats is not None:
            stats.steps += 1
            stats.running = scheduler_stats.num_running_reqs
            stats.max_running = max(stats.max_running, stats.running)
            stats.waiting = scheduler_stats.num_waiting_reqs
            stats.kv_cache_usage = scheduler_stats.kv_cache_usage
            step = scheduler_stats.iteration_details
            if step is not None:
                stats.computed_tokens += step.num_ctx_tokens + step.num_generation_tokens
                stats.busy_s += step.elapsed_ms / 1000
        if iteration_stats is not None:
            # a request's first prefill only; streaming turns are not counted here
            prompt = iteration_stats.prompt_token_stats
            stats.prompt_tokens += prompt.total
            stats.cached_tokens += prompt.cached_tokens
            stats.generated_tokens += iteration_stats.num_generation_tokens
            # a running request's KV blocks taken back for another's: it is computed again
            stats.preemptions += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self) -> None:
        pass


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes and their live children."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for process in (root, *root.children(recursive=True)):
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total
