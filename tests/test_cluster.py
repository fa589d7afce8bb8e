"""The cluster launch path: cluster/submit.py against a real `ray start --head` on this machine,
plus the KubeRay manifest and the SLURM script checked without a cluster.

The head is private to this module: its own ports, temp dir and auth token, started as a
subprocess in its own session and stopped by its PID (never `ray stop`, which would also stop
other people's Ray processes on a shared machine). Every address is passed explicitly, so this
head is never picked up by the `ray.init(address="local")` of other tests, nor the other way
round.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBMIT = REPO_ROOT / "cluster" / "submit.py"
sys.path.insert(0, str(REPO_ROOT / "cluster"))
import submit  # noqa: E402  (cluster/ is a folder of scripts, not a package)

# The training job: one real tandem step with the tiny model (engines, learner, reward, push).
TRAIN_JOB = ["model@model.senior=tiny", "trainer.total_steps=1", "trainer.val_every=0",
             "trainer.export_final=false", "algorithm.group_size=2",
             "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
             "rollout.max_prompt_tokens=128", "rollout.max_response_tokens=16",
             "eval.max_response_tokens=16", "data.num_generated=32", "data.holdout_size=2",
             "cluster.cpu_kvcache_gib=0.25", "cluster.enforce_eager=true",
             "reward.num_workers=1"]
TRAIN_LOG_MARKER = "step 1/1"
# Jobs whose content does not matter (timeouts, detaching, SLURM plumbing): Hydra composes
# and prints the config, then the job ends without starting engines.
JOB_OVERRIDES = ["--cfg", "job", "model@model.senior=tiny", "algorithm.handoff_p=0.5"]
JOB_LOG_MARKER = "handoff_p: 0.5"

HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 600


def _free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _pids_of(pgid: int, temp_dir: str) -> set[int]:
    """Live processes of one head: its process group, or a command line naming its temp dir
    (a Ray process that left the group still names the session it belongs to)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            in_group = os.getpgid(pid) == pgid
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ProcessLookupError):
            continue
        if state != "Z" and (in_group or temp_dir in cmdline):
            pids.add(pid)
    return pids


def _survivors(pgid: int, temp_dir: str, settle_s: float = 15) -> dict[int, str]:
    """Processes of one head still alive `settle_s` after it was told to stop (Ray's children
    take a few seconds to exit), as {pid: command line}; they are killed, so nothing leaks."""
    deadline = time.monotonic() + settle_s
    left = _pids_of(pgid, temp_dir)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _pids_of(pgid, temp_dir)
    found = {}
    for pid in left:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    return found


