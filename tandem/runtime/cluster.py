"""Connecting the driver to a Ray cluster, and leaving it.

`connect` joins the cluster named by RAY_ADDRESS (what `ray job submit` sets) or starts a local
one sized for the topology, and shuts Ray down on exit only if it started it here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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
