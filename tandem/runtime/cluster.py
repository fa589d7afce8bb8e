"""Connecting the driver to a Ray cluster, and leaving it.

`connect` joins the cluster named by RAY_ADDRESS (what `ray job submit` sets) or starts a local
one sized for the topology, and shuts Ray down on exit only if it started it here. `wait` is
the driver's `ray.get`: bounded, and a signal stops it at once.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from tandem.config.schema import TandemConfig
from tandem.runtime.placement import demand


@contextlib.contextmanager
def connect(config: TandemConfig) -> Iterator[str]:
    """Attach to RAY_ADDRESS's cluster, or start a local one; yields a line for the set-up log.
    An already initialised Ray (a test's, a notebook's) is used as is and left running."""
    if ray.is_initialized():
        yield "ray: using the already initialised cluster"
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A submitted job brings its own runtime_env (cluster/submit.py); Ray refuses to merge
        # a second one into it.
        ray.init(address=address, log_to_driver=True)
        where = f"connected to {address}"
    else:
        # Logical CPUs: the topology's bundles may exceed the physical cores (engines are
        # pinned to their own cores and the learner trains while they idle).
        cpus = max(os.cpu_count() or 1, int(demand(config.cluster)["CPU"]))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        where = "started a local cluster"
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        yield (f"ray: {where}: {nodes} node(s), {resources.get('CPU', 0):g} CPU, "
               f"{resources.get('GPU', 0):g} GPU")
    finally:
        if not address:
            ray.shutdown()


POLL_S = 0.5
"""How long the driver stays inside Ray's C++ at a time while it waits."""


def wait(refs: Sequence[Any], timeout_s: float | None) -> list[Any]:
    """`ray.get(refs, timeout=timeout_s)`, waited for in slices of `POLL_S`. Python runs signal
    handlers only between bytecodes, and Ray's own wait does not return to run them: a SIGTERM
    to a driver waiting on a minute-long engine start would be seen only after it. Raises
    `ray.exceptions.GetTimeoutError` after `timeout_s`, or a task's error at once."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        slice_s = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
        if slice_s <= 0:
            raise ray.exceptions.GetTimeoutError(
                f"{len(pending)} of {len(refs)} remote call(s) unfinished after {timeout_s} s")
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=slice_s)
        if ready:
            ray.get(ready)  # a failed call raises now, not after the others
    return ray.get(list(refs))
