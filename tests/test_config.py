"""The config schema: presets compose to the values users rely on; bad values fail early."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from tandem.config import cpu
from tandem.config.checks import ConfigError
from tandem.config.cluster import check_devices
from tandem.config.compose import CONF_DIR, compose, short_dirname, visible_gpus

REPO = Path(__file__).resolve().parent.parent


def test_paper_trl_carries_the_papers_hyper_parameters():
    config = compose(["experiment=paper_trl"])
    assert config.model.senior.path == "Qwen/Qwen3-4B-Instruct-2507"
    assert config.model.self_paired
    assert config.data.name == "deepscaler" and config.data.holdout_size == 1000
    algorithm = config.algorithm
    assert (algorithm.name, algorithm.schedule, algorithm.first_writer) == (
        "tandem", "word", "random")
    assert algorithm.handoff_p == 0.5 and algorithm.max_gap_tokens == 32
    assert algorithm.group_size == 8 and algorithm.clip_ratio == 0.2
    assert algorithm.kl_coef == 0.0 and algorithm.entropy_coef == 0.0
    assert algorithm.junior_token_weight == 0.0 and algorithm.junior_kl_coef == 0.0
    assert algorithm.dual_clip_c == 3.0 and algorithm.word_boundaries == "paper"
    assert config.data.holdout_seed == 0 and config.eval.val_problems is None
    assert config.optim.lr == 1e-6
    assert config.rollout.temperature == 0.6
    assert (config.rollout.max_prompt_tokens, config.rollout.max_response_tokens) == (1024, 3000)
    assert (config.trainer.prompts_per_step, config.trainer.mini_batch_prompts) == (16, 8)
    assert (config.trainer.epochs, config.trainer.save_every, config.trainer.val_every) == (
        2, 20, 20)
    assert config.data.instruction.startswith("Solve the following math problem step by step.")


def test_paper_grpo_differs_from_paper_trl_only_in_who_writes():
    trl = compose(["experiment=paper_trl"])
    grpo = compose(["experiment=paper_grpo"])
    assert grpo.algorithm.name == "grpo"
    assert grpo.algorithm.handoff_p == 1.0 and grpo.algorithm.first_writer == "senior"
    assert grpo.optim == trl.optim and grpo.rollout == trl.rollout
    assert grpo.trainer == trl.trainer and grpo.data == trl.data
    assert grpo.algorithm.group_size == trl.algorithm.group_size
    assert grpo.algorithm.dual_clip_c == trl.algorithm.dual_clip_c == 3.0
    assert grpo.eval == trl.eval


def test_paper_set_up_options_default_to_the_paper_or_off():
    config = compose([])
    assert config.algorithm.word_boundaries == "paper"  # the authors' boundary set
    assert config.algorithm.dual_clip_c is None  # off unless a preset asks for it
    assert config.data.holdout_seed == 0
    assert compose(["algorithm.word_boundaries=wide"]).algorithm.word_boundaries == "wide"
    assert compose(["algorithm.dual_clip_c=3"]).algorithm.dual_clip_c == 3.0


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _presets("experiment"))
def test_every_experiment_composes(experiment):
    config = compose([f"experiment={experiment}"])
    budget = config.rollout.max_prompt_tokens + config.rollout.max_response_tokens
    assert budget <= config.model.senior.max_context


@pytest.mark.parametrize("group", ["cluster", "data", "algorithm"])
def test_every_preset_of_a_group_composes(group):
    for preset in _presets(group):
        config = compose([f"{group}={preset}"])
        assert getattr(config, group) is not None


@pytest.mark.parametrize("preset", _presets("model"))
def test_every_model_preset_composes_as_senior_and_junior(preset):
    config = compose([
        f"model@model.senior={preset}", f"+model@model.junior={preset}",
        "rollout.max_prompt_tokens=256", "rollout.max_response_tokens=512",
        "eval.max_response_tokens=512",
    ])
    assert config.model.senior == config.model.junior


def test_junior_defaults_to_the_senior_and_can_be_another_model():
    default = compose(["model@model.senior=qwen3_4b_instruct"])
    assert default.model.junior.path == "Qwen/Qwen3-4B-Instruct-2507"
    assert default.model.self_paired
    ablation = compose(["model@model.senior=qwen3_4b_instruct", "+model@model.junior=qwen3_0_6b"])
    assert ablation.model.junior.path == "Qwen/Qwen3-0.6B"
    assert not ablation.model.self_paired


def test_transport_follows_topology_unless_overridden():
    assert compose(["cluster=local_cpu"]).cluster.transport == "cpu"
    assert compose(["cluster=single_gpu"]).cluster.transport == "cuda_ipc"
    assert compose(["cluster=multi_node"]).cluster.transport == "nccl"
    auto = compose(["cluster=multi_node", "cluster.weight_transport=auto",
                    "cluster.colocated=true", "cluster.senior.replicas=8",
                    "cluster.junior.replicas=8", "cluster.gpu_memory_utilization=0.4"])
    assert auto.cluster.transport == "cuda_ipc"


def test_local_model_directory_context_is_read_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 4096}')
    local = [f"model.senior.path={tmp_path}", "model.senior.max_context=null"]
    assert compose(local).model.senior.max_context == 4096
    with pytest.raises(ConfigError, match="model.senior.max_context = 4096"):
        compose([*local, "rollout.max_response_tokens=5000"])


BAD_VALUES = [
    (["algorithm.handoff_p=1.5"], "algorithm.handoff_p"),
    (["algorithm.handoff_p=-0.1"], "algorithm.handoff_p"),
    (["algorithm.group_size=1"], "algorithm.group_size"),
    (["algorithm.schedule=paragraph"], "algorithm.schedule"),
    (["algorithm.first_writer=both"], "algorithm.first_writer"),
    (["algorithm.max_gap_tokens=0"], "algorithm.max_gap_tokens"),
    (["algorithm.clip_ratio=0"], "algorithm.clip_ratio"),
    (["algorithm.loss_agg=sum"], "algorithm.loss_agg"),
    (["algorithm.baseline=median"], "algorithm.baseline"),
    (["algorithm.junior_kl_coef=-1"], "algorithm.junior_kl_coef"),
    (["algorithm.word_boundaries=newline"], "algorithm.word_boundaries"),
    (["algorithm.dual_clip_c=1.0"], "algorithm.dual_clip_c"),
    (["data.holdout_seed=-1"], "data.holdout_seed"),
    (["algorithm=grpo", "algorithm.handoff_p=0.5"], "algorithm.handoff_p=1.0"),
    (["rollout.max_response_tokens=8000"], "rollout.max_response_tokens"),
    (["+model@model.junior=tiny"], "model.junior.max_context"),
    (["rollout.temperature=0"], "rollout.temperature"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["model.senior.path=/no/such/model"], "model.senior.path"),
    (["model.senior.path=''"], "model.senior.path"),
    (["model.junior.path=./no/such/junior"], "model.junior.path"),
    (["model.senior.dtype=int8"], "model.senior.dtype"),
    (["~model@model.senior"], "model.senior.path"),
    (["trainer.mini_batch_prompts=5"], "trainer.mini_batch_prompts"),
    (["trainer.total_steps=0"], "trainer.total_steps"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.betas=[0.9,1.5]"], "optim.betas"),
    (["cluster.device=tpu"], "cluster.device"),
    (["cluster.weight_transport=nccl"], "cluster.weight_transport"),
    (["cluster.colocated=true"], "cluster.colocated"),
    (["cluster.senior.replicas=0"], "cluster.senior.replicas"),
    (["cluster=multi_node", "cluster.weight_transport=carrier_pigeon"],
     "cluster.weight_transport"),
    (["data.answer_format=latex"], "data.answer_format"),
    (["data.source=./no/such/file.jsonl"], "data.source"),
    (["data.max_bad_row_frac=2"], "data.max_bad_row_frac"),
    (["reward.timeout_s=0"], "reward.timeout_s"),
    (["eval.pass_k=[1,16]"], "eval.pass_k"),
    (["seed=-1"], "seed"),
    (["learner.cpu_compute_dtype=float16"], "learner.cpu_compute_dtype"),
]

# Accepted before the ranges were explicit; each failed minutes later in AdamW, vLLM or the
# first validation, or trained on nan.
UNCHECKED_BEFORE = [
    (["optim.eps=0"], "optim.eps"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.weight_decay=inf"], "optim.weight_decay"),
    (["optim.grad_clip=inf"], "optim.grad_clip"),
    (["algorithm.clip_ratio_high=inf"], "algorithm.clip_ratio_high"),
    (["algorithm.kl_coef=inf"], "algorithm.kl_coef"),
    (["algorithm.tis_cap=inf"], "algorithm.tis_cap"),
    (["rollout.temperature=inf"], "rollout.temperature"),
    (["reward.timeout_s=inf"], "reward.timeout_s"),
    (["eval.temperature=inf"], "eval.temperature"),
    (["eval.pass_k=[]"], "eval.pass_k"),
    (["eval.protocols=[]"], "eval.protocols"),
    (["eval.dose_p=[]"], "eval.dose_p"),
    (["cluster.learner.cpus_per_rank=0"], "cluster.learner.cpus_per_rank"),
    (["cluster.learner.cpu_threads=0"], "cluster.learner.cpu_threads"),
    (["cluster.cpu_kvcache_gib=inf"], "cluster.cpu_kvcache_gib"),
    (["cluster.call_timeout_s=inf"], "cluster.call_timeout_s"),
    (["cluster.push_timeout_s=inf"], "cluster.push_timeout_s"),
    (["data.num_generated=10", "data.holdout_size=10"], "data.holdout_size"),
    (["data.source=./conf"], "data.source"),  # a directory: failed at load before
    # the junior serves evaluation episodes too (every hand-off protocol)
    (["+model@model.junior=tiny", "rollout.max_prompt_tokens=256",
      "rollout.max_response_tokens=512", "eval.max_response_tokens=3000"],
     "eval.max_response_tokens"),
    # topology: colocated puts one senior and one junior engine beside each learner rank
    (["cluster=single_gpu", "cluster.gpu_memory_utilization=0.6"],
     "cluster.gpu_memory_utilization"),
    (["cluster=single_gpu", "cluster.senior.replicas=2"], "cluster.senior.replicas"),
    (["cluster=multi_node", "cluster.colocated=true"], "cluster.senior.replicas"),
    (["cluster=single_gpu", "cluster.junior.tensor_parallel_size=2"],
     "cluster.junior.tensor_parallel_size"),
]


@pytest.mark.parametrize(("overrides", "field"), BAD_VALUES + UNCHECKED_BEFORE,
                         ids=[" ".join(o) for o, _ in BAD_VALUES + UNCHECKED_BEFORE])
def test_bad_value_fails_at_compose_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as error:
        compose(overrides)
    assert field in str(error.value)
    assert "\n" not in str(error.value)  # one line: the CLI prints it as it is


def _model_dir(path: Path, **config) -> Path:
    """A local model directory holding only a config.json (all the compose checks read)."""
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# SmolLM2-135M's shape: 30 layers x 3 KV heads x 64 dims, so 46,080 bytes a token in float32
SMOLLM2_SHAPE = {"max_position_embeddings": 8192, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}


def test_local_model_without_a_readable_config_names_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="model.senior.path=.* has no config.json"):
        compose([f"model.senior.path={empty}", "model.senior.max_context=null"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="model.junior.path: .* not readable JSON"):
        compose([f"model.junior.path={broken}"])


def test_a_local_juniors_own_context_bounds_what_it_inherits(tmp_path):
    # model.junior.max_context follows the senior preset's 8192 unless set; the junior's own
    # config.json says 2048, which vLLM would refuse at engine start
    junior = _model_dir(tmp_path / "junior", max_position_embeddings=2048)
    with pytest.raises(ConfigError) as error:
        compose([f"model.junior.path={junior}"])
    assert "model.junior.max_context=8192" in str(error.value)
    assert "max_position_embeddings=2048" in str(error.value)
    fits = compose([f"model.junior.path={junior}", "model.junior.max_context=null",
                    "rollout.max_prompt_tokens=512", "rollout.max_response_tokens=1024",
                    "eval.max_response_tokens=1024"])
    assert fits.model.junior.max_context == 2048


def test_rope_scaling_and_nested_text_configs_are_read(tmp_path):
    scaled = _model_dir(tmp_path / "scaled", max_position_embeddings=2048,
                        rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert compose([f"model.senior.path={scaled}", "model.senior.max_context=8192"]
                   ).model.senior.max_context == 8192
    nested = _model_dir(tmp_path / "nested", text_config={"max_position_embeddings": 2048})
    with pytest.raises(ConfigError, match="model.senior.max_context = 2048"):
        compose([f"model.senior.path={nested}", "model.senior.max_context=null"])


def test_cpu_kv_cache_must_hold_one_full_length_request(tmp_path):
    model = _model_dir(tmp_path / "smollm2", **SMOLLM2_SHAPE)
    local = [f"model.senior.path={model}", "model.senior.max_context=null",
             "model.senior.dtype=float32"]
    # default budgets: 1024 + 3000 tokens x 46,080 bytes = 0.17 GiB
    assert compose([*local, "cluster.cpu_kvcache_gib=0.2"]).cluster.cpu_kvcache_gib == 0.2
    with pytest.raises(ConfigError) as error:
        compose([*local, "cluster.cpu_kvcache_gib=0.1"])
    message = str(error.value)
    assert message.startswith("cluster.cpu_kvcache_gib=0.1 holds 2330 tokens of model.senior")
    assert "4024 tokens" in message and "at least 0.17" in message
    # eval.context_tokens widens every engine's requests; bfloat16 halves the bytes a token
    with pytest.raises(ConfigError, match="cluster.cpu_kvcache_gib"):
        compose([*local, "cluster.cpu_kvcache_gib=0.2", "eval.context_tokens=8192"])
    assert compose([*local[:2], "model.senior.dtype=bfloat16", "cluster.cpu_kvcache_gib=0.1"])
    # a sliding window caches less than the formula says: not refused here (vLLM decides)
    windowed = _model_dir(tmp_path / "windowed", **SMOLLM2_SHAPE, sliding_window=1024)
    assert compose([f"model.senior.path={windowed}", "model.senior.max_context=null",
                    "cluster.cpu_kvcache_gib=0.01"])


@pytest.mark.parametrize(("flags", "cluster", "expected"), [
    ("fpu avx2 fma", "local_cpu", "float32"),  # Zen 1-3: bf16 would be emulated
    ("avx2 avx512f avx512_bf16", "local_cpu", "bfloat16"),  # Zen 4
    ("fp asimd sve bf16", "local_cpu", "bfloat16"),  # Graviton 3
    ("fpu avx2 fma", "single_gpu", "bfloat16"),  # the GPU computes it, whatever the host
])
def test_auto_engine_dtype_follows_the_device(monkeypatch, flags, cluster, expected):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    config = compose([f"cluster={cluster}", "model.senior.path=some/hub-model"])
    assert (config.model.senior.dtype, config.model.junior.dtype) == (expected, expected)
    explicit = compose([f"cluster={cluster}", "model.senior.path=some/hub-model",
                        "model.senior.dtype=bfloat16", "model.junior.dtype=float16"])
    assert (explicit.model.senior.dtype, explicit.model.junior.dtype) == ("bfloat16", "float16")
    # the demo's SmolLM2 preset asks for auto
    assert compose([f"cluster={cluster}"]).model.senior.dtype == expected


@pytest.mark.parametrize(("setting", "cpus_per_rank", "world_size", "overlapped", "expected"), [
    (None, 1, 1, False, 16),  # synchronous loop: the engines idle while the learner trains
    (None, 1, 3, False, 5),  # ranks split the cores; never more threads than cores
    (None, 8, 4, False, 8),  # never fewer than the rank's reservation
    (None, 2, 1, True, 2),  # trainer.off_policy: the engines run meanwhile; keep to the rank's
    (3, 1, 1, False, 3),  # set: taken as given
])
def test_cpu_learner_threads(setting, cpus_per_rank, world_size, overlapped, expected):
    assert cpu.learner_threads(setting, cpus_per_rank, world_size, overlapped,
                               cores=16) == expected


@pytest.mark.parametrize(("preset", "gpus", "fits"), [
    ("single_gpu", 0, False), ("single_gpu", 1, True), ("multi_node", 15, False),
    ("multi_node", 16, True), ("local_cpu", 0, True)])
def test_topology_against_this_machines_gpus(preset, gpus, fits):
    cluster = compose([f"cluster={preset}"]).cluster
    if fits:
        check_devices(cluster, gpus)
        return
    with pytest.raises(ConfigError) as error:
        check_devices(cluster, gpus)
    assert "cluster.device=cuda" in str(error.value) and f"has {gpus}" in str(error.value)


@pytest.mark.parametrize(("override", "key"), [
    ("algorithm.foo=1", "foo"),
    ("+trainer.stepz=3", "stepz"),
    ("+bogus=1", "bogus"),
    ("rollout.temprature=0.7", "temprature"),
    ("algorithm.handoff_p=half", "handoff_p"),
    ("algorithm.group_size=8.5", "group_size"),
    ("model@model.senior=gpt5", "gpt5"),
])
def test_unknown_keys_and_wrong_types_fail_at_compose_naming_the_key(override, key):
    with pytest.raises((HydraException, OmegaConfBaseException, ConfigError)) as error:
        compose([override])
    assert key in str(error.value)


@pytest.mark.parametrize(("visible", "gpus"), [("0,1", 2), ("3", 1), ("", 0), ("-1", 0)])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, visible, gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == gpus


def _train(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tandem.train", *args, f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_cli_prints_the_composed_paper_config(tmp_path):
    done = _train("--cfg", "job", "experiment=paper_trl", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    for line in ("handoff_p: 0.5", "max_gap_tokens: 32", "group_size: 8", "lr: 1.0e-06",
                 "clip_ratio: 0.2", "temperature: 0.6", "max_response_tokens: 3000"):
        assert line in done.stdout


def test_cli_rejects_a_bad_value_before_starting_anything(tmp_path):
    done = _train("algorithm.handoff_p=1.5", tmp_path=tmp_path)
    assert done.returncode != 0
    assert "handoff_p" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_accepts_a_good_config_and_names_a_bad_resume_path_before_ray(tmp_path):
    # The whole run is tests/test_train.py's and test_sweep.py's; here the good config passes
    # validation and the run stops at its first check, a resume path that does not exist.
    done = _train("experiment=demo_cpu", f"trainer.resume={tmp_path}/nowhere",
                  tmp_path=tmp_path)
    out = done.stderr + done.stdout
    assert "config ok" in out
    assert done.returncode == 2 and "trainer.resume=" in out and "not a complete checkpoint" in out
    assert "tandem: error: trainer.resume=" in done.stderr and "Traceback" not in out
    assert "ray:" not in out  # failed before connecting to Ray


def test_multirun_directory_names_stay_short_and_distinct():
    assert short_dirname("algorithm.handoff_p=0.25") == "algorithm.handoff_p=0.25"
    long_a = ",".join(f"trainer.key{i}=value{i}" for i in range(30)) + ",algorithm.handoff_p=0.25"
    long_b = long_a.replace("0.25", "0.75")
    assert len(short_dirname(long_a)) == 96
    assert short_dirname(long_a) != short_dirname(long_b)
    assert "/" not in short_dirname("model@model.senior=/models/qwen")
