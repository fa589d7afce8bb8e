"""Submit `python -m tandem.train <hydra overrides>` to a Ray cluster as a Ray job.

    python cluster/submit.py --address http://HEAD:8265 -- cluster=multi_node experiment=paper_trl

The job runs the repository as its working directory (uploaded, minus virtual environments,
run output, caches and weight files), so the cluster's nodes need the dependencies but not a
checkout. This script asks the cluster which Ray auth mode it runs in (Ray >= 2.52 enables
token authentication), sends the token if the cluster wants one, prints the job id and
dashboard URL, follows the job's logs and exits with its status:

    0 SUCCEEDED, 1 FAILED or STOPPED, 3 cluster unreachable / refused,
    124 --timeout-s passed (the job keeps running), 130 interrupted (the job keeps running).

Before anything is uploaded the overrides are composed and validated here, with the same
conf/ and schema the job will use (every point of a `-m` sweep): a bad override fails in one
line without touching the cluster. Paths are the nodes' paths, so whether they exist is left to
the job. The job gets `RAY_JOB_STOP_WAIT_TIME_S` (--stop-wait-s): Ray's `ray job stop` sends
SIGTERM, then SIGKILL after that many seconds (Ray's default, 3 s, leaves no time for "finish the
step, checkpoint, exit").

Every request to the cluster and the wait for the job are bounded (--request-timeout-s,
--timeout-s). Importable: `validate_overrides`, `build_runtime_env`, `build_entrypoint` and
`submit` are the pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar
from unittest import mock
from urllib.parse import urlparse

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRY_MODULE = "tandem.train"

# gitignore-style patterns, relative to the repository root. Ray also honours .gitignore.
# Weights and checkpoints never travel in the job package (Ray caps it at ~500 MiB): models
# come from a path or hub id that every node can read.
WORKING_DIR_EXCLUDES = (
    ".git", ".venv", "venv", ".env", "runs/", "outputs/", "multirun/", "checkpoints/",
    "wandb/", "__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/",
    "*.egg-info/", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf",
    "*.distcp", "tb/",
)

DEFAULT_STOP_WAIT_S = 900
"""Seconds `ray job stop` waits after SIGTERM before SIGKILL: one step plus one checkpoint of
a paper-size run (Ray's own default is 3 s)."""
MAX_VALIDATED_POINTS = 64
"""A sweep's points composed locally before submitting (the first ones, if there are more)."""
# Hydra flags after which tandem.train only prints (a config, help) and trains nothing
HYDRA_PRINT_ONLY = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help")
# Hydra flags that take a value (the value is not an override)
HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-name", "-cn",
                          "--config-path", "-cp", "--config-dir", "-cd")

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

AUTH_MODES = ("auto", "token", "disabled")
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"

T = TypeVar("T")


class SubmitError(RuntimeError):
    """The cluster could not be reached, refused the request, or did not answer in time."""


@dataclass
class JobSpec:
    """What to run and with which environment; everything the cluster receives."""

    overrides: list[str] = field(default_factory=list)
    """Hydra overrides passed to `python -m tandem.train`."""
    python: str = "python"
    """The interpreter on the cluster's nodes (the image's, or a venv path shared by all)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the driver and every actor (values are visible in
    the dashboard: pass secrets through the nodes' environment instead; the Ray token is
    refused here)."""
    offline: bool = False
    """Set HF_HUB_OFFLINE=1: models and data must already be on the nodes."""
    pip: str | None = None
    """A requirements file installed on each node into a per-job virtualenv (slow)."""
    uv: str | None = None
    """Same as pip, installed with uv (faster)."""
    working_dir: Path = REPO_ROOT
    stop_wait_s: int = DEFAULT_STOP_WAIT_S
    """`ray job stop`: seconds between SIGTERM and SIGKILL (RAY_JOB_STOP_WAIT_TIME_S); must
    cover finishing a step and writing its checkpoint."""


# ----------------------------------------------------------------------------- pure pieces


def build_entrypoint(spec: JobSpec) -> str:
    """The shell command the job runs; overrides are quoted so `${...}` and `+x@y=z` survive."""
    return shlex.join([spec.python, "-m", ENTRY_MODULE, *spec.overrides])


