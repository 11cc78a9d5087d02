"""Two Ray nodes on this machine (Ray's own test utility, ray.cluster_utils.Cluster, one CPU
each): a two-replica kiln deployment places one replica on each node, and requests through
the head's HTTP proxy are answered by both, each answer equal to the artifact's. This is the
path `kiln serve --address` takes: a deployment on a cluster Ray already runs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

import kiln
from kiln.serving import deployment
from kiln.verify import TOLERANCE
from serving.serving_models import example
from serving.serving_models import free_port

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

FP32 = TOLERANCE[kiln.Precision.FP32]



@pytest.fixture(scope="module")
def cluster():
    # The proxy sends requests to replicas on its own node while they have room; on a real
    # cluster each node runs a proxy. With one proxy here, let it spread requests over both.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
        yield from _cluster()


def _cluster():
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
        yield nodes
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            nodes.shutdown()


def test_replicas_on_two_nodes_both_answer_as_the_artifact_does(cluster, ort_artifact):
    port = free_port()
    # one proxy, on the head: both nodes share this machine's ports
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(ort_artifact, replicas=2, max_batch=8, batch_wait_ms=20, num_cpus=1), name="masked",
              route_prefix="/masked")
    direct = kiln.load(ort_artifact)
    inputs = [example(1 + seed % 2, seq=4, seed=seed) for seed in range(16)]
    start = threading.Barrier(len(inputs))

    def post(x, mask):
        start.wait()
        return requests.post(f"http://127.0.0.1:{port}/masked", json={"inputs": {"x": x.tolist(), "mask": mask.tolist()}},
                             timeout=60)

    with ThreadPoolExecutor(len(inputs)) as pool:
        responses = list(pool.map(lambda r: post(*r), inputs))
    assert [r.status_code for r in responses] == [200] * len(inputs)
    for response, (x, mask) in zip(responses, inputs):
        want = direct(x, mask)
        np.testing.assert_allclose(np.asarray(response.json()["outputs"]["output.tokens"], np.float32), want["tokens"].numpy(),
                                   rtol=FP32.rtol, atol=FP32.atol)
    node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    answered_by = {r.headers["x-kiln-node"] for r in responses}
    assert len(node_ids) == 2 and answered_by == node_ids
