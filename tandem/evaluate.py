"""`python -m tandem.evaluate`: the paper's measurements on senior checkpoints, side by side.

For each checkpoint in `eval.checkpoints` (an HF directory or model spec, a run's
`checkpoints/step_N`, or a run directory: its last complete checkpoint), against the junior
`model.junior` (default: `model.senior`, the paper's self-pairing), on each benchmark in
`eval.benchmarks`:

1. generation protocols (tandem/protocols.py): solo, hand-off senior first and junior first,
   word hand-off, the dose curve; `eval.n` graded samples per problem each; unbiased pass@k
   for every k in `eval.pass_k` with a 95% bootstrap interval over problems;
2. legibility and drift from the engines' teacher-forced log-probs on the solo chains;
3. macro averages over benchmarks (tandem/estimators.py); all in `<run dir>/eval.json`.

The engines are the training ones (`tandem.runtime.engines`, the segment-stop scheduler), one
senior and one junior per replica; the senior engines restart for each checkpoint, the junior's
stay. Within a batch of problems every protocol runs at once, so both engines stay busy.

Resumable: every finished batch of a protocol is appended to a JSONL file under
`<run dir>/cache/<checkpoint>-<fingerprint>/<benchmark>-<hash>/`, keyed by problem; run the same
command with the same `hydra.run.dir` and finished items are read back, not generated again.
The fingerprint covers everything that changes a generation (models, sampling, budgets, seed),
so a changed setting starts a fresh cache. Progress: one bar over problems x protocols, with ETA.

Training's validation (`Validation`, called by tandem/driver.py) runs the same `generate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from tandem.config.compose import CONF_DIR, config_for_app, user_errors
from tandem.config.schema import TandemConfig
from tandem.data import Problem
from tandem.estimators import (
    bootstrap_ci,
    macro_average,
    macro_bootstrap_ci,
    mean_pass_at_k,
    pass_at_k_summary,
    per_problem_pass_at_k,
)
from tandem.output.eval_report import write_report
from tandem.protocols import (  # noqa: F401  (protocol_config: also imported from here)
    PromptSet,
    Team,
    generate,
    generation_protocols,
    protocol_config,
    score_chains,
)
from tandem.reward import RewardPool

log = logging.getLogger("tandem")

VAL_STEP_OFFSET = 1_000_000
"""Validation rollouts use step numbers past any training step (one offset per protocol, as
they run at once), so their episode seeds and engine session ids never collide."""
SCORES = "scores"
"""The cache file of legibility and drift records."""


# ----------------------------------------------------------------------------- the cache


class GenerationCache:
    """Finished records of one checkpoint on one benchmark, one JSONL file per protocol, keyed
    by problem uid. A file cut short by a kill ends in a partial line: reading drops it, and the
    next append starts on a fresh line."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _file(self, protocol: str) -> Path:
        return self.directory / f"{protocol.replace('/', '_')}.jsonl"

    def load(self, protocol: str) -> dict[str, dict[str, Any]]:
        path = self._file(protocol)
        if not path.is_file():
            return {}
        records, good = {}, 0
        with path.open("rb") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # the partial line of a killed write, and nothing after it
                records[record["uid"]] = record
                good += len(line)
        if good < path.stat().st_size:
            with path.open("r+b") as out:
                out.truncate(good)
        return records

    def append(self, protocol: str, records: list[dict[str, Any]]) -> None:
        with self._file(protocol).open("a") as out:
            out.write("".join(json.dumps(r) + "\n" for r in records))
            out.flush()


def fingerprint(config: TandemConfig, senior_dir: str, junior_dir: str) -> str:
    """A short hash of everything that changes a generation or a score."""
    settings = {"senior": senior_dir, "junior": junior_dir, "seed": config.seed,
                "eval": {k: v for k, v in dataclasses.asdict(config.eval).items()
                         if k not in ("checkpoints", "start_senior", "benchmarks", "problems",
                                      "protocols", "batch_problems", "pass_k", "dose_p")
                         and not k.startswith("val")},
                "answer_from": config.reward.answer_from,
                # only when set: caches written before the option existed stay valid
                **({"boxes": config.reward.boxes} if config.reward.boxes != "last" else {}),
                "prompt": config.rollout.max_prompt_tokens,
                "dtypes": [config.model.senior.dtype, config.model.junior.dtype]}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- summaries


def protocol_summary(records: list[dict[str, Any]], n: int, pass_k: list[int]
                     ) -> dict[str, Any]:
    """pass@k with intervals, per-problem correct counts, and what the episodes looked like."""
    correct = [r["correct"] for r in records]
    samples = [s for r in records for s in r["samples"]]
    summary: dict[str, Any] = pass_at_k_summary(correct, n, pass_k)
    summary.update({
        "correct": correct,
        "response_tokens": sum(s["tokens"] for s in samples) / len(samples),
        "senior_token_frac": sum(s["senior_frac"] * s["tokens"] for s in samples)
        / max(sum(s["tokens"] for s in samples), 1),
        "truncated_frac": sum(s["finish"] == "length" for s in samples) / len(samples),
        "round_capped_frac": sum(s["finish"] == "rounds" for s in samples) / len(samples),
    })
    return summary


