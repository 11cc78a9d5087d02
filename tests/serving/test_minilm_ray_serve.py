"""MiniLM (real weights) on Ray Serve across two Ray nodes (ray.cluster_utils.Cluster, one CPU
each, one replica on each): concurrent sentences of four lengths over HTTP, batched with their
length padded, each embedding equal to the artifact's answer for the sentence alone, and both
nodes' replicas answering."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests as http

import kiln
from kiln.serving import deployment
from kiln.verify import TOLERANCE
from serving.serving_models import free_port

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

FP32 = TOLERANCE[kiln.Precision.FP32]



@pytest.mark.slow
def test_minilm_on_two_nodes_answers_mixed_lengths_batched_as_the_artifact_does(minilm_sentences, monkeypatch):
    path, sentences = minilm_sentences
    monkeypatch.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")  # one proxy: spread over both nodes
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(path, replicas=2, max_batch=16, batch_wait_ms=50, pad={"seq": "attention_mask"}),
                  name="minilm", route_prefix="/minilm")
        inputs = [sentences[i % len(sentences)] for i in range(16)]
        start = threading.Barrier(len(inputs))

        def post(ids, mask):
            start.wait()
            return http.post(f"http://127.0.0.1:{port}/minilm", timeout=120,
                             json={"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}})

        with ThreadPoolExecutor(len(inputs)) as pool:
            responses = list(pool.map(lambda r: post(*r), inputs))
        node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            nodes.shutdown()
    assert [r.status_code for r in responses] == [200] * len(inputs)
    direct = kiln.load(path)
    for response, (ids, mask) in zip(responses, inputs):
        want = direct(ids, mask).numpy()
        np.testing.assert_allclose(np.asarray(response.json()["outputs"]["output"], np.float32), want, rtol=FP32.rtol, atol=FP32.atol)
    assert max(int(r.headers["x-kiln-batch-requests"]) for r in responses) > 1
    assert {r.headers["x-kiln-node"] for r in responses} == node_ids and len(node_ids) == 2
