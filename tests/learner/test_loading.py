"""Meta-device init (trainer.meta_init): the senior built on meta, sharded, then filled from
safetensors one rank's rows at a time, must be the model from_pretrained loads — every
parameter, the tied head, the rotary buffers no checkpoint holds, and its log-probs."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tandem.config.compose import compose
from tandem.learner import loading
from tandem.learner.rank import Learner
from tandem.testkit import full_batch

WAIT = 300  # seconds for a spawned rank (imports torch and transformers, loads twice)
SEQUENCES = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [40, 3, 9, 27, 81, 243, 729, 100]]


def _from_pretrained(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="sdpa")


def _meta_loaded(model_dir):
    model = loading.build_on_meta(model_dir, "sdpa")
    loading.materialise(model, "cpu")
    loading.load_weights(model, model_dir)
    return model


def _assert_same_model(got, expected):
    """Same state dict, same non-persistent buffers, same ties, same logits: exactly."""
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    for name in expected_state:
        assert got_state[name].dtype == expected_state[name].dtype == torch.float32, name
        assert torch.equal(got_state[name], expected_state[name]), name
    got_buffers, expected_buffers = dict(got.named_buffers()), dict(expected.named_buffers())
    assert got_buffers.keys() == expected_buffers.keys()
    assert any("inv_freq" in name for name in expected_buffers)
    for name in expected_buffers:
        assert torch.equal(got_buffers[name], expected_buffers[name]), name
    # what export_hf writes beside the weights
    assert got.config.to_dict() == expected.config.to_dict()
    assert got.generation_config.to_dict() == expected.generation_config.to_dict()
    tied = expected.config.tie_word_embeddings
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied
    ids = torch.tensor(SEQUENCES[0])[None]  # [1, seq]
    with torch.no_grad():
        assert torch.equal(got.eval()(ids).logits, expected.eval()(ids).logits)


def _bf16(source, out):
    _from_pretrained(source).to(torch.bfloat16).save_pretrained(out)


def _bare_decoder(source, out):
    """A checkpoint saved from the decoder alone: no `model.` prefix, no head (tied)."""
    out.mkdir()
    state = load_file(source / "model.safetensors")
    save_file({name.removeprefix("model."): tensor for name, tensor in state.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(source / "config.json", out / "config.json")


def _sharded(source, out):
    _from_pretrained(source).save_pretrained(out, max_shard_size="400KB")
    assert (out / "model.safetensors.index.json").is_file()


def _untied_odd_vocab(source, out):
    """Its own head, and 1025 rows: FSDP2 shards them 513 + 512 over two ranks."""
    config = AutoConfig.from_pretrained(source)
    config.tie_word_embeddings, config.vocab_size = False, 1025
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


CHECKPOINTS = {"bf16": _bf16, "bare_decoder": _bare_decoder, "sharded": _sharded,
               "untied_odd_vocab": _untied_odd_vocab}


@pytest.mark.parametrize("kind", ["fp32", *CHECKPOINTS])
def test_meta_init_loads_what_from_pretrained_loads(tiny_model_dir, tmp_path, kind):
    model_dir = tiny_model_dir
    if kind in CHECKPOINTS:
        model_dir = tmp_path / kind
        CHECKPOINTS[kind](tiny_model_dir, model_dir)
    _assert_same_model(_meta_loaded(model_dir), _from_pretrained(model_dir))


def test_buffers_survive_materialising_uninitialised_memory(tiny_model_dir):
    """With deterministic algorithms on, torch fills uninitialised memory with NaN: a plain
    to_empty leaves the rotary buffers NaN, materialise keeps their computed values."""
    expected = dict(_from_pretrained(tiny_model_dir).named_buffers())
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        plain = loading.build_on_meta(tiny_model_dir, "sdpa")
        plain.to_empty(device="cpu")
        kept = loading.build_on_meta(tiny_model_dir, "sdpa")
        loading.materialise(kept, "cpu")
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.isnan(plain.model.rotary_emb.inv_freq).all()  # the poison works
    for name, buffer in kept.named_buffers():
        assert torch.equal(buffer, expected[name]), name


def test_checkpoints_it_cannot_read_are_refused_naming_the_switch(tiny_model_dir, tmp_path):
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    state = load_file(tiny_model_dir / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, lacking / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tiny_model_dir / "config.json", lacking / "config.json")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*trainer\.meta_init=false"):
        loading.build_on_meta(lacking, "sdpa")
    (lacking / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors only.*trainer.meta_init=false"):
        loading.build_on_meta(lacking, "sdpa")


# ------------------------------------------------------------------ whole learner ranks


def _config(model_dir, world_size: int, meta_init: bool):
    return compose([
        "model@model.senior=tiny", f"model.senior.path={model_dir}",
        "rollout.max_prompt_tokens=64", "rollout.max_response_tokens=64",
        "eval.max_response_tokens=64", "algorithm.group_size=2",
        "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2",
        "trainer.micro_batch_tokens=160", "optim.lr=1e-3",
        f"cluster.learner.world_size={world_size}", f"trainer.meta_init={str(meta_init).lower()}",
    ])


def _learner_view(model_dir, rank: int, world_size: int, port: int) -> dict:
    """Per init path: full state dict and buffers after loading, log-probs of SEQUENCES,
    whether the head is tied, and the full state dict after one train step."""
    views = {}
    for meta_init in (True, False):
        config = _config(model_dir, world_size, meta_init)
        learner = Learner(config, str(model_dir), rank, world_size, "127.0.0.1", port)
        model = learner.model
        view = {"state": learner.full_state_dict(),
                "buffers": {n: b.detach().cpu().clone() for n, b in model.named_buffers()},
                "logprobs": torch.tensor(sum(learner.score(SEQUENCES, [3, 2]), [])),
                "tied": model.lm_head.weight is model.model.embed_tokens.weight}
        learner.train_step(*full_batch(config, vocab=len(learner.tokenizer)))
        view["trained"] = learner.full_state_dict()
        views[meta_init] = view
    return views


def _assert_same_views(views: dict, tied: bool) -> None:
    meta, old = views[True], views[False]
    for key in ("state", "buffers", "trained"):
        assert meta[key].keys() == old[key].keys()
        for name in old[key]:
            assert torch.equal(meta[key][name], old[key][name]), (key, name)
    assert any("inv_freq" in name for name in meta["buffers"])
    torch.testing.assert_close(meta["logprobs"], old["logprobs"], atol=1e-6, rtol=0)
    assert meta["tied"] == old["tied"] == tied


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_learner_world_size_one_meta_init_equals_from_pretrained(tiny_model_dir):
    try:
        views = _learner_view(tiny_model_dir, 0, 1, _free_port())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _assert_same_views(views, tied=True)


def _rank(model_dirs, rank: int, world_size: int, port: int, out) -> None:
    views = [_learner_view(model_dir, rank, world_size, port) for model_dir in model_dirs]
    torch.save(views, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_learner_world_size_two_meta_init_equals_from_pretrained(tiny_model_dir, tmp_path):
    """Two gloo ranks, each with half of every tensor: the tied fp32 kit model, and a bf16
    checkpoint with its own head whose 1025 rows split unevenly."""
    odd = tmp_path / "untied_odd_vocab"
    _untied_odd_vocab(tiny_model_dir, odd)
    model_dirs, port = [tiny_model_dir, odd], _free_port()
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_rank, args=(model_dirs, rank, 2, port, tmp_path),
                             daemon=True) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=WAIT)
        if process.is_alive():
            process.kill()
    assert [p.exitcode for p in ranks] == [0, 0], "a rank failed: see its stderr above"
    views = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for tiny, untied in views:  # buffers, log-probs and ties on each rank
        _assert_same_views(tiny, tied=True)
        _assert_same_views(untied, tied=False)
    tiny, untied = views[0]  # the full state dicts come to rank 0 only
    assert len(tiny[True]["trained"]) == len(_from_pretrained(tiny_model_dir).state_dict())
    rows = json.loads((odd / "config.json").read_text())["vocab_size"]
    assert untied[True]["state"]["lm_head.weight"].shape[0] == rows == 1025