def validate_overrides(args: Sequence[str]) -> int:
    """Compose conf/ with the job's overrides and run the schema checks, as `tandem.train`
    will; every point of a `-m` sweep (up to MAX_VALIDATED_POINTS). Returns how many configs
    were checked (0 for `--cfg`, `--info` or `--help`, which train nothing); raises ValueError
    naming the field. Local paths are the cluster nodes' paths: whether they exist is not
    checked here."""
    # why here: the checkout's own tandem (the one uploaded), importable without an install
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tandem.config.compose import compose  # and with it every config module

    if any(arg in HYDRA_PRINT_ONLY for arg in args):
        return 0  # Hydra prints the config or its help and runs nothing: nothing to refuse
    overrides, config_name, multirun = _split_hydra_args(args)
    points = _sweep_points(overrides) if multirun else [overrides]
    for point in points[:MAX_VALIDATED_POINTS]:
        try:
            # every config module that asks whether a path is local (schema.py, model.py,
            # local_model.py, ...): found by name, so a section moved to its own module is too
            with contextlib.ExitStack() as patches:
                for name, module in list(sys.modules.items()):
                    if name.startswith("tandem.config.") and hasattr(module, "looks_local"):
                        patches.enter_context(
                            mock.patch.object(module, "looks_local", lambda path: False))
                compose(point, config_name=config_name)
        except (ValueError, HydraException, OmegaConfBaseException) as error:
            where = f" (sweep point {' '.join(point)})" if multirun else ""
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ValueError(f"config error{where}: {first}") from None
    return min(len(points), MAX_VALIDATED_POINTS)


def _split_hydra_args(args: Sequence[str]) -> tuple[list[str], str, bool]:
    """(overrides, config name, multirun) from a `tandem.train` command line."""
    overrides, config_name, multirun = [], "config", False
    items = iter(args)
    for arg in items:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            value = next(items, "")
            if arg in ("--config-name", "-cn"):
                config_name = value
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, config_name, multirun


def _sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every combination of a multirun's swept values, as plain override lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override():
            prefix = text[:len(text) - len(text.lstrip("+~"))]
            key = f"{prefix}{override.key_or_group}"
            if override.package:
                key += f"@{override.package}"
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(point) for point in itertools.product(*choices)]


