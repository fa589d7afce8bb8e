"""Build the senior without its weights, shard it, then read only this rank's shard from disk.

Why: `from_pretrained` on every learner rank holds the whole fp32 model in each process
before FSDP2 shards it, so a node with W ranks briefly holds W full fp32 copies (plus
transformers' own load buffers). Here, as torchtitan and verl initialise on the meta device:

1. `build_on_meta`: parameters are created on the meta device (no memory); buffers are built
   for real, so the non-persistent ones no checkpoint holds (rotary `inv_freq`) keep the
   values the model's `__init__` computes — accelerate's `init_empty_weights(include_buffers=
   False)`, which verl uses. The checkpoint's names and shapes are checked here, before any
   memory is spent.
2. the caller shards (`fully_shard`); `materialise` allocates only this rank's shard of each
   parameter (`to_empty`) and puts the buffers back, which `to_empty` leaves uninitialised.
3. `load_weights`: each rank reads only its own rows of each tensor from the safetensors
   files (`safe_open(...).get_slice`, one tensor at a time) and copies them into its shard,
   casting the checkpoint's dtype (bf16) to the fp32 master weights as `from_pretrained(dtype=
   float32)` does. No collective: every rank reads the model directory, as from_pretrained did.

Tied weights (lm_head = embed_tokens) are one parameter, loaded once under whichever of its
names the checkpoint holds. A checkpoint name may be the model's own or lack its base-model
prefix (`model.`, a checkpoint saved from the bare decoder). A checkpoint that needs
transformers' key conversions (fused MoE experts, legacy names) or holds no safetensors is
refused with a message naming `trainer.meta_init=false`, which loads with from_pretrained.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def build_on_meta(model_path: str | Path, attention: str) -> PreTrainedModel:
    """The causal LM of `model_path` with fp32 parameters on the meta device and real buffers;
    its checkpoint is checked to fill every parameter (`weight_plan` raises otherwise)."""
    config = AutoConfig.from_pretrained(model_path)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=attention)
    model.name_or_path = str(model_path)
    if model.can_generate():
        # export_hf writes it beside the weights: read it as from_pretrained does
        # (transformers' GenerationMixin.adjust_generation_fn)
        try:
            model.generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            model.generation_config = GenerationConfig.from_pretrained(
                model_path, config_file_name="config.json", _from_model_config=True)
    weight_plan(model, model_path)
    return model


def materialise(module: nn.Module, device: str | torch.device) -> None:
    """Allocate this rank's shard of every meta parameter on `device` (uninitialised: load
    them next), keeping every buffer's value and every tie, both of which `to_empty` loses."""
    meta = [name for name, buffer in module.named_buffers() if buffer.is_meta]
    if meta:
        raise ValueError(f"buffers on the meta device have no value to keep: {meta[:5]}")
    kept = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    module.to_empty(device=device)
    # A plain parameter comes back as a new object per module (a DTensor is swapped in place):
    # tie lm_head to embed_tokens again.
    for first, *others in names.values():
        param = module.get_parameter(first)
        for other in others:
            parent, _, leaf = other.rpartition(".")
            if module.get_parameter(other) is not param:
                setattr(module.get_submodule(parent), leaf, param)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(kept[name])


@torch.no_grad()
def load_weights(model: PreTrainedModel, model_path: str | Path) -> None:
    """Fill every parameter and persistent buffer of `model` (sharded or not, materialised)
    with this rank's part of the checkpoint's tensor, one tensor at a time."""
    state = model.state_dict(keep_vars=True)
    for target, source, file in weight_plan(model, model_path):
        tensor = state[target]
        # a fresh open per tensor: the file's mapped pages are released after each one
        with safe_open(file, framework="pt", device="cpu") as stored:
            if not isinstance(tensor, DTensor):
                tensor.copy_(stored.get_tensor(source))  # casts (bf16 -> fp32) and moves
                continue
            local, start = _local_rows(tensor, target)
            if local.numel() > 0:  # FSDP2 gives trailing ranks no rows of a short tensor
                local.copy_(stored.get_slice(source)[start:start + local.shape[0]])


def weight_plan(model: nn.Module, model_path: str | Path) -> list[tuple[str, str, Path]]:
    """(model name, checkpoint name, file) for each distinct parameter and persistent buffer
    (tied ones once). Raises ValueError naming what the checkpoint lacks or shapes apart."""
    stored = _stored_tensors(Path(model_path))
    prefix = getattr(model, "base_model_prefix", "")
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for name, tensor in state.items():
        names.setdefault(id(tensor), []).append(name)  # tied weights: one tensor, two names
    plan, missing = [], []
    for group in names.values():
        # the model's own name, else without the base-model prefix (a bare decoder's save)
        candidates = group + [n.removeprefix(f"{prefix}.") for n in group if prefix]
        source = next((c for c in candidates if c in stored), None)
        if source is None:
            missing.append(group[0])
            continue
        file, shape = stored[source]
        if shape != tuple(state[group[0]].shape):
            raise ValueError(f"{model_path}: {source} is {list(shape)} in the checkpoint, the "
                             f"model's {group[0]} is {list(state[group[0]].shape)}")
        plan.append((group[0], source, file))
    if missing:
        raise ValueError(
            f"{model_path}: the safetensors files hold no tensor for {len(missing)} of the "
            f"model's weights ({', '.join(missing[:5])}): the checkpoint needs transformers' "
            "own key conversions. Set trainer.meta_init=false to load it with from_pretrained")
    return plan


def _stored_tensors(model_path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Checkpoint tensor name -> (the safetensors file holding it, its shape); headers only."""
    if (model_path / _INDEX).is_file():
        weight_map = json.loads((model_path / _INDEX).read_text())["weight_map"]
        files = sorted({model_path / file for file in weight_map.values()})
    elif (model_path / _SINGLE).is_file():
        files = [model_path / _SINGLE]
    else:
        raise ValueError(f"{model_path} holds neither {_SINGLE} nor {_INDEX}: trainer.meta_init "
                         "reads safetensors only; convert the model or set "
                         "trainer.meta_init=false")
    stored = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as opened:
            for name in opened.keys():  # noqa: SIM118 (safe_open is no dict)
                stored[name] = (file, tuple(opened.get_slice(name).get_shape()))
    return stored


def _local_rows(tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """This rank's part of `tensor` and the first checkpoint row it holds."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"{name}: expected FSDP2's Shard(0) over one mesh dimension, got "
                         f"{tensor.placements} over {mesh.ndim}")
    # FSDP2 cuts dim 0 as torch.chunk does: ceil(rows / ranks) each, the last ones shorter
    per_rank = -(-tensor.shape[0] // mesh.size())
    return tensor.to_local(), mesh.get_local_rank() * per_rank


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside go to the meta device; buffers stay real. (accelerate's
    init_empty_weights(include_buffers=False)). A parameter's CPU tensor exists only until it
    is registered; `torch.empty` leaves its pages untouched, so it costs no memory."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is kept: tying re-registers
            meta = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)  # attributes transformers set on it
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
