"""What the config checks read from a local model's `config.json`: its context length and the
KV-cache bytes one token takes. Budgets and cache sizes that a model cannot serve then fail at
compose time, naming the field, instead of minutes later inside vLLM.

Only local directories are read: a hub id or `kit:` / `pypi:` spec has no file before it is
resolved, so those get their context from the model preset (`conf/model/*.yaml`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tandem.config.checks import ConfigError, check, looks_local

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def read_config(model_dir: Path, field: str) -> dict[str, Any]:
    """The parsed config.json of a local model directory; `field` names the path setting."""
    config_file = model_dir / "config.json"
    check(config_file.is_file(),
          f"{field}={str(model_dir)!r} has no config.json; point it at a Hugging Face model "
          "directory (config.json + weights + tokenizer)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{field}: {config_file} is not readable JSON "
                          f"({type(error).__name__}); repair or re-download the model") from None
    check(isinstance(config, dict), f"{field}: {config_file} is not a JSON object")
    return config


def _text_section(config: dict[str, Any]) -> dict[str, Any]:
    # multimodal configs nest the language model's settings
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def context_length(config: dict[str, Any]) -> int | None:
    """`max_position_embeddings`, or None when the config does not say."""
    value = _text_section(config).get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stretches_context(config: dict[str, Any]) -> bool:
    """Whether RoPE scaling lets the model run past `max_position_embeddings` (vLLM then
    derives a longer limit), so that number is no upper bound on `max_context`."""
    return bool(_text_section(config).get("rope_scaling"))


def kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int | None:
    """Bytes one token's keys and values take in a vLLM cache of `dtype`, over all layers;
    None for architectures this formula does not describe (MLA, sliding-window or hybrid
    layers, missing fields): an overestimate there would refuse a cache vLLM accepts."""
    text = _text_section(config)
    if "kv_lora_rank" in text:  # multi-head latent attention caches a compressed vector
        return None
    windowed = text.get("sliding_window") and text.get("use_sliding_window", True) is not False
    if windowed or text.get("layer_types"):
        return None
    layers, heads, hidden = (text.get(k) for k in (
        "num_hidden_layers", "num_attention_heads", "hidden_size"))
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)):
        return None
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]  # keys and values


def checked_context(path: str, max_context: int | None, field: str) -> int | None:
    """The context of the local model at `path` (`field` = model.senior / model.junior):
    `max_context`, or when None its config's. A set value may not exceed the config's."""
    # A junior that names only its path inherits the senior's max_context; its own config.json
    # is what vLLM enforces, so a larger value fails here instead of at engine start.
    local = Path(path).expanduser()
    check(local.is_dir(),
          f"{field}.path={path!r} does not exist; point it at a Hugging Face "
          "model directory (config.json + weights + tokenizer)")
    config = read_config(local, f"{field}.path")
    own = context_length(config)
    if max_context is None:
        return own
    if own is not None and not stretches_context(config):
        check(max_context <= own,
              f"{field}.max_context={max_context} is more than the "
              f"max_position_embeddings={own} in {local / 'config.json'}; set "
              f"{field}.max_context=null (read it from there) or a value <= {own}")
    return max_context


def local_config(path: str) -> dict[str, Any] | None:
    """The config.json of a local model (None for hub ids, `kit:` and `pypi:` specs)."""
    if not looks_local(path):
        return None
    return read_config(Path(path).expanduser(), "model path")