class LocalHead:
    """A one-node Ray cluster with token auth, owned by this test module."""

    def __init__(self, root: Path):
        # Ray puts unix sockets under the temp dir and Linux caps their path at 107 bytes,
        # too short for pytest's tmp_path plus Ray's session name: use a short dir of our own.
        self.temp_dir = tempfile.mkdtemp(prefix="tdr", dir="/tmp")
        self.token_path = root / "auth_token"
        self.token_path.write_text(os.urandom(16).hex())
        self.log_path = root / "head.log"
        (gcs, dashboard, client, agent_http, agent_grpc, node_manager, object_manager,
         runtime_env_agent, metrics) = _free_ports(9)
        self.address = f"http://127.0.0.1:{dashboard}"
        ray_cli = Path(sys.executable).parent / "ray"
        command = [
            str(ray_cli), "start", "--head", "--block", "--disable-usage-stats",
            # Ray >= 2.5x replaces a loopback --node-ip-address with the machine's IP and its
            # GCS and raylet listen on all interfaces; the token below is what keeps them
            # closed. The dashboard (the job API) binds to loopback only.
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--port={gcs}", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
            "--num-cpus=4", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
        ]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update({
            # the job's `python` must be this venv's, as on a cluster image
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            # no Serve here: skip the 30 s drain on SIGTERM
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        })
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=root)
        self.pgid = self.process.pid  # start_new_session: the head leads its own group

    def wait_ready(self, timeout_s: float) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited {self.process.returncode}:\n{self.log()}")
            try:
                response = requests.get(f"{self.address}/api/version", timeout=5, headers={
                    "Authorization": f"Bearer {self.token_path.read_text()}"})
                if response.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray head not up within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self, timeout_s: float = 60) -> dict[int, str]:
        """SIGTERM the `ray start --block` process (it stops its children), wait, and return
        the PIDs of this head still alive afterwards (killed, so nothing leaks)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        left = _survivors(self.pgid, self.temp_dir)
        if self.process.poll() is None:
            self.process.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = LocalHead(tmp_path_factory.mktemp("ray_head"))
    try:
        head.wait_ready(HEAD_START_TIMEOUT_S)
        yield head
    finally:
        left = head.stop()
    assert not left, f"processes of the test's Ray head survived SIGTERM: {left}"


def _run_submit(args: list[str], env_extra: dict[str, str], home: Path,
                timeout_s: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], env=_submit_env(env_extra, home),
                          capture_output=True, text=True, timeout=timeout_s, cwd=home)


# ----------------------------------------------------------------------------- real head


def _submit_env(extra: dict[str, str], home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE",
                        "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    # a private HOME: the user's ~/.ray/auth_token must not stand in for the test's token
    env.update({"HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}, **extra)
    return env


def _log_time(text: str, marker: str) -> float:
    """The Unix time of the first job-log line holding `marker` (Hydra's `[date time,ms]`)."""
    line = next(line for line in text.splitlines() if marker in line)
    stamp = line[line.index("[") + 1:line.index("]")]
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


@pytest.mark.slow
def test_submitted_training_job_logs_and_ray_job_stop_leaves_its_last_step(head, tmp_path):
    """A real training job through submit.py: its log comes back while it runs, and `ray job
    stop` (SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, which submit.py raises from
    Ray's 3 s) lets it finish the step, checkpoint that step and exit."""
    run_dir = tmp_path / "run"
    job = [o for o in TRAIN_JOB if not o.startswith("trainer.total_steps=")]
    env = _submit_env({"RAY_AUTH_TOKEN_PATH": str(head.token_path)}, tmp_path)
    out_path = tmp_path / "submit.out"
    with open(out_path, "w") as out:
        follower = subprocess.Popen(
            [sys.executable, str(SUBMIT), "--address", head.address, "--timeout-s",
             str(JOB_TIMEOUT_S), "--", *job, "trainer.total_steps=1000", "trainer.save_every=0",
             f"hydra.run.dir={run_dir}"], env=env, stdout=out, stderr=subprocess.STDOUT,
            text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not _metrics_steps(run_dir) and time.monotonic() < deadline:
            assert follower.poll() is None, out_path.read_text()[-4000:]
            time.sleep(1)
        assert _metrics_steps(run_dir), f"no step within {JOB_TIMEOUT_S} s"
        job_id = out_path.read_text().split("submit: job ", 1)[1].split()[0]
        stop_started = time.monotonic()
        stop = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "stop", "--address", head.address,
             job_id], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
            timeout=JOB_TIMEOUT_S)
        stop_s = time.monotonic() - stop_started
        assert stop.returncode == 0, stop.stdout + stop.stderr
        follower.wait(120)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    text = out_path.read_text()
    assert "(auth: token)" in text and f"{head.address}/#/jobs/tandem-" in text
    assert TRAIN_LOG_MARKER.replace("1/1", "1/1000") in text, text[-4000:]
    assert "ray: connected to" in text  # the job attached to the head, not a cluster of its own
    assert follower.returncode == submit.EXIT_FAILED and "STOPPED" in text
    assert "stopped by SIGTERM after step" in text, text[-4000:]
    # the driver ended on its own, after its teardown: not killed when its grace ran out
    assert "shut down: engines, learners" in text, text[-4000:]

    from tandem import checkpoint as ckpt

    steps = _metrics_steps(run_dir)
    assert steps == list(range(1, steps[-1] + 1))
    newest = ckpt.find_resume("auto", run_dir)
    assert newest is not None and newest.name == f"step_{steps[-1]:06d}", (steps, newest)
    assert ckpt.read_state(newest)["step"] == steps[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [newest.name]
    sigterm = _log_time(text, "SIGTERM: finishing this step")
    saved_s = (newest / ckpt.STATE_FILE).stat().st_mtime - sigterm
    print(f"ray job stop: {stop_s:.1f} s for the command; after the SIGTERM the checkpoint was "
          f"complete in {saved_s:.1f} s, the driver shut down in "
          f"{_log_time(text, 'shut down: engines') - sigterm:.1f} s")
    # The token is nowhere the job leaves a trace: its logs, the run's files (config.yaml,
    # metrics, topology, checkpoints' metadata) and the job's stored info.
    token = head.token_path.read_text().strip()
    assert token not in text
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 2**24:
            assert token.encode() not in path.read_bytes(), path
    info = submit.JobSubmissionClient(head.address, headers={
        "Authorization": f"Bearer {token}"}).get_job_info(job_id)
    assert token not in json.dumps([info.entrypoint, info.metadata, info.runtime_env])


@pytest.mark.slow
def test_failing_job_exits_nonzero_with_its_error(head, tmp_path):
    # the nodes' paths are not checked locally: this one passes submit.py and fails in the job
    result = _run_submit(["--address", head.address, "--", "model.senior.path=/absent/model"],
                         {"RAY_AUTH_TOKEN": head.token_path.read_text()}, tmp_path)
    assert result.returncode == submit.EXIT_FAILED, result.stdout + result.stderr
    assert "model.senior.path='/absent/model' does not exist" in result.stdout
    assert "FAILED" in result.stdout


@pytest.mark.slow
def test_missing_or_wrong_token_is_refused_before_anything_runs(head, tmp_path):
    missing = _run_submit(["--address", head.address, "--", *JOB_OVERRIDES], {}, tmp_path)
    assert missing.returncode == submit.EXIT_UNREACHABLE
    assert "no token was found" in missing.stderr and "RAY_AUTH_TOKEN" in missing.stderr

    wrong = _run_submit(["--address", head.address, "--", *JOB_OVERRIDES],
                        {"RAY_AUTH_TOKEN": "not-the-token"}, tmp_path)
    assert wrong.returncode == submit.EXIT_UNREACHABLE
    assert "Authentication failed" in wrong.stderr, wrong.stderr

    forced = _run_submit(["--address", head.address, "--auth-mode", "disabled", "--",
                          "algorithm.handoff_p=0.5"], {}, tmp_path)
    assert forced.returncode == submit.EXIT_UNREACHABLE
    assert "RAY_AUTH_MODE=token" in forced.stderr


@pytest.mark.slow
def test_no_wait_and_timeout_leave_the_job_running(head, tmp_path):
    env = {"RAY_AUTH_TOKEN_PATH": str(head.token_path)}
    # --timeout-s far below the seconds a job needs to set up and import torch
    followed = _run_submit(["--address", head.address, "--timeout-s", "0.1", "--",
                            *JOB_OVERRIDES], env, tmp_path)
    assert followed.returncode == submit.EXIT_TIMEOUT, followed.stdout + followed.stderr
    assert "the job keeps going" in followed.stderr and "ray job logs" in followed.stderr
    detached = _run_submit(["--address", head.address, "--no-wait", "--", *JOB_OVERRIDES],
                           env, tmp_path)
    assert detached.returncode == 0, detached.stdout + detached.stderr
    assert "follow it with" in detached.stdout

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={
        "Authorization": f"Bearer {head.token_path.read_text()}"})
    for out in (followed.stdout, detached.stdout):
        job_id = out.split("submit: job ", 1)[1].split()[0]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
            time.sleep(1)
        assert client.get_job_status(job_id).value == "SUCCEEDED"
        assert JOB_LOG_MARKER in client.get_job_logs(job_id)


