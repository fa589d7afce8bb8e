"""Tandem rollout: senior and junior engines take turns writing each episode.

One asyncio task per episode. A task waits only for its own current segment; when the segment
comes back it decides who writes next (`Alternation`) and submits the next segment to that
writer's engine at once. There is no barrier across episodes: while episode A waits on the
junior engine, episode B's segment runs on the senior engine, and each engine batches whatever
segments are in flight. `generate` waits for every episode task — the end of the batch, which
the learner needs anyway — and nothing else.

Each episode keeps a streaming session open on both engines (`RolloutEngine.turn`), so a turn
prefills only the other writer's tokens since that engine's last turn; the sessions close when
the episode ends. Every engine call is bounded by `cluster.call_timeout_s`.

Turns reach engine actors over a `TurnChannel` (a ZMQ socket per engine), not as Ray calls: a Ray
call costs ~1 ms of CPU and 5-10 ms of latency on a busy machine, while a word-schedule turn of a
small model lasts a few engine steps. The channel carries all turns started in one loop iteration
in one message, and the engine answers all turns one step finished in one message.
`cluster.turn_channel=false` falls back to one Ray call per turn.

Junior of another family (a different tokenizer): the hand-off goes through text. Each engine
works in its own token space; a segment is decoded and the text encoded by the other
tokenizer, piece by piece, so no token ever spans a hand-off in either context. The Episode is
in the senior's token space: the senior's sampled ids as sampled (their log-probs stay exact),
the junior's text as senior ids with author 0 and log-prob 0 (it is never trained on).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tandem.alternation import Alternation, Boundaries, episode_rng, first_writers, tandem_metrics
from tandem.config.schema import TandemConfig
from tandem.engine.api import EngineSettings, Sampling
from tandem.engine.channel import ChannelTicket, TurnChannel, loopback_scope
from tandem.episode import JUNIOR, ROLE_NAMES, SENIOR, Episode

log = logging.getLogger("tandem")


class EngineLost(RuntimeError):
    """An engine replica died or stopped answering mid-rollout."""

    def __init__(self, role: int, replica: int, engine: Any, reason: str) -> None:
        super().__init__(f"the {ROLE_NAMES[role]} engine (replica {replica}) was lost: {reason}")
        self.role, self.replica, self.engine, self.reason = role, replica, engine, reason


@dataclass
class _Activity:
    """When each role had segments in flight: measures that both engines work at once.

    The driver's view: a call is in flight from its send to its reply, transport and the wait
    for the engine's next step included, so this over-states how busy the engines were (their
    own view: `rollout/*_engine_cpu_frac`, `rollout/generated_tokens_per_step`)."""

    started: float = field(default_factory=time.perf_counter)
    in_flight: dict[int, int] = field(default_factory=lambda: {SENIOR: 0, JUNIOR: 0})
    both_since: float | None = None
    both_s: float = 0.0
    requests: dict[int, int] = field(default_factory=lambda: {SENIOR: 0, JUNIOR: 0})
    wall: float = 0.0  # seconds from start to the last episode's end

    def change(self, role: int, delta: int) -> None:
        now = time.perf_counter()
        was_both = all(self.in_flight.values())
        self.in_flight[role] += delta
        if delta > 0:
            self.requests[role] += 1
        is_both = all(self.in_flight.values())
        if is_both and not was_both:
            self.both_since = now
        elif was_both and not is_both:
            self.both_s += now - self.both_since


class Rollout:
    """Builds Episodes for a batch of prompts with the senior and junior engines.

    `senior` / `junior` are lists of engine replicas: Ray actor handles of `RolloutEngine`
    (or the plain objects, for in-process use). Whole groups go to one replica of each role.
    `sampling` defaults to the config's rollout sampling (evaluation passes the eval one).
    `max_segments` ends an episode after that many segments (evaluation's round cap: a round
    is one turn of each writer); None = no cap.

    Engine faults: while a batch runs every engine is pinged each `cluster.heartbeat_s`. An
    engine that died or hangs (no answer within `cluster.heartbeat_timeout_s`) is handed to
    `recover(role, replica, reason)`, which must restart it in place (`senior[replica] = new`) or
    raise; the batch's unfinished episodes then run again from their start (their hand-offs
    and seeds are functions of (seed, step, index), so nothing but time is lost) and finished
    ones are kept. Without `recover` the fault raises `EngineLost`.
    """

    def __init__(self, config: TandemConfig, senior: list[Any], junior: list[Any],
                 senior_tokenizer: Any, junior_tokenizer: Any | None = None,
                 sampling: Sampling | None = None, max_segments: int | None = None,
                 recover: Callable[[int, int, str], None] | None = None) -> None:
        self.config = config
        self.max_segments = max_segments
        self.recover = recover
        self.senior, self.junior = senior, junior
        self.tokenizers = {SENIOR: senior_tokenizer, JUNIOR: junior_tokenizer or senior_tokenizer}
        self.cross_tokenizer = junior_tokenizer is not None
        if self.cross_tokenizer and config.algorithm.junior_kl_coef > 0:
            raise ValueError("algorithm.junior_kl_coef > 0 needs the junior's log-probs in the "
                             "senior's token space, which a junior with another tokenizer "
                             "cannot give; set algorithm.junior_kl_coef=0")
        self.boundaries = {SENIOR: Boundaries.from_tokenizer(senior_tokenizer)}
        self.boundaries[JUNIOR] = (Boundaries.from_tokenizer(junior_tokenizer)
                                   if self.cross_tokenizer else self.boundaries[SENIOR])
        rollout = config.rollout
        self.sampling = sampling or Sampling(temperature=rollout.temperature,
                                             top_p=rollout.top_p, top_k=rollout.top_k)
        self._tickets: dict[int, ChannelTicket] = {}  # id(engine actor) -> its channel
        self._dead: set[int] = set()  # id(caller) of an engine lost mid-attempt
        self._warned_kv = False

    def generate(self, prompts: list[list[int]], step: int,
                 junior_prompts: list[list[int]] | None = None, samples: int | None = None,
                 weight_version: int = 0, budgets: list[int] | None = None,
                 first_index: int = 0) -> tuple[list[Episode], dict[str, float]]:
        """`samples` (default `algorithm.group_size`) episodes per prompt (senior token ids; for
        a junior with another tokenizer also the same prompts in its ids). Returns episodes
        grouped by prompt. `weight_version`: the version the senior engines serve, recorded on
        episodes the senior wrote nothing of (the others carry their senior segments').
        `budgets`: each prompt's shared response budget (default `rollout.max_response_tokens`).
        `first_index`: the step's index of the first episode, which seeds its draws: a second
        batch of the same step (dynamic sampling) starts after the first one's episodes."""
        return asyncio.run(self.agenerate(prompts, step, junior_prompts, samples, weight_version,
                                          budgets, first_index))

    async def agenerate(self, prompts: list[list[int]], step: int,
                        junior_prompts: list[list[int]] | None = None,
                        samples: int | None = None, weight_version: int = 0,
                        budgets: list[int] | None = None, first_index: int = 0
                        ) -> tuple[list[Episode], dict[str, float]]:
        if self.cross_tokenizer and (junior_prompts is None
                                     or len(junior_prompts) != len(prompts)):
            raise ValueError("a junior with another tokenizer needs junior_prompts: the same "
                             "prompts in the junior's token ids")
        if budgets is None:
            budgets = [self.config.rollout.max_response_tokens] * len(prompts)
        if len(budgets) != len(prompts) or min(budgets, default=1) < 1:
            raise ValueError(f"budgets must hold one positive budget per prompt, got {budgets}")
        group_size = samples or self.config.algorithm.group_size
        jobs = {first_index + group * group_size + member: group
                for group in range(len(prompts)) for member in range(group_size)}
        firsts = first_writers(self.config.algorithm, self.config.seed, step, first_index,
                               len(prompts), group_size)  # empty unless balanced
        finished: dict[int, Episode] = {}
        started, restarts = time.perf_counter(), 0
        while True:
            lost, activity, spent = await self._attempt(
                {i: g for i, g in jobs.items() if i not in finished}, finished, prompts,
                junior_prompts, step, weight_version, budgets, firsts)
            if lost is None:
                break
            if self.recover is None:
                raise lost
            log.warning("step %d: %s; restarting it, then re-running the %d unfinished "
                        "episode(s) from their start", step, lost, len(jobs) - len(finished))
            self.recover(lost.role, lost.replica, lost.reason)
            restarts += 1
        episodes = [finished[index] for index in sorted(jobs)]
        wall = time.perf_counter() - started
        metrics = tandem_metrics(episodes)
        tokens = sum(len(e.response_ids) for e in episodes)
        metrics.update({
            "rollout/tokens_per_s": tokens / wall,
            "rollout/truncated_frac": sum(e.truncated for e in episodes) / len(episodes),
            "rollout/response_tokens_mean": tokens / len(episodes),
            "rollout/requests_per_episode": sum(activity.requests.values()) / len(episodes),
            "rollout/both_engines_busy_frac": activity.both_s / activity.wall,
            "time/rollout": wall,
            "faults/engine_restarts": float(restarts),
        })
        # engine counters: over the last attempt (a restarted engine counts from zero)
        wall = activity.wall
        for role, name in ROLE_NAMES.items():
            seconds = wall * len(self.senior if role == SENIOR else self.junior)
            metrics[f"rollout/{name}_engine_busy_frac"] = spent[role, "busy_s"] / seconds
            metrics[f"rollout/{name}_engine_cpu_frac"] = spent[role, "core_cpu_s"] / seconds
        # every engine once (a solo benchmark may list one engine under both roles)
        steps, computed, generated = (spent[None, key] for key in (
            "steps", "computed_tokens", "generated_tokens"))
        metrics["rollout/engine_cpu_frac"] = spent[None, "core_cpu_s"] / (
            wall * len({id(e) for e in (*self.senior, *self.junior)}))
        metrics["rollout/computed_per_generated_token"] = computed / max(generated, 1)
        metrics["rollout/generated_tokens_per_step"] = generated / max(steps, 1)
        metrics["rollout/kv_preemptions"] = spent[None, "preemptions"]
        if spent[None, "preemptions"] and not self._warned_kv:
            self._warned_kv = True
            log.warning(kv_pressure(self.config, step, int(spent[None, "preemptions"])))
        return episodes, metrics

    async def _attempt(self, jobs: dict[int, int], finished: dict[int, Episode],
                       prompts: list[list[int]], junior_prompts: list[list[int]] | None,
                       step: int, weight_version: int, budgets: list[int],
                       firsts: dict[int, int]) -> tuple[EngineLost | None, _Activity, dict]:
        """Run the episodes `jobs` (index -> group) into `finished` while the heartbeat
        watches every engine. Returns the engine lost (its episodes cancelled) or None, the
        attempt's activity and the engine counters it spent."""
        callers, channels = await self._connect()
        watched = {id(e): (role, replica, e)
                   for role, group in ((SENIOR, self.senior), (JUNIOR, self.junior))
                   for replica, e in enumerate(group)}
        lost: EngineLost | None = None
        try:
            before = await self._engine_counters()
            activity = _Activity()
            tasks = {}
            for index, group in jobs.items():
                engines = {SENIOR: callers[id(self.senior[group % len(self.senior)])],
                           JUNIOR: callers[id(self.junior[group % len(self.junior)])]}
                junior_prompt = junior_prompts[group] if self.cross_tokenizer else prompts[group]
                tasks[asyncio.create_task(self._episode(
                    prompts[group], junior_prompt, group, index, step, engines, activity,
                    weight_version, budgets[group], firsts.get(index)))] = index
            heartbeat = asyncio.create_task(self._heartbeat(watched))
            running = set(tasks)
            try:
                while running and lost is None:
                    done, _ = await asyncio.wait(running | {heartbeat},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if heartbeat in done:
                        lost = heartbeat.exception()
                        if not isinstance(lost, EngineLost):
                            raise lost
                        break
                    for task in done:
                        running.discard(task)
                        if task.exception() is None:
                            finished[tasks[task]] = task.result()
                        elif lost is None:  # an engine fault, or a bug: ask every engine
                            lost = await self._find_lost(watched)
                            if lost is None:
                                raise task.exception()
            finally:
                if lost is not None:  # cancelled episodes skip the lost engine's sessions
                    self._dead.add(id(callers[id(lost.engine)]))
                    self._tickets.pop(id(lost.engine), None)
                for task in (*running, heartbeat):
                    task.cancel()
                await asyncio.gather(*running, heartbeat, return_exceptions=True)
                self._dead.clear()
            activity.wall = time.perf_counter() - activity.started
        finally:
            for channel in channels:
                channel.close()
        if lost is not None:
            return lost, activity, {}
        after = await self._engine_counters()
        return None, activity, {key: after[key] - before[key] for key in after}

    async def _heartbeat(self, watched: dict[int, tuple[int, int, Any]]) -> None:
        """Ping every engine each `cluster.heartbeat_s`; raises `EngineLost` for the first one
        dead or silent for `cluster.heartbeat_timeout_s`."""
        while True:
            await asyncio.sleep(self.config.cluster.heartbeat_s)
            lost = await self._find_lost(watched)
            if lost is not None:
                raise lost

    async def _find_lost(self, watched: dict[int, tuple[int, int, Any]]) -> EngineLost | None:
        """The first engine that fails a ping, if any (all are pinged at once)."""
        timeout_s = self.config.cluster.heartbeat_timeout_s
        answers = await asyncio.gather(
            *(call_engine(engine, "ping", timeout_s=timeout_s)
              for _, _, engine in watched.values()), return_exceptions=True)
        for (role, replica, engine), answer in zip(watched.values(), answers, strict=True):
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            if isinstance(answer, BaseException):
                cause = getattr(answer, "cause", None)  # the engine's own error, not Ray's
                answer = cause if isinstance(cause, BaseException) else answer
                reason = ("no heartbeat within cluster.heartbeat_timeout_s="
                          f"{timeout_s} s" if isinstance(answer, TimeoutError)
                          else f"{type(answer).__name__}: {answer}".split("\n")[0])
                return EngineLost(role, replica, engine, reason)
        return None

    async def _episode(self, prompt: list[int], junior_prompt: list[int], group: int,
                       index: int, step: int, engines: dict[int, Any],
                       activity: _Activity, weight_version: int, budget: int,
                       first: int | None) -> Episode:
        alternation = Alternation(
            self.config.algorithm, episode_rng(self.config.seed, step, index),
            self.boundaries[SENIOR], self.boundaries[JUNIOR] if self.cross_tokenizer else None,
            first)
        # Each engine's context in its own token space, and how much of it that engine's
        # session has already seen.
        context = {SENIOR: list(prompt), JUNIOR: list(junior_prompt)}
        sent = {SENIOR: 0, JUNIOR: 0}
        response: list[int] = []
        authors: list[int] = []
        logprobs: list[float] = []
        starts: list[int] = []
        written = 0  # budget used, counted in each writer's own tokens
        segments = 1
        finish, version = "length", weight_version
        # one session per role: in solo benchmarks one engine may serve both roles. The random
        # part keeps another client from naming (closing, extending) an episode's session.
        tag = secrets.token_hex(8)
        sessions = {role: f"{step}-{index}-{name}-{tag}" for role, name in ROLE_NAMES.items()}
        # reproducible sampling: one seeded request per segment, seeds drawn apart from hand-offs
        seeds = random.Random(f"tandem/sampling/{self.config.seed}/{step}/{index}")
        seeded = self.config.rollout.reproducible_sampling
        try:
            while written < budget:
                writer = alternation.writer
                stop = alternation.stop_rule(budget - written)
                new_ids = context[writer][sent[writer]:]
                activity.change(writer, +1)
                try:
                    if seeded:
                        sampling = replace(self.sampling, seed=seeds.getrandbits(62))
                        segment = await self._call(engines[writer], "generate", context[writer],
                                                   stop, sampling)
                    else:
                        segment = await self._call(engines[writer], "turn", sessions[writer],
                                                   new_ids, stop, self.sampling)
                finally:
                    activity.change(writer, -1)
                turn = alternation.advance(segment.token_ids)
                kept = segment.token_ids[:turn.kept]
                if turn.kept < len(segment.token_ids) and not seeded:
                    # The engine's session holds tokens we drop: restart it from our context.
                    await self._call(engines[writer], "close_session", sessions[writer])
                    sent[writer] = 0
                else:
                    sent[writer] = len(context[writer]) + len(kept)
                if writer == SENIOR:
                    version = segment.weight_version
                self._append(writer, kept, segment.logprobs[:turn.kept], context, response,
                             authors, logprobs, starts)
                written += len(kept)
                if segment.finish_reason == "eos" and turn.kept == len(segment.token_ids):
                    finish = "eos"
                    break
                if segment.finish_reason == "abort":
                    raise RuntimeError(f"engine aborted episode {index} at step {step}")
                if not kept and not turn.handoff and segment.finish_reason == "length":
                    break  # the model's context is full
                if turn.handoff:
                    if segments == self.max_segments:
                        finish = "rounds"
                        break
                    segments += 1
        finally:
            if not seeded:
                await self._close_sessions(engines, sessions)
        text = self.tokenizers[SENIOR].decode(response, skip_special_tokens=True)
        return Episode(prompt_ids=list(prompt), response_ids=response, author_mask=authors,
                       logprobs=logprobs, group=group, weight_version=version,
                       segment_starts=starts, finish_reason=finish, response_text=text)

    async def _close_sessions(self, engines: dict[int, Any], sessions: dict[int, str]) -> None:
        """End an episode's sessions on both engines. A cancelled episode (an engine was lost)
        skips the lost engine, waits at most `cluster.heartbeat_timeout_s` and raises nothing:
        the batch is being recovered."""
        if not asyncio.current_task().cancelling():
            await asyncio.gather(*(self._call(engines[role], "close_session", sessions[role])
                                   for role in (SENIOR, JUNIOR)))
            return
        await asyncio.gather(*(call_engine(engines[role], "close_session", sessions[role],
                                           timeout_s=self.config.cluster.heartbeat_timeout_s)
                               for role in (SENIOR, JUNIOR)
                               if id(engines[role]) not in self._dead),
                             return_exceptions=True)

    def _append(self, writer: int, ids: list[int], values: list[float],
                context: dict[int, list[int]], response: list[int], authors: list[int],
                logprobs: list[float], starts: list[int]) -> None:
        """Add a writer's kept tokens to both contexts and to the episode (senior ids)."""
        if not ids:
            return
        other = JUNIOR if writer == SENIOR else SENIOR
        context[writer] += ids
        if self.cross_tokenizer:
            text = self.tokenizers[writer].decode(ids)
            context[other] += self.tokenizers[other].encode(text, add_special_tokens=False)
        else:
            context[other] += ids
        senior_ids = ids if writer == SENIOR or not self.cross_tokenizer else (
            self.tokenizers[SENIOR].encode(self.tokenizers[JUNIOR].decode(ids),
                                           add_special_tokens=False))
        senior_values = values if writer == SENIOR or not self.cross_tokenizer else (
            [0.0] * len(senior_ids))
        if not authors or authors[-1] != writer:
            starts.append(len(response))
        response += senior_ids
        authors += [writer] * len(senior_ids)
        logprobs += senior_values

    async def _connect(self) -> tuple[dict[int, Any], list[Any]]:
        """What each engine's turns go through, by id(engine): a new `TurnChannel` for a Ray
        actor (its ticket asked once per engine) if `cluster.turn_channel`, else the engine
        itself (Ray calls, or direct calls for a plain object); and the new channels, to close
        when the batch is done."""
        callers: dict[int, Any] = {}
        channels = []
        for engine in (*self.senior, *self.junior):
            if id(engine) in callers:
                continue
            if not self.config.cluster.turn_channel or not hasattr(engine.turn, "remote"):
                callers[id(engine)] = engine
                continue
            if id(engine) not in self._tickets:
                self._tickets[id(engine)] = await self._call(engine, "open_channel",
                                                             loopback_scope())
            callers[id(engine)] = TurnChannel(self._tickets[id(engine)])
            channels.append(callers[id(engine)])
        return callers, channels

    async def _call(self, engine: Any, method: str, *args: Any) -> Any:
        return await call_engine(engine, method, *args,
                                 timeout_s=self.config.cluster.call_timeout_s)

    async def _engine_counters(self) -> dict[tuple[int | None, str], float]:
        """Engine counters summed by (role, name), and by (None, name) over distinct engines."""
        engines = {id(e): e for e in (*self.senior, *self.junior)}
        stats = dict(zip(engines, await asyncio.gather(
            *(self._call(e, "stats") for e in engines.values())), strict=True))
        names = ("busy_s", "core_cpu_s", "steps", "computed_tokens", "generated_tokens",
                 "preemptions")
        totals = {}
        for role, group in ((SENIOR, self.senior), (JUNIOR, self.junior), (None, engines.values())):
            for name in names:
                totals[role, name] = sum(stats[id(e)][f"engine/{name}"] for e in group)
        return totals


def kv_pressure(config: TandemConfig, step: int, preemptions: int) -> str:
    """The one line for a rollout whose engines ran out of KV cache: vLLM preempts a running
    request and later computes it again, so the step is slower, never wrong or failed."""
    cluster = config.cluster
    room = (f"cluster.cpu_kvcache_gib={cluster.cpu_kvcache_gib:g}" if cluster.device == "cpu"
            else f"cluster.gpu_memory_utilization={cluster.gpu_memory_utilization:g}")
    return (f"step {step}: the engines' KV cache ran out {preemptions} time(s) (vLLM preempted "
            f"running requests and computes them again: slower, not wrong); raise {room}, or "
            f"put fewer tokens in flight: rollout.max_response_tokens="
            f"{config.rollout.max_response_tokens}, trainer.prompts_per_step="
            f"{config.trainer.prompts_per_step} x algorithm.group_size="
            f"{config.algorithm.group_size} episodes, or more engine replicas (cluster.*.replicas)"
            "; rollout/kv_preemptions counts them every step")


async def call_engine(engine: Any, method: str, *args: Any, timeout_s: float) -> Any:
    """A bounded call to an engine: a Ray actor handle, a TurnChannel or a RolloutEngine."""
    bound = getattr(engine, method)
    pending = bound.remote(*args) if hasattr(bound, "remote") else bound(*args)
    try:
        async with asyncio.timeout(timeout_s):  # no extra Task per call, unlike wait_for
            return await pending
    except TimeoutError:
        raise TimeoutError(f"engine call {method} took longer than cluster.call_timeout_s="
                           f"{timeout_s} s") from None


def engine_settings(config: TandemConfig, model_dir: str, role: str, boundaries: Boundaries,
                    first_core: int = 0) -> list[EngineSettings]:
    """One EngineSettings per replica of `role`, from the config schema.

    On CPU each replica is pinned to its own `cluster.<role>.cpus` cores, counted from
    `first_core` (wrapping around the machine): two engines sharing cores run 3-4x slower.
    """
    cluster = config.cluster
    resources = getattr(cluster, role)
    spec = getattr(config.model, role)
    cores = os.cpu_count() or 1
    max_len = config.engine_context  # the config checks fit it to each model and cache
    group_size = config.algorithm.group_size
    settings = []
    for replica in range(resources.replicas):
        pinned = None
        if cluster.device == "cpu":
            start = (first_core + replica * resources.cpus) % cores
            end = min(start + resources.cpus, cores) - 1
            pinned = f"{start}-{end}" if end > start else str(start)
        settings.append(EngineSettings(
            model=model_dir, dtype=spec.dtype, max_model_len=max_len,
            seed=config.seed + replica, enable_prefix_caching=config.rollout.enable_prefix_caching,
            device=cluster.device, tensor_parallel_size=resources.tensor_parallel_size,
            gpu_memory_utilization=cluster.gpu_memory_utilization,
            cpu_kvcache_gib=cluster.cpu_kvcache_gib, cpu_cores=pinned,
            enforce_eager=cluster.enforce_eager,
            max_num_seqs=max(256, config.trainer.prompts_per_step * group_size + 1),
            enable_chunked_prefill=not config.rollout.reproducible_sampling,
            token_sets=boundaries.token_sets(),
        ))
    return settings
