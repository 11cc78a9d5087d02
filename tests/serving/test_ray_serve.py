"""`kiln.serving.deployment` on a real local Ray instance: two replicas, each loading the
artifact once, batching concurrent requests with @serve.batch; JSON and .npz bodies over HTTP
and DeploymentHandle calls answer what the artifact answers directly; bad requests get HTTP 400
naming the input and the expected spec while the replicas keep serving.

One Ray instance for the module (3 logical CPUs, no dashboard), shut down at its end; the HTTP port
is a free one, not Ray's default 8000."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
import torch

import kiln
from kiln.errors import ServingError
from kiln.serving import deployment
from kiln.verify import TOLERANCE
from serving import serving_models
from serving.serving_models import example
from serving.serving_models import concurrently, free_port

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

FP32 = TOLERANCE[kiln.Precision.FP32]



@pytest.fixture(scope="module")
def app(ort_artifact):
    port, metrics_port = free_port(), free_port()
    # 3 logical CPUs: the two-replica app holds two, the padded app of one test takes the third
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(deployment(ort_artifact, replicas=2, max_batch=8, batch_wait_ms=50), name="masked",
                           route_prefix="/masked")
        yield type("App", (), {"url": f"http://127.0.0.1:{port}/masked", "handle": handle,
                               "metrics": f"http://127.0.0.1:{metrics_port}/metrics"})
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def direct(ort_artifact):
    return kiln.load(ort_artifact)


def as_json(x: torch.Tensor, mask: torch.Tensor) -> dict:
    return {"inputs": {"x": x.tolist(), "mask": mask.tolist()}}


def as_npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def check(outputs: dict, direct, x, mask) -> None:
    want = direct(x, mask)
    np.testing.assert_allclose(np.asarray(outputs["output.tokens"], np.float32), want["tokens"].numpy(), rtol=FP32.rtol, atol=FP32.atol)
    np.testing.assert_allclose(np.asarray(outputs["output.pooled"], np.float32), want["pooled"].numpy(), rtol=FP32.rtol, atol=FP32.atol)



def test_concurrent_json_requests_are_batched_across_two_replicas_and_answered_as_the_artifact_does(app, direct):
    inputs = [example(1, seq=6, seed=seed) for seed in range(16)]
    responses = concurrently([lambda body=as_json(*r): requests.post(app.url, json=body, timeout=60) for r in inputs])
    assert [r.status_code for r in responses] == [200] * 16
    for response, (x, mask) in zip(responses, inputs):
        check(response.json()["outputs"], direct, x, mask)
    print("batch requests per answer:", sorted(int(r.headers["x-kiln-batch-requests"]) for r in responses))
    assert max(int(r.headers["x-kiln-batch-requests"]) for r in responses) > 1, "no two requests shared an engine call"
    assert len({r.headers["x-kiln-replica"] for r in responses}) == 2


def test_an_npz_body_gets_an_npz_answer(app, direct):
    x, mask = example(3, seq=4, seed=5)
    response = requests.post(app.url, data=as_npz(x=x.numpy(), mask=mask.numpy()),
                             headers={"content-type": "application/x-npz"}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(response.content), allow_pickle=False) as answer:
        check({name: answer[name] for name in answer.files}, direct, x, mask)


def test_a_deployment_handle_call_returns_the_named_outputs(app, direct):
    x, mask = example(2, seq=7, seed=6)
    outputs = app.handle.infer.remote(x, mask).result(timeout_s=60)
    assert set(outputs) == {"output.tokens", "output.pooled"}
    check({k: v.numpy() for k, v in outputs.items()}, direct, x, mask)


@pytest.mark.parametrize("body, content_type, expected", [
    (b'{"inputs": {"x": [[[0.0', "application/json", "body is not valid JSON"),
    (json.dumps({"inputs": {"x": [[[0.0] * 8]]}}).encode(), "application/json", "input 'mask' is missing"),
    (json.dumps({"inputs": {"x": [[[0.0] * 8]], "mask": [[1.0]], "extra": [1]}}).encode(), "application/json", "unknown input 'extra'"),
    (json.dumps({"inputs": {"x": [[[0.0] * 8]], "mask": [[1.0, 1.0]]}}).encode(), "application/json", "dim 'seq' is 2 here but 1 in input 'x'"),
    (json.dumps({"inputs": {"x": [[0.0] * 8], "mask": [[1.0]]}}).encode(), "application/json", "input 'x': rank 2"),
    (as_npz(x=np.zeros((1, 2, 8)), mask=np.ones((1, 2), np.float32)), "application/x-npz", "input 'x': dtype torch.float64"),
    (as_npz(x=np.zeros((9, 2, 8), np.float32), mask=np.ones((9, 2), np.float32)), "application/x-npz", "9 rows, more than the 8"),
    (as_npz(x=np.zeros((1, 2, 8), np.float32), mask=np.ones((1, 2), np.float32))[:-30], "application/x-npz", "not a readable .npz"),
])
def test_a_bad_request_gets_400_naming_the_input_and_the_replicas_keep_serving(app, direct, body, content_type, expected):
    response = requests.post(app.url, data=body, headers={"content-type": content_type}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert expected in error
    if "rows" not in expected:  # the spec of what to send, except for a request that is only too long
        assert "float32[batch[1..32]xseq[1..16]" in error
    x, mask = example(1, seq=3, seed=9)
    good = requests.post(app.url, json=as_json(x, mask), timeout=60)
    assert good.status_code == 200
    check(good.json()["outputs"], direct, x, mask)


def test_a_static_batch_artifact_is_refused_before_ray_starts_anything(tmp_path):
    static = serving_models.compile_masked(tmp_path / "static.kiln", "onnxruntime", dynamic=None)
    with pytest.raises(ServingError, match="input 'x' has a static batch of 2 on axis 0") as caught:
        deployment(static)
    assert "dynamic={'x': {0: 'batch'}, 'mask': {0: 'batch'}}" in caught.value.fix


def test_loadtest_reports_each_concurrency_with_the_batches_the_server_formed(app, ort_artifact, tmp_path, capsys):
    from kiln.cli import main

    rc = main(["loadtest", app.url, "--artifact", str(ort_artifact), "--concurrency", "1,4", "--duration", "1",
               "--json", "--plot", str(tmp_path / "curve.png")])
    results = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["concurrency"] for r in results] == [1, 4]
    for r in results:
        assert r["requests"] > 0 and r["errors"] == 0 and r["first_error"] is None
        assert r["p50_ms"] <= r["p99_ms"] and r["mean_batch_requests"] >= 1
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loadtest_counts_refused_requests_as_errors_with_the_servers_reason(app, tmp_path, capsys):
    from kiln.cli import main

    (tmp_path / "bad.json").write_text('{"inputs": {"x": [[[0.5]]]}}')
    rc = main(["loadtest", app.url, "--body", str(tmp_path / "bad.json"), "--concurrency", "2", "--duration", "0.5"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "first error: HTTP Error 400" in out and "input 'mask' is missing" in out


def test_with_seq_padding_requests_of_mixed_lengths_share_calls_and_each_gets_its_own_answer(app, ort_artifact, direct):
    serve.run(deployment(ort_artifact, replicas=1, max_batch=16, batch_wait_ms=100, pad={"seq": "mask"}), name="padded",
              route_prefix="/padded")
    url = app.url.replace("/masked", "/padded")
    inputs = [example(1, seq=3 + seed % 5, seed=200 + seed) for seed in range(10)]
    try:
        responses = concurrently([lambda body=as_json(*r): requests.post(url, json=body, timeout=60) for r in inputs])
    finally:
        serve.delete("padded")
    assert [r.status_code for r in responses] == [200] * len(inputs)
    for response, (x, mask) in zip(responses, inputs):
        assert np.asarray(response.json()["outputs"]["output.tokens"]).shape == (1, x.shape[1], 3)
        check(response.json()["outputs"], direct, x, mask)
    shared = [int(r.headers["x-kiln-batch-requests"]) for r in responses]
    lengths = {(x.shape[1]) for x, _ in inputs}
    assert max(shared) > 1 and len(lengths) == 5


def test_a_pad_naming_a_dim_the_model_lacks_is_refused_before_ray_starts_anything(ort_artifact):
    with pytest.raises(ServingError, match="cannot pad dim 'length'"):
        deployment(ort_artifact, pad={"length": "mask"})


def test_batch_sizes_and_refusals_reach_ray_prometheus_metrics(app):
    """Last in the module: the tests above formed batches and were refused requests. Ray
    exports custom metrics every few seconds, so this waits for them (no timing is asserted)."""
    import re
    import time

    def total(text: str, name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^ray_{name}(?:_total)?{{[^}}]*}} ([0-9.e+]+)$", text, re.M))

    deadline = time.monotonic() + 120
    while True:
        text = requests.get(app.metrics, timeout=10).text
        batches, rows, refused = (total(text, n) for n in ("kiln_batch_requests_count", "kiln_batch_rows_sum", "kiln_refused_requests"))
        if (batches and refused) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert batches > 0 and rows >= batches and refused > 0, [line for line in text.splitlines() if "kiln_" in line][:10]
