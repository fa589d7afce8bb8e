"""Which transport a cluster config picks, and how pushes cut the weights into buckets: no
engine or learner needed (the pushes themselves: tests/transport/test_weight_sync.py)."""

from __future__ import annotations

import pytest

from tandem.config.compose import compose
from tandem.transport.base import make_transport
from tandem.transport.buckets import plan_buckets
from tandem.transport.cpu import CpuTransport
from tandem.transport.ipc import CudaIpcTransport
from tandem.transport.nccl import BroadcastTransport


def test_buckets_respect_the_size_and_keep_order():
    sizes = [("a", 40), ("b", 40), ("c", 30), ("d", 200), ("e", 10)]
    buckets = plan_buckets(sizes, bucket_bytes=100)
    assert buckets == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [n for bucket in buckets for n in bucket] == [n for n, _ in sizes]
    assert plan_buckets(sizes, bucket_bytes=10**9) == [["a", "b", "c", "d", "e"]]


def test_transport_follows_the_cluster_config():
    assert isinstance(make_transport(compose(["cluster=local_cpu"]).cluster, "float32"),
                      CpuTransport)
    nccl = make_transport(compose(["cluster=multi_node"]).cluster, "bfloat16")
    assert isinstance(nccl, BroadcastTransport) and nccl.name == "nccl"
    ipc = make_transport(compose(["cluster=single_gpu"]).cluster, "bfloat16")
    assert isinstance(ipc, CudaIpcTransport) and ipc.dtype == "bfloat16"
    auto = compose(["cluster=single_gpu", "cluster.weight_transport=auto"]).cluster
    assert isinstance(make_transport(auto, "bfloat16"), CudaIpcTransport)  # colocated
    cluster = compose(["cluster=local_cpu"]).cluster
    cluster.weight_transport = "carrier_pigeon"  # past the schema's own check
    with pytest.raises(ValueError, match="unknown weight transport: 'carrier_pigeon'"):
        make_transport(cluster, "float32")