def _chain_mean(records: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Mean over all chains of a per-chain score, its interval over problems (each problem
    weighted by its chains, so the interval is of that same mean), per-problem means."""
    scored = [r for r in records if r.get(key)]
    if not scored:
        return None
    per_problem = [sum(r[key]) / len(r[key]) for r in scored]
    chains = [len(r[key]) for r in scored]
    return {key: sum(sum(r[key]) for r in scored) / sum(chains),
            f"{key}_ci": list(bootstrap_ci(per_problem, chains)),
            "per_problem": per_problem, "chains_per_problem": chains}


def score_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The `legibility` and `drift` blocks of a benchmark (whichever were scored)."""
    blocks = {}
    legibility = _chain_mean(records, "junior_ce")
    if legibility is not None:
        legibility["tokens"] = sum(sum(r["tokens"]) for r in records)
        blocks["legibility"] = legibility
    drift = _chain_mean(records, "logprob_gap")
    if drift is not None:
        blocks["drift"] = drift
    return blocks


def macro_summary(benchmarks: dict[str, dict[str, Any]], pass_k: list[int]) -> dict[str, Any]:
    """Macro averages over benchmarks, with intervals that resample problems within each."""
    macro: dict[str, Any] = {}
    names = sorted({key for block in benchmarks.values() for key in block
                    if isinstance(block[key], dict) and "correct" in block[key]})
    doses = sorted({p for block in benchmarks.values() for p in block.get("dose", {})})
    sections = [(name, lambda b, name=name: b.get(name)) for name in names]
    sections += [(f"dose/{p}", lambda b, p=p: b.get("dose", {}).get(p)) for p in doses]
    for label, pick in sections:
        blocks = {bench: pick(b) for bench, b in benchmarks.items() if pick(b)}
        for k in pass_k:
            key = f"pass@{k}"
            if not blocks or key not in next(iter(blocks.values())):
                continue
            macro[f"{label}/{key}"] = macro_average({b: v[key] for b, v in blocks.items()})
            macro[f"{label}/{key}_ci"] = list(macro_bootstrap_ci({
                b: per_problem_pass_at_k(v["correct"], benchmarks[b]["n"], k)
                for b, v in blocks.items()}))
    for section, key in (("legibility", "junior_ce"), ("drift", "logprob_gap")):
        blocks = {b: v[section] for b, v in benchmarks.items() if section in v}
        if blocks:
            macro[f"{section}/{key}"] = macro_average({b: v[key] for b, v in blocks.items()})
            macro[f"{section}/{key}_ci"] = list(macro_bootstrap_ci(
                {b: v["per_problem"] for b, v in blocks.items()},
                {b: v["chains_per_problem"] for b, v in blocks.items()}))
    return macro


# ----------------------------------------------------------------------------- one checkpoint


def _step(*parts: str) -> int:
    """A stable step number for the episode seeds and session ids of one batch."""
    return zlib.crc32("/".join(parts).encode())


async def evaluate_benchmark(team: Team, prompts: PromptSet, name: str, cache: GenerationCache,
                             rewards: RewardPool, progress: tqdm) -> dict[str, Any]:
    """Every protocol of `eval.protocols` on one benchmark: its eval.json block.

    Per batch of `eval.batch_problems` problems, every generation protocol runs at once; then
    the solo chains are scored. Cached records are read back, and each batch is saved as it
    ends."""
    config = team.config
    protocols = generation_protocols(config)
    scoring = {"legibility", "drift"} & set(config.eval.protocols)
    records = {protocol: cache.load(protocol) for protocol in protocols}
    # a record scored without drift is scored again when drift is asked for
    scores = {uid: r for uid, r in cache.load(SCORES).items()
              if "drift" not in scoring or "logprob_gap" in r}
    uids = [p.uid for p in prompts.problems]
    block: dict[str, Any] = {"problems": len(uids), "n": config.eval.n}
    if not uids:
        return block
    progress.update(sum(uid in records[p] for p in protocols for uid in uids)
                    + (sum(uid in scores for uid in uids) if scoring else 0))

    async def run(protocol: str, batch: list[int], start: int) -> None:
        todo = [i for i in batch if uids[i] not in records[protocol]]
        if not todo:
            return
        done, _ = await generate(team, protocol, prompts.select(todo), rewards,
                                 _step(name, protocol, str(start)), config.eval.n)
        cache.append(protocol, done)
        records[protocol].update((r["uid"], r) for r in done)
        progress.update(len(todo))

    size = config.eval.batch_problems
    for start in range(0, len(uids), size):
        batch = list(range(start, min(start + size, len(uids))))
        await asyncio.gather(*(run(protocol, batch, start) for protocol in protocols))
        todo = [i for i in batch if uids[i] not in scores] if scoring else []
        if todo:
            done = await score_chains(team, prompts.select(todo),
                                      [records["solo"][uids[i]] for i in todo],
                                      drift="drift" in scoring)
            cache.append(SCORES, done)
            scores.update((r["uid"], r) for r in done)
            progress.update(len(todo))

    for protocol in protocols:
        summary = protocol_summary([records[protocol][uid] for uid in uids], config.eval.n,
                                   config.eval.pass_k)
        if protocol.startswith("dose/"):
            block.setdefault("dose", {})[protocol.removeprefix("dose/")] = summary
        else:
            block[protocol] = summary
    if scoring:
        block.update(score_summary([scores[uid] for uid in uids]))
    return block


# ----------------------------------------------------------------------------- validation


class Validation:
    """Training's validation: solo (and, with `eval.val_handoff`, the senior-first hand-off) on
    the held-out problems, `eval.val_samples` each, through the evaluation's `generate`."""

    def __init__(self, config: TandemConfig, senior: list[Any], junior: list[Any],
                 senior_tokenizer: Any, junior_tokenizer: Any | None, problems: list[Problem],
                 instruction: str, rewards: RewardPool) -> None:
        self.team = Team(config, senior, junior, senior_tokenizer, junior_tokenizer)
        self.prompts, dropped = self.team.prompts(problems, instruction)
        if dropped:
            log.warning("validation: %d problems leave no response budget: %s", len(dropped),
                        ", ".join(dropped[:8]))
        self.protocols = ["solo"] + (["handoff"] if config.eval.val_handoff else [])
        self.rewards = rewards

    def run(self, step: int, weight_version: int) -> dict[str, float]:
        """`val/<protocol>_accuracy` (mean reward) with its 95% bootstrap interval over problems
        (`_accuracy_lo`, `_accuracy_hi`), `val/<protocol>_pass@k` for 1 < k <= val_samples,
        response lengths, the hand-off's senior share and `time/val`.
        `weight_version`: the version the senior engines serve now."""
        started = time.perf_counter()
        samples = self.team.config.eval.val_samples

        async def both() -> list[tuple[list[dict[str, Any]], dict[str, float]]]:
            return await asyncio.gather(*(
                generate(self.team, protocol, self.prompts, self.rewards,
                         VAL_STEP_OFFSET * (index + 1) + step, samples, weight_version)
                for index, protocol in enumerate(self.protocols)))

        metrics: dict[str, float] = {}
        for protocol, (records, stats) in zip(self.protocols, asyncio.run(both()), strict=True):
            correct = [r["correct"] for r in records]
            metrics[f"val/{protocol}_accuracy"] = sum(correct) / (samples * len(correct))
            low, high = bootstrap_ci([c / samples for c in correct], seed=step)
            metrics[f"val/{protocol}_accuracy_lo"] = low
            metrics[f"val/{protocol}_accuracy_hi"] = high
            for k in self.team.config.eval.pass_k:
                if 1 < k <= samples:
                    metrics[f"val/{protocol}_pass@{k}"] = mean_pass_at_k(correct, samples, k)
            metrics[f"val/{protocol}_response_tokens"] = stats["rollout/response_tokens_mean"]
            if protocol == "handoff":
                metrics["val/handoff_senior_token_frac"] = stats["tandem/senior_token_frac"]
        metrics["time/val"] = time.perf_counter() - started
        return metrics


# ----------------------------------------------------------------------------- the app


def evaluate(config: TandemConfig, run_dir: str | Path) -> dict[str, Any]:
    """Evaluate every checkpoint; writes and returns the contents of `<run dir>/eval.json`."""
    # why here: a config error, an unknown benchmark or an unreachable dataset id fails
    # before vLLM and Ray load
    from tandem.benchmarks import load_benchmarks

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = _now()
    benchmarks = load_benchmarks(config)
    from tandem import eval_models, models
    from tandem.runtime.cluster import connect

    checkpoints = eval_models.resolve_checkpoints(config, run_dir)
    junior_dir = str(models.resolve_model(config.model.junior.path))
    junior_tokenizer = models.load_tokenizer(junior_dir)
    units = len(generation_protocols(config)) + bool({"legibility", "drift"}
                                                      & set(config.eval.protocols))
    total = len(checkpoints) * sum(len(b.problems) for b in benchmarks) * units
    log.info("eval: %d checkpoint(s) x %s against junior %s: %d problems x protocols",
             len(checkpoints), ", ".join(f"{b.name} ({len(b.problems)})" for b in benchmarks),
             junior_dir, total)
    result: dict[str, Any] = {"config": OmegaConf.to_container(OmegaConf.structured(config)),
                              "junior": junior_dir, "started": started, "checkpoints": []}
    with contextlib.ExitStack() as cleanup:
        rewards = cleanup.enter_context(RewardPool.from_config(config.reward))
        log.info(cleanup.enter_context(connect(config)))
        # the junior and the first senior load side by side (each on its own cores / GPUs)
        junior = eval_models.launch_engines_for(config, junior_dir, "junior", junior_tokenizer)
        cleanup.callback(eval_models.stop_engines, junior)
        first = eval_models.launch_engines_for(config, checkpoints[0].model_dir, "senior",
                                               models.load_tokenizer(checkpoints[0].model_dir))
        eval_models.ready(junior, junior_dir, config)
        log.info("eval: junior engine(s) of %s ready", junior_dir)
        progress = cleanup.enter_context(tqdm(total=total, unit="problem", dynamic_ncols=True,
                                              desc="eval", file=sys.stderr, mininterval=2.0))
        for index, checkpoint in enumerate(checkpoints):
            senior_tokenizer = models.load_tokenizer(checkpoint.model_dir)
            cross = senior_tokenizer.get_vocab() != junior_tokenizer.get_vocab()
            senior = first if index == 0 else eval_models.launch_engines_for(
                config, checkpoint.model_dir, "senior", senior_tokenizer)
            try:
                eval_models.ready(senior, checkpoint.model_dir, config)
                log.info("eval: senior engine(s) of %s ready", checkpoint.name)
                team = Team(config, senior, junior, senior_tokenizer,
                            junior_tokenizer if cross else None)
                key = f"{checkpoint.key}-{fingerprint(config, checkpoint.model_dir, junior_dir)}"
                entry = {"name": checkpoint.name, "path": checkpoint.model_dir,
                         "source": checkpoint.source, "step": checkpoint.step,
                         "start": checkpoint.is_start, "benchmarks": {}}
                for benchmark in benchmarks:
                    progress.set_description(f"eval {checkpoint.name} {benchmark.name}")
                    prompts, dropped = team.prompts(benchmark.problems, benchmark.instruction)
                    progress.update(len(dropped) * units)
                    if dropped:
                        log.warning("eval: %s: %d problems leave no response budget (%s...)",
                                    benchmark.name, len(dropped), ", ".join(dropped[:4]))
                    cache = GenerationCache(run_dir / "cache" / key / _cache_name(benchmark))
                    entry["benchmarks"][benchmark.name] = asyncio.run(evaluate_benchmark(
                        team, prompts, benchmark.name, cache, rewards, progress))
                    entry["benchmarks"][benchmark.name]["dropped"] = len(dropped)
            finally:
                eval_models.stop_engines(senior)
            entry["macro"] = macro_summary(entry["benchmarks"], config.eval.pass_k)
            result["checkpoints"].append(entry)
            write_json(run_dir / "eval.json", result)
    _add_start_gaps(result, checkpoints)
    result["finished"] = _now()
    write_json(run_dir / "eval.json", result)
    log.info("eval: wrote %s and %s", run_dir / "eval.json", write_report([result], run_dir))
    return result


def _add_start_gaps(result: dict[str, Any], checkpoints: list[Any]) -> None:
    """drift.start_logprob_gap: the starting senior's own gap, next to each checkpoint's."""
    start = next((e for e, c in zip(result["checkpoints"], checkpoints, strict=True)
                  if c.is_start), None)
    if start is None:
        return
    for entry in result["checkpoints"]:
        for name, block in entry["benchmarks"].items():
            gap = start["benchmarks"].get(name, {}).get("drift", {}).get("logprob_gap")
            if "drift" in block and gap is not None:
                block["drift"]["start_logprob_gap"] = gap
        if "drift/logprob_gap" in start["macro"]:
            entry["macro"]["drift/start_logprob_gap"] = start["macro"]["drift/logprob_gap"]


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write through a temporary file, so a kill never leaves half an eval.json."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(path)


def _cache_name(benchmark: Any) -> str:
    """A benchmark's cache directory: its name and a hash of its source and instruction (the
    uids name rows of one source; the instruction changes every prompt)."""
    digest = hashlib.sha1(f"{benchmark.source}\n{benchmark.instruction}".encode()).hexdigest()
    return f"{benchmark.name}-{digest[:6]}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    config, run_dir = config_for_app(cfg)
    with user_errors():  # a benchmark, model or checkpoint it cannot use: one line, exit 2
        result = evaluate(config, run_dir)
    for entry in result["checkpoints"]:
        shown = {k: round(v, 4) for k, v in entry["macro"].items() if not k.endswith("_ci")}
        print(f"{entry['name']}: {shown}")


if __name__ == "__main__":
    main()