def build_runtime_env(spec: JobSpec, auth_mode: str) -> dict:
    """The Ray runtime_env of the job. `auth_mode` is the cluster's ("token" or "disabled"):
    the driver's `ray.init` must use the same mode as the nodes it attaches to."""
    if spec.pip and spec.uv:
        raise ValueError("choose one of --pip and --uv, not both")
    if spec.stop_wait_s < 1:
        raise ValueError(f"--stop-wait-s must be >= 1, got {spec.stop_wait_s}")
    env_vars = {
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",  # log lines reach `ray job logs` as they are written
        "RAY_AUTH_MODE": auth_mode,
        # read by the job's supervisor, which runs in this runtime_env: SIGTERM, then this
        # long to finish the step and checkpoint before SIGKILL
        "RAY_JOB_STOP_WAIT_TIME_S": str(spec.stop_wait_s),
    }
    if spec.offline:
        env_vars["HF_HUB_OFFLINE"] = "1"
    env_vars.update(spec.env)
    runtime_env: dict = {
        "working_dir": str(spec.working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": env_vars,
    }
    for key, requirements in (("pip", spec.pip), ("uv", spec.uv)):
        if requirements is None:
            continue
        path = Path(requirements).resolve()
        if not path.is_file():
            raise ValueError(f"--{key} {requirements}: no such requirements file")
        runtime_env[key] = str(path)  # Ray reads the file here, before upload
    return runtime_env


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def resolve_address(address: str | None) -> tuple[str, str]:
    """(dashboard URL, where it came from). Ray's own client lets RAY_API_SERVER_ADDRESS /
    RAY_ADDRESS override an explicit address; here an explicit --address wins."""
    if address:
        source = "--address"
    elif os.environ.get("RAY_API_SERVER_ADDRESS"):
        address, source = os.environ["RAY_API_SERVER_ADDRESS"], "RAY_API_SERVER_ADDRESS"
    elif os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    else:
        address, source = DEFAULT_ADDRESS, "the default"
    if not address.startswith(("http://", "https://")):
        raise ValueError(
            f"{source} must be the dashboard URL of the head node, e.g. http://HEAD:8265 "
            f"(not the GCS address HEAD:6379), got {address!r}")
    return address.rstrip("/"), source


def find_token() -> tuple[str, str] | None:
    """(token, where it came from), in the order Ray looks: RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH)
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, str(path)
    return None


def refuse_token_leaks(spec: JobSpec, token: str | None) -> None:
    """Raise if the Ray token would travel inside the job: its entrypoint, runtime_env and
    metadata are stored by the cluster and shown to everyone who can see the dashboard (and the
    overrides land in the run's config.yaml). The nodes must hold the token themselves."""
    if "RAY_AUTH_TOKEN" in spec.env:
        raise ValueError("--env RAY_AUTH_TOKEN would put the cluster's token in the job's "
                         "runtime_env, which the dashboard shows; every node already needs it "
                         "(RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token there)")
    if not token:
        return
    for name, value in spec.env.items():
        if token in value or token in name:
            raise ValueError(f"--env {name}: its value holds the cluster's Ray token, which "
                             "the dashboard would show; pass it through the nodes' environment")
    if any(token in part for part in (spec.python, *spec.overrides)):
        raise ValueError("an override (or --python) holds the cluster's Ray token: the "
                         "entrypoint is shown in the dashboard and written to config.yaml")


def plain_http_warning(address: str) -> str | None:
    """What to say when the token would cross the network unencrypted: `http://` to a host
    that is not this machine's loopback (anyone on the path reads the Bearer header)."""
    parsed = urlparse(address)
    if parsed.scheme != "http":
        return None
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        return None
    return (f"the Ray token goes to {host} over plain http://: anyone on the network path can "
            "read it. Put TLS in front of the dashboard (https://) or use an SSH tunnel "
            "(ssh -L 8265:127.0.0.1:8265 HEAD, then --address http://127.0.0.1:8265)")


# ----------------------------------------------------------------------------- the cluster


def bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run a blocking call (Ray's job client sets no HTTP timeout) with a deadline. On timeout
    the call is abandoned in a daemon thread; this process is a short-lived CLI."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"submit:{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise SubmitError(f"{what}: no answer within {timeout_s:.0f} s (--request-timeout-s)")
    if error:
        raise error[0]
    return result[0]


def cluster_auth_mode(address: str, source: str, timeout_s: float) -> str:
    """Ask the dashboard which auth mode the cluster runs in; doubles as the reachability
    check. This endpoint needs no token."""
    url = f"{address}/api/authentication_mode"
    try:
        response = requests.get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        raise SubmitError(
            f"cannot reach the Ray dashboard at {address} (address from {source}); tried "
            f"GET {url} with a {timeout_s:.0f} s timeout: {type(exc).__name__}: {exc}. Is the "
            "head running, with its dashboard on that port (`ray start --head "
            "--dashboard-port`), bound to an address you can reach (`--dashboard-host`), "
            "and with ray[default] installed? Pass --address http://HEAD:PORT.") from exc
    if response.status_code == 404:
        return "unknown"  # Ray < 2.52: no such endpoint and no token auth
    if response.status_code != 200:
        raise SubmitError(f"GET {url} answered {response.status_code}: {response.text[:200]}")
    return response.json()["authentication_mode"]


def resolve_auth(requested: str, cluster_mode: str) -> tuple[str, dict[str, str]]:
    """(the mode the job runs in, HTTP headers for the job client)."""
    if requested not in AUTH_MODES:
        raise ValueError(f"unknown --auth-mode: {requested!r}; choose one of {AUTH_MODES}")
    mode = requested
    if requested == "auto":
        mode = "token" if cluster_mode == "token" else "disabled"
    elif cluster_mode in ("token", "disabled") and cluster_mode != requested:
        raise SubmitError(
            f"--auth-mode {requested} but the cluster runs with RAY_AUTH_MODE={cluster_mode}; "
            "drop --auth-mode (auto follows the cluster) or restart the cluster")
    if mode == "disabled":
        return mode, {}
    found = find_token()
    if found is None:
        raise SubmitError(
            "the cluster uses token authentication (RAY_AUTH_MODE=token) but no token was "
            f"found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file, or put it in "
            f"{DEFAULT_TOKEN_PATH} (copy it from the head node: `ray get-auth-token`)")
    token, _ = found
    return mode, {"Authorization": f"Bearer {token}"}


def connect(address: str, headers: dict[str, str], timeout_s: float):
    """A JobSubmissionClient for exactly `address`."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
             if k in os.environ}
    try:  # Ray's client would let these variables override the address we resolved
        return bounded(lambda: JobSubmissionClient(address, headers=headers), timeout_s,
                       f"connecting to the Ray job API at {address}")
    finally:
        os.environ.update(saved)


async def _tail(client, job_id: str, deadline: float, out: TextIO) -> None:
    logs = client.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                chunk = await asyncio.wait_for(logs.__anext__(), timeout=remaining)
            except StopAsyncIteration:
                return
            out.write(chunk)
            out.flush()
    finally:
        await logs.aclose()


def follow(client, job_id: str, timeout_s: float, request_timeout_s: float,
           out: TextIO = sys.stdout):
    """Stream the job's logs to `out` until it ends; return its final JobStatus.
    Raises TimeoutError after `timeout_s` (the job keeps running)."""
    deadline = time.monotonic() + timeout_s
    try:
        asyncio.run(_tail(client, job_id, deadline, out))
    except RuntimeError as exc:  # the log websocket dropped (e.g. dashboard restart)
        print(f"submit: lost the log stream ({exc}); polling the job status", file=sys.stderr)
    while True:
        status = bounded(lambda: client.get_job_status(job_id), request_timeout_s,
                         f"status of job {job_id}")
        if status.is_terminal():
            return status
        if time.monotonic() >= deadline:
            raise TimeoutError
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


@dataclass
class Submission:
    job_id: str
    address: str
    auth_mode: str
    entrypoint: str
    runtime_env: dict
    client: object = field(repr=False)

    @property
    def dashboard_url(self) -> str:
        return f"{self.address}/#/jobs/{self.job_id}"


def submit(spec: JobSpec, address: str | None = None, *, auth_mode: str = "auto",
           submission_id: str | None = None, request_timeout_s: float = 60.0) -> Submission:
    """Submit the job and return at once. Raises ValueError for bad overrides (checked before
    the cluster is contacted) or if the job would carry the Ray token, and SubmitError naming
    what was tried."""
    found = find_token()
    refuse_token_leaks(spec, found[0] if found else None)  # before the token meets anything
    validate_overrides(spec.overrides)
    url, source = resolve_address(address)
    cluster_mode = cluster_auth_mode(url, source, request_timeout_s)
    mode, headers = resolve_auth(auth_mode, cluster_mode)
    warning = plain_http_warning(url) if mode == "token" else None
    if warning:
        print(f"submit: warning: {warning}", file=sys.stderr)
    runtime_env = build_runtime_env(spec, mode)
    entrypoint = build_entrypoint(spec)
    try:
        client = connect(url, headers, request_timeout_s)
    except AuthenticationError as exc:
        found = find_token()
        raise SubmitError(
            f"the cluster at {url} refused the token from {found[1] if found else '?'}: "
            f"{exc}") from exc
    job_id = submission_id or f"tandem-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    # Uploading the working directory is part of this call.
    bounded(lambda: client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
        metadata={"tandem_overrides": " ".join(spec.overrides)}),
        request_timeout_s, f"submitting to {url}")
    return Submission(job_id, url, mode, entrypoint, runtime_env, client)


# ----------------------------------------------------------------------------- the CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python cluster/submit.py",
        description="Submit `python -m tandem.train <overrides>` as a Ray job and follow it.",
        epilog="Everything after `--` goes to tandem.train as Hydra overrides.")
    parser.add_argument("--address", help="dashboard URL of the head node (default: "
                        f"$RAY_API_SERVER_ADDRESS, then an http $RAY_ADDRESS, then "
                        f"{DEFAULT_ADDRESS})")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job id and return; do not follow the logs")
    parser.add_argument("--timeout-s", type=float, default=72 * 3600.0,
                        help="stop following after this many seconds; the job keeps running "
                        "(default 72 h, about one paper run)")
    parser.add_argument("--request-timeout-s", type=float, default=60.0,
                        help="bound on each request to the cluster, the upload included")
    parser.add_argument("--auth-mode", choices=AUTH_MODES, default="auto",
                        help="Ray token authentication: auto asks the cluster (default)")
    parser.add_argument("--submission-id", help="job id (default tandem-<time>-<random>)")
    parser.add_argument("--python", default="python",
                        help="interpreter on the nodes (default: python on their PATH)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment variable for the job (repeatable)")
    parser.add_argument("--offline", action="store_true",
                        help="HF_HUB_OFFLINE=1 on the nodes (no hub downloads)")
    deps = parser.add_mutually_exclusive_group()
    deps.add_argument("--pip", metavar="REQUIREMENTS",
                      help="install this requirements file on each node for the job "
                      "(default: none, the nodes' image has the dependencies)")
    deps.add_argument("--uv", metavar="REQUIREMENTS", help="same as --pip, with uv")
    parser.add_argument("--stop-wait-s", type=int, default=DEFAULT_STOP_WAIT_S,
                        help="`ray job stop`: seconds from SIGTERM to SIGKILL, time to finish "
                        f"the step and checkpoint (default {DEFAULT_STOP_WAIT_S}; Ray's is 3)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the entrypoint and runtime_env; contact no cluster")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for tandem.train")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = JobSpec(overrides=list(args.overrides), python=args.python,
                       env=parse_env(args.env), offline=args.offline, pip=args.pip,
                       uv=args.uv, stop_wait_s=args.stop_wait_s)
        if args.dry_run:
            found = find_token()
            refuse_token_leaks(spec, found[0] if found else None)
            checked = validate_overrides(spec.overrides)
            print(f"config: ok ({checked} composed)")
            # auto: the real mode is asked from the cluster at submit time
            mode = "<the cluster's>" if args.auth_mode == "auto" else args.auth_mode
            print(f"entrypoint: {build_entrypoint(spec)}")
            print(f"runtime_env: {json.dumps(build_runtime_env(spec, mode), indent=2)}")
            return EXIT_SUCCEEDED
        job = submit(spec, args.address, auth_mode=args.auth_mode,
                     submission_id=args.submission_id,
                     request_timeout_s=args.request_timeout_s)
    except ValueError as exc:
        print(f"submit: {exc}", file=sys.stderr)
        return 2
    except (SubmitError, RuntimeError, ConnectionError) as exc:
        # RuntimeError/ConnectionError: Ray's client (bad request, token refused, ...)
        print(f"submit: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE

    print(f"submit: job {job.job_id} submitted to {job.address} (auth: {job.auth_mode})")
    print(f"submit: entrypoint: {job.entrypoint}")
    print(f"submit: dashboard: {job.dashboard_url}")
    reattach = f"ray job logs --address {job.address} --follow {job.job_id}"
    if args.no_wait:
        print(f"submit: follow it with `{reattach}`")
        return EXIT_SUCCEEDED
    sys.stdout.flush()
    try:
        status = follow(job.client, job.job_id, args.timeout_s, args.request_timeout_s)
    except TimeoutError:
        print(f"submit: still running after --timeout-s {args.timeout_s:.0f}; the job keeps "
              f"going: `{reattach}`", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        print(f"\nsubmit: stopped following; the job keeps going: `{reattach}`; stop it with "
              f"`ray job stop --address {job.address} {job.job_id}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SubmitError, RuntimeError, ConnectionError) as exc:
        print(f"submit: lost the cluster while following {job.job_id}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"submit: job {job.job_id} {status.value}")
    return EXIT_SUCCEEDED if status.value == "SUCCEEDED" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