# ----------------------------------------------------------------------------- no cluster


def test_unreachable_address_names_what_was_tried(tmp_path):
    (port,) = _free_ports(1)
    address = f"http://127.0.0.1:{port}"
    result = _run_submit(["--address", address, "--request-timeout-s", "5", "--",
                          "algorithm.handoff_p=0.5"], {}, tmp_path, timeout_s=60)
    assert result.returncode == submit.EXIT_UNREACHABLE
    assert f"cannot reach the Ray dashboard at {address} (address from --address)" in result.stderr
    assert f"GET {address}/api/authentication_mode" in result.stderr


def test_bad_override_fails_in_one_line_before_any_upload(tmp_path):
    """Validated here, before the cluster is contacted: the address is unreachable, and the
    error is the config's, not the network's. A sweep is checked point by point."""
    (port,) = _free_ports(1)
    address = f"http://127.0.0.1:{port}"
    for args, expected in (
            (["algorithm.handoff_p=1.5"], "config error: algorithm.handoff_p must be in [0, 1]"),
            (["trainer.stepz=3"], "config error: "),
            (["-m", "algorithm.handoff_p=0.5,2"],
             "config error (sweep point algorithm.handoff_p=2): algorithm.handoff_p")):
        result = _run_submit(["--address", address, "--request-timeout-s", "5", "--", *args],
                             {}, tmp_path, timeout_s=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"submit: {expected}"), result.stderr
        assert "cannot reach" not in result.stderr


def test_validation_composes_every_sweep_point_and_leaves_node_paths_to_the_nodes():
    assert submit.validate_overrides(["-m", "algorithm.handoff_p=0.25,0.5",
                                      "trainer.total_steps=2,3"]) == 4
    # the paths are the cluster nodes': not checked on the submitting machine
    assert submit.validate_overrides(["model.senior.path=/only/on/the/nodes"]) == 1
    assert submit.validate_overrides(["--cfg", "job", "algorithm.handoff_p=0.5"]) == 0
    assert submit.validate_overrides(["-cn", "config", "algorithm.handoff_p=0.5"]) == 1


def test_gcs_address_is_rejected_with_the_form_to_use(tmp_path):
    result = _run_submit(["--address", "10.0.0.1:6379", "--", "algorithm.handoff_p=0.5"], {},
                         tmp_path, timeout_s=60)
    assert result.returncode == 2
    assert "http://HEAD:8265" in result.stderr


def test_address_precedence(monkeypatch):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    monkeypatch.setenv("RAY_ADDRESS", "http://ray:8265")
    assert submit.resolve_address("http://cli:8265/") == ("http://cli:8265", "--address")
    assert submit.resolve_address(None) == ("http://api:8265", "RAY_API_SERVER_ADDRESS")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert submit.resolve_address(None) == ("http://ray:8265", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address: not for the job API
    assert submit.resolve_address(None) == (submit.DEFAULT_ADDRESS, "the default")


def test_entrypoint_quotes_overrides_hydra_would_otherwise_lose():
    overrides = ["hydra.run.dir=/shared/runs/${now:%H-%M}", "+model@model.junior=qwen3_0_6b",
                 "data.name=a b"]
    entrypoint = submit.build_entrypoint(submit.JobSpec(overrides=overrides, python="python3"))
    assert shlex.split(entrypoint) == ["python3", "-m", "tandem.train", *overrides]


def test_runtime_env_carries_the_repo_auth_mode_and_requested_env(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("math-verify\n")
    spec = submit.JobSpec(env={"HF_HOME": "/shared/hf"}, offline=True, uv=str(requirements))
    runtime_env = submit.build_runtime_env(spec, "token")
    assert runtime_env["working_dir"] == str(REPO_ROOT)
    assert runtime_env["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert runtime_env["env_vars"]["HF_HOME"] == "/shared/hf"
    assert runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert runtime_env["uv"] == str(requirements) and "pip" not in runtime_env
    # `ray job stop`: SIGTERM, then SIGKILL after this long (Ray's own default is 3 s)
    assert runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(submit.DEFAULT_STOP_WAIT_S)
    assert int(submit.build_runtime_env(submit.JobSpec(stop_wait_s=60), "token")
               ["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) == 60
    with pytest.raises(ValueError, match="--stop-wait-s"):
        submit.build_runtime_env(submit.JobSpec(stop_wait_s=0), "token")
    # the token itself never goes into the runtime_env: the dashboard shows it to everyone
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(runtime_env["env_vars"])
    plain = submit.build_runtime_env(submit.JobSpec(), "disabled")
    assert "pip" not in plain and "uv" not in plain and "HF_HUB_OFFLINE" not in plain["env_vars"]

    with pytest.raises(ValueError, match="no such requirements file"):
        submit.build_runtime_env(submit.JobSpec(pip=str(tmp_path / "absent.txt")), "token")
    with pytest.raises(ValueError, match="--env takes NAME=VALUE"):
        submit.parse_env(["HF_HOME"])


def test_working_dir_package_leaves_out_weights_runs_and_venvs(tmp_path):
    """Ray's own packager, with our excludes, on a fake checkout."""
    from ray._private.runtime_env.packaging import create_package

    checkout = tmp_path / "checkout"
    kept = ["tandem/train.py", "conf/config.yaml", "cluster/submit.py", "data/problems.jsonl"]
    dropped = [".venv/bin/python", "runs/2026/metrics.jsonl", "outputs/x.log",
               "model/model.safetensors", "ckpt/step_20/optim.pt", ".git/HEAD",
               "tandem/__pycache__/train.cpython-311.pyc", "checkpoints/a/b.distcp",
               "smollm2.gguf"]
    for name in kept + dropped:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("x")
    package = tmp_path / "package.zip"
    create_package(str(checkout), package, include_gitignore=True,
                   excludes=list(submit.WORKING_DIR_EXCLUDES))
    names = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}
    assert names == set(kept)


def test_auth_follows_the_cluster_and_reads_the_token_in_rays_order(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setattr(submit, "DEFAULT_TOKEN_PATH", tmp_path / "absent")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.resolve_auth("auto", "disabled") == ("disabled", {})
    with pytest.raises(submit.SubmitError, match="no token was found"):
        submit.resolve_auth("auto", "token")

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert submit.resolve_auth("auto", "token") == ("token",
                                                    {"Authorization": "Bearer from-file"})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.resolve_auth("token", "token")[1] == {"Authorization": "Bearer from-env"}
    # an old cluster (no auth endpoint): an explicit mode is taken as given
    assert submit.resolve_auth("token", "unknown")[0] == "token"
    with pytest.raises(submit.SubmitError, match="RAY_AUTH_MODE=disabled"):
        submit.resolve_auth("token", "disabled")


class _RecordingClient:
    """Stands in for Ray's JobSubmissionClient: keeps what would reach the cluster."""

    def __init__(self, headers):
        self.headers, self.jobs = headers, []

    def submit_job(self, **job):
        self.jobs.append(job)


def test_the_token_never_travels_inside_the_job(monkeypatch, capsys):
    token = "0123456789abcdef-the-clusters-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setattr(submit, "cluster_auth_mode", lambda *_: "token")
    monkeypatch.setattr(submit, "connect", lambda url, headers, _: _RecordingClient(headers))
    spec = submit.JobSpec(overrides=["trainer.total_steps=1"], env={"HF_HOME": "/hf"})
    job = submit.submit(spec, "http://127.0.0.1:8265")
    assert job.client.headers == {"Authorization": f"Bearer {token}"}  # only in the header
    [sent] = job.client.jobs
    assert token not in json.dumps(sent) and token not in repr(job)
    assert capsys.readouterr().err == ""  # loopback: no warning

    for leaky in (submit.JobSpec(env={"RAY_AUTH_TOKEN": token}),
                  submit.JobSpec(env={"MY_SECRET": f"x{token}"}),
                  submit.JobSpec(overrides=[f"+tracking.key={token}"])):
        with pytest.raises(ValueError, match="token"):
            submit.submit(leaky, "http://127.0.0.1:8265")
    assert len(job.client.jobs) == 1
    # the dry run prints the runtime_env: never with the token in it
    assert submit.main(["--dry-run", "--env", f"LEAK={token}", "--", "trainer.total_steps=1"]) == 2
    assert submit.main(["--dry-run", "--", "trainer.total_steps=1"]) == 0
    assert token not in capsys.readouterr().out


def test_a_token_sent_over_plain_http_to_another_host_is_warned_about(monkeypatch, capsys):
    for address in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265",
                    "https://head.example:8265"):
        assert submit.plain_http_warning(address) is None, address
    assert "plain http://" in submit.plain_http_warning("http://head.example:8265")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)
    monkeypatch.setattr(submit, "connect", lambda url, headers, _: _RecordingClient(headers))
    monkeypatch.setattr(submit, "cluster_auth_mode", lambda *_: "token")
    submit.submit(submit.JobSpec(), "http://10.1.2.3:8265")
    assert "warning: the Ray token goes to 10.1.2.3 over plain http://" in capsys.readouterr().err
    monkeypatch.setattr(submit, "cluster_auth_mode", lambda *_: "disabled")  # nothing to leak
    submit.submit(submit.JobSpec(), "http://10.1.2.3:8265")
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- launch files


def test_kuberay_manifest_runs_the_trainer_on_a_gpu_worker_group():
    manifest = yaml.safe_load((REPO_ROOT / "cluster" / "rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    entrypoint = shlex.split(spec["entrypoint"])
    python = entrypoint.index("python")
    assert entrypoint[python:python + 3] == ["python", "-m", "tandem.train"]
    assert "cluster=multi_node" in entrypoint
    assert "trainer.resume=auto" in entrypoint  # a retry continues from the last checkpoint
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    # the run's own deadline (`timeout`: SIGTERM, then SIGKILL after --kill-after) ends it,
    # checkpointed, before KubeRay's deadline tears the cluster down
    assert entrypoint[0] == "timeout" and "--signal=TERM" in entrypoint[:python]
    kill_after = int(next(a for a in entrypoint if a.startswith("--kill-after="))
                     .split("=", 1)[1])
    run_deadline = int(entrypoint[python - 1])
    assert kill_after >= 600
    assert run_deadline + kill_after < spec["activeDeadlineSeconds"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert int(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 600

    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)
    head = cluster["headGroupSpec"]
    # the driver runs on the head: no GPU there, so no engine or learner lands on it
    assert str(head["rayStartParams"]["num-gpus"]) == "0"
    (worker_group,) = cluster["workerGroupSpecs"]
    (container,) = worker_group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    # conf/cluster/multi_node.yaml: 8 learner + 6 senior + 2 junior GPUs on 2 nodes
    assert worker_group["replicas"] * gpus == 16
    assert worker_group["minReplicas"] == worker_group["maxReplicas"] == worker_group["replicas"]
    volumes = {v["name"] for v in worker_group["template"]["spec"]["volumes"]}
    assert "dshm" in volumes  # NCCL and vLLM need more /dev/shm than a pod's 64 MiB default


def test_slurm_script_is_valid_bash_and_uses_the_submit_path():
    script = REPO_ROOT / "cluster" / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert "#SBATCH --nodes=" in text
    assert "ray start --head" in text and "ray start --address" in text
    assert "cluster/submit.py" in text
    assert "RAY_AUTH_MODE=token" in text
    # stopped before the time limit, requeued, resumed from its checkpoint
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    assert "trainer.resume=auto" in text and "ray job stop" in text


FAKE_SRUN = """#!/bin/bash
# srun on one machine: log the call, drop srun's own options, run the command here
echo "srun $*" >> "$FAKE_SRUN_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in -w|-n|-N) shift 2;; *) shift;; esac
done
exec "$@"
"""
# scontrol: one node; every call is recorded, so a requeue can be counted
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SCONTROL_LOG"
[[ $1 == show ]] && echo localhost
exit 0
"""
FAKE_SQUEUE = "#!/bin/bash\necho 00:20:00\n"


def _slurm_env(tmp_path: Path, job_id: str, cpus: int) -> dict[str, str]:
    """The environment sbatch would give the script on one node, with srun/scontrol/squeue
    faked in front of PATH and a private HOME (the job's token goes to $HOME/.ray)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "SLURM_RESTART_COUNT")}
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "HOME": str(tmp_path / "home"), "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost",
        "SLURM_CPUS_PER_TASK": str(cpus),
        "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
        "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    })
    return env


def _requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    calls = log.read_text().splitlines() if log.is_file() else []
    return [call for call in calls if call.startswith("requeue")]


def _start_sbatch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # its own session, so that a timeout here can still stop everything it started
    return subprocess.Popen(["bash", str(REPO_ROOT / "cluster" / "slurm.sbatch"), *args],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish_sbatch(process: subprocess.Popen, ray_tmp: str,
                   timeout_s: float) -> tuple[str, dict[int, str]]:
    """Its output and the processes of its session still alive after it ended (killed)."""
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
    finally:
        left = _survivors(process.pid, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return out, left


def _wait_until(check, process: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} (exit {process.poll()}):\n"
                                 f"{process.communicate()[0][-4000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_slurm_script_runs_a_job_and_usr1_stops_checkpoints_and_requeues_it(tmp_path):
    """The sbatch script on this machine, with srun/scontrol/squeue faked for one node, runs a
    real training job; USR1 (what `--signal=B:USR1@900` sends before the time limit) must
    stop it the way `ray job stop` does (it finishes its step and checkpoints it), tear Ray
    down, requeue the job once and exit 0, leaving no process behind."""
    job_id = f"test{os.getpid()}"
    ray_tmp = f"/tmp/ray-{job_id}"
    env = _slurm_env(tmp_path, job_id, cpus=4)  # local_cpu: 2 engines + 1 learner rank
    gcs, dashboard, *others = _free_ports(9)
    flags = ["--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--node-manager-port", "--object-manager-port",
             "--runtime-env-agent-port", "--metrics-export-port"]
    env.update({
        "TANDEM_VENV": str(Path(sys.executable).parent.parent),
        "TANDEM_RAY_PORT": str(gcs), "TANDEM_DASHBOARD_PORT": str(dashboard),
        "TANDEM_DASHBOARD_HOST": "127.0.0.1",
        "TANDEM_RAY_START_ARGS": " ".join(f"{f}={p}" for f, p in zip(flags, others, strict=True)),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    })

    # no shared run dir: refused before any Ray process starts
    refused = subprocess.run(["bash", str(REPO_ROOT / "cluster" / "slurm.sbatch"),
                              *JOB_OVERRIDES, "cluster=local_cpu"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "give hydra.run.dir=/shared/" in refused.stderr
    assert not (tmp_path / "srun.log").exists()

    run_dir = tmp_path / "run"
    job = [o for o in TRAIN_JOB if not o.startswith("trainer.total_steps=")]
    process = _start_sbatch([*job, "trainer.total_steps=1000", "trainer.save_every=0",
                             "cluster=local_cpu", f"hydra.run.dir={run_dir}"], env, tmp_path)
    _wait_until(lambda: _metrics_steps(run_dir), process, JOB_TIMEOUT_S, "training step")
    usr1_at = time.time()
    process.send_signal(signal.SIGUSR1)
    out, left = _finish_sbatch(process, ray_tmp, JOB_TIMEOUT_S)
    exited_at = time.time()

    assert process.returncode == 0, out[-4000:]  # requeued: SLURM restarts it, not a failure
    assert "tandem: 1 nodes joined, 0 GPUs" in out
    assert "trainer.resume=auto" in out.split("submit: entrypoint:", 1)[1].splitlines()[0]
    srun_calls = (tmp_path / "srun.log").read_text().splitlines()
    assert any("test -f" in call for call in srun_calls)  # the run dir checked on every node
    ray_calls = [call for call in srun_calls if "ray start" in call]
    assert ray_calls and all("--cpus-per-task=4" in call and "--num-cpus=4" in call
                             and "--num-gpus=0" in call for call in ray_calls), ray_calls
    # (a) the stop reached the driver, which finished its step and checkpointed it
    assert f"USR1: stopping job tandem-slurm-{job_id}-0" in out
    assert "SIGTERM: finishing this step" in out and "stopped by SIGTERM after step" in out, \
        out[-4000:]
    assert "STOPPED" in out

    from tandem import checkpoint as ckpt

    steps = _metrics_steps(run_dir)
    assert steps == list(range(1, steps[-1] + 1))
    newest = ckpt.find_resume("auto", run_dir)
    assert newest is not None and newest.name == f"step_{steps[-1]:06d}", (steps, newest)
    assert ckpt.read_state(newest)["step"] == steps[-1]
    # (b) requeued once, after the checkpoint was complete and Ray was down
    assert _requeues(tmp_path) == [f"requeue {job_id}"]
    requeued_at = (tmp_path / "scontrol.log").stat().st_mtime
    saved_at = (newest / ckpt.STATE_FILE).stat().st_mtime
    assert saved_at <= requeued_at
    assert out.index("tandem: stopping the Ray cluster") < out.index("requeueing job")
    # (c) Ray torn down: nothing the script started survives; the token is gone
    assert not left, f"processes left after the script ended: {left}"
    assert not list((tmp_path / "home" / ".ray").iterdir()), "the job's token was not removed"
    print(f"slurm USR1 after step {steps[-1]}: the driver got SIGTERM after "
          f"{_log_time(out, 'SIGTERM: finishing this step') - usr1_at:.1f} s, checkpoint "
          f"complete after {saved_at - usr1_at:.1f} s, requeued after "
          f"{requeued_at - usr1_at:.1f} s, script exited after {exited_at - usr1_at:.1f} s")


# Stand-ins for the stop decisions, so that each costs a second instead of a Ray start and a
# run: `ray start` sleeps, the node wait succeeds (or hangs with STUB_NODE_WAIT=hang),
# submit.py "submits" its job after STUB_SUBMIT_DELAY_S and runs it until `ray job stop`
# reaches it, then reports STOPPED (or, with STUB_JOB=finishes, SUCCEEDED: it had ended).
STUB_PYTHON = """#!/bin/bash
case "$1" in
  -) cat > /dev/null
     echo waiting > "$STUB_DIR/node_wait"
     [[ ${STUB_NODE_WAIT:-} == hang ]] && exec sleep 600
     echo "tandem: 1 nodes joined, 0 GPUs";;
  cluster/submit.py)
     while [[ $1 != --submission-id ]]; do shift; done
     echo started > "$STUB_DIR/submit_started"
     sleep "${STUB_SUBMIT_DELAY_S:-0}"
     echo "$2" > "$STUB_DIR/submitted"
     while [[ ! -f $STUB_DIR/stop ]]; do sleep 0.1; done
     [[ ${STUB_JOB:-} == finishes ]] && { echo SUCCEEDED; exit 0; }
     echo STOPPED; exit 1;;
  *) exec "$STUB_REAL_PYTHON" "$@";;
esac
"""
STUB_RAY = """#!/bin/bash
echo "ray $*" >> "$STUB_DIR/ray.log"
case "$1 $2" in
  "start "*) exec sleep 600;;
  "job stop") [[ -f $STUB_DIR/submitted && $(< "$STUB_DIR/submitted") == "${*: -1}" ]] || {
                echo "RuntimeError: job ${*: -1} does not exist" >&2; exit 1; }
              touch "$STUB_DIR/stop";;
esac
"""


_REQUEUE_LIMIT = {"SLURM_RESTART_COUNT": "2", "TANDEM_MAX_REQUEUES": "2"}
_BELOW_LIMIT = {"SLURM_RESTART_COUNT": "1", "TANDEM_MAX_REQUEUES": "2"}
_STOPPED = "tandem: submit.py exited 1"
_NOT_STARTED = "not submitted, not requeued (the {} came during start-up"


@pytest.mark.parametrize(("sig", "when", "env", "code", "requeued", "message"), [
    pytest.param(signal.SIGTERM, "running", {}, 143, False, _STOPPED, id="scancel"),
    pytest.param(signal.SIGUSR1, "running", _BELOW_LIMIT, 0, True, "requeueing job",
                 id="below the requeue limit"),
    pytest.param(signal.SIGUSR1, "running", _REQUEUE_LIMIT, 143, False,
                 "not requeued: restart 2 reached TANDEM_MAX_REQUEUES (2)",
                 id="at the requeue limit"),
    pytest.param(signal.SIGUSR1, "running", {"TANDEM_REQUEUE": "0"}, 143, False, _STOPPED,
                 id="TANDEM_REQUEUE=0"),
    pytest.param(signal.SIGUSR1, "running", {"STUB_JOB": "finishes"}, 0, False,
                 "had finished before the USR1: not requeued", id="the run had finished"),
    pytest.param(signal.SIGUSR1, "submitting", {"STUB_SUBMIT_DELAY_S": "3"}, 0, True,
                 "requeueing job", id="before the job exists"),
    pytest.param(signal.SIGUSR1, "starting", {"STUB_NODE_WAIT": "hang"}, 143, False,
                 _NOT_STARTED.format("USR1"), id="USR1 during start-up"),
    pytest.param(signal.SIGTERM, "starting", {"STUB_NODE_WAIT": "hang"}, 143, False,
                 _NOT_STARTED.format("SIGTERM"), id="scancel during start-up"),
])
def test_slurm_stop_signal_decides_requeue_and_exit_status(tmp_path, sig, when, env, code,
                                                            requeued, message):
    """What the script does with USR1 (time limit near) and SIGTERM (scancel, pre-emption),
    with Ray and the run stubbed out: whether the stop reaches the job, whether the job is
    requeued, the exit status SLURM sees, and that nothing it started is left."""
    job_id = f"stub{os.getpid()}"
    stub_dir = tmp_path / "stub"
    stub_bin = stub_dir / "bin"
    stub_bin.mkdir(parents=True)
    for name, text in (("python", STUB_PYTHON), ("ray", STUB_RAY)):
        (stub_bin / name).write_text(text)
        (stub_bin / name).chmod(0o755)
    full_env = _slurm_env(tmp_path, job_id, cpus=2)
    full_env.update(env, PATH=f"{stub_bin}{os.pathsep}{full_env['PATH']}",
                    STUB_DIR=str(stub_dir), STUB_REAL_PYTHON=sys.executable,
                    TANDEM_VENV=str(tmp_path / "no-venv"))
    process = _start_sbatch(["cluster=local_cpu", f"hydra.run.dir={tmp_path / 'run'}"],
                            full_env, tmp_path)
    ready = {"starting": "node_wait", "submitting": "submit_started", "running": "submitted"}
    _wait_until((stub_dir / ready[when]).is_file, process, 60, ready[when])
    process.send_signal(sig)
    out, left = _finish_sbatch(process, f"/tmp/ray-{job_id}", 60)

    assert process.returncode == code, out
    assert message in out, out
    assert _requeues(tmp_path) == ([f"requeue {job_id}"] if requeued else []), out
    # the stop reached the job exactly when there was one to stop
    assert (stub_dir / "stop").is_file() == (when != "starting"), out
    assert "tandem: stopping the Ray cluster" in out
    assert not left, f"processes left after the script ended: {left}"
    assert not list((tmp_path / "home" / ".ray").iterdir()), "the job's token was not removed"
