"""A real Triton Inference Server serves a kiln python-backend repository: concurrent requests
over HTTP and gRPC are batched by Triton's dynamic batcher, every answer equals the artifact
called directly, and a bad request gets an error naming the input while the others are served.

The server is the tritonserver 2.51 binary that the nvidia-pytriton wheel bundles (python
backend only), in a virtual environment of its own built by scripts/pytriton_env.sh (it needs
numpy<2). The python backend's stub runs model.py in that environment's interpreter, where
kiln is installed from this checkout. The module is skipped only when that environment cannot
be built, with the reason."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import kiln
from kiln.serving import triton_repository
from kiln.verify import TOLERANCE
from serving.serving_models import example
from serving.serving_models import concurrently, free_port

REPO = Path(__file__).resolve().parents[2]
FP32 = TOLERANCE[kiln.Precision.FP32]
MODEL = "masked"


@pytest.fixture(scope="module")
def pytriton_python() -> Path:
    try:
        built = subprocess.run(["bash", str(REPO / "scripts" / "pytriton_env.sh")], capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.skip("the PyTriton environment could not be built in 30 minutes (scripts/pytriton_env.sh)")
    if built.returncode != 0:
        tail = " ".join(built.stderr.strip().splitlines()[-3:])[-400:]
        pytest.skip(f"the PyTriton environment could not be built (scripts/pytriton_env.sh exited {built.returncode}): {tail}")
    return Path(built.stdout.strip().splitlines()[-1])



def _ask(python: Path, code: str) -> str:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def server_layout(python: Path, target: Path) -> tuple[Path, Path, dict]:
    """tritonserver, a backend folder holding the python backend with the stub built for the
    environment's Python version (PyTriton ships one stub per version), and the environment
    the stub needs: the interpreter's own libpython first on the library path (else the stub
    may load another), and the environment's bin first on PATH."""
    package = Path(_ask(python, "import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent)"))
    version = _ask(python, "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    libdir = _ask(python, "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
    server = package / "tritonserver"
    backend = target / "backends" / "python"
    backend.mkdir(parents=True)
    for item in (server / "backends" / "python").iterdir():
        if item.is_file():
            (backend / item.name).symlink_to(item)
    (backend / "triton_python_backend_stub").symlink_to(server / "python_backend_stubs" / version / "triton_python_backend_stub")
    libs = package.parent / "nvidia_pytriton.libs"
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [libdir, str(libs), os.environ.get("LD_LIBRARY_PATH")]))}
    env.pop("PYTHONPATH", None)
    return server / "bin" / "tritonserver", target / "backends", env


@pytest.fixture(scope="module")
def server(pytriton_python, ort_artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    # a 20 ms queue delay: long enough for concurrent requests to meet in one batch on a busy 2-core machine
    export = triton_repository(ort_artifact, root / "models", name=MODEL, backend="python", max_batch=32,
                               max_queue_delay_us=20_000)
    binary, backends, env = server_layout(pytriton_python, root)
    ports = SimpleNamespace(http=free_port(), grpc=free_port(), metrics=free_port())
    log = root / "tritonserver.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(binary), "--model-repository", str(root / "models"), "--backend-directory", str(backends),
                                    "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
                                    "--metrics-port", str(ports.metrics), "--exit-timeout-secs", "5"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}")
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"tritonserver exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if client.is_model_ready(MODEL):
                    break
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"model {MODEL} not ready after 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield SimpleNamespace(http=f"127.0.0.1:{ports.http}", grpc=f"127.0.0.1:{ports.grpc}", log=log, export=export)
    finally:
        # the python backend's stubs are children of the server, in its process group
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def direct(ort_artifact):
    return kiln.load(ort_artifact)


def statistics(url: str) -> tuple[int, int]:
    """(requests answered, model executions) so far, from Triton's statistics endpoint."""
    stats = httpclient.InferenceServerClient(url).get_inference_statistics(MODEL)["model_stats"][0]
    return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"])


def request(module, x: torch.Tensor, mask: torch.Tensor) -> list:
    inputs = [module.InferInput("x", list(x.shape), "FP32"), module.InferInput("mask", list(mask.shape), "FP32")]
    inputs[0].set_data_from_numpy(x.numpy())
    inputs[1].set_data_from_numpy(mask.numpy())
    return inputs


def check_answer(result, direct, x, mask) -> None:
    want = direct(x, mask)
    np.testing.assert_allclose(result.as_numpy("output.tokens"), want["tokens"].numpy(), rtol=FP32.rtol, atol=FP32.atol)
    np.testing.assert_allclose(result.as_numpy("output.pooled"), want["pooled"].numpy(), rtol=FP32.rtol, atol=FP32.atol)



def test_concurrent_http_requests_are_batched_and_each_answer_equals_the_artifact(server, direct):
    requests = [example(1, seq=6, seed=seed) for seed in range(24)]
    answered, executed = statistics(server.http)

    def call(x, mask):
        return lambda: httpclient.InferenceServerClient(server.http).infer(MODEL, request(httpclient, x, mask))

    results = concurrently([call(*r) for r in requests])
    for result, (x, mask) in zip(results, requests):
        check_answer(result, direct, x, mask)
    now_answered, now_executed = statistics(server.http)
    print(f"HTTP: {now_answered - answered} requests ran in {now_executed - executed} executions")
    assert now_answered - answered == 24
    assert now_executed - executed < 24, "Triton ran every request on its own: no batch was formed"


def test_concurrent_grpc_requests_of_mixed_lengths_and_rows_each_get_their_own_answer(server, direct):
    requests = [example(1 + seed % 3, seq=(3, 6)[seed % 2], seed=100 + seed) for seed in range(16)]
    answered, executed = statistics(server.http)

    def call(x, mask):
        return lambda: grpcclient.InferenceServerClient(server.grpc).infer(MODEL, request(grpcclient, x, mask))

    results = concurrently([call(*r) for r in requests])
    for result, (x, mask) in zip(results, requests):
        check_answer(result, direct, x, mask)
    now_answered, now_executed = statistics(server.http)
    print(f"gRPC: {now_answered - answered} requests ran in {now_executed - executed} executions")
    assert now_answered - answered == 16
    assert now_executed - executed < 16


def test_bad_requests_get_an_error_naming_the_input_and_the_server_keeps_serving(server, direct):
    client = httpclient.InferenceServerClient(server.http)
    x, mask = example(2, seq=5, seed=7)
    with pytest.raises(InferenceServerException, match="dim 'seq' is 4 here but 5 in input 'x'"):
        client.infer(MODEL, request(httpclient, x, mask[:, :4]))  # kiln's check, inside the model
    wrong = [httpclient.InferInput("x", list(x.shape), "FP64"), request(httpclient, x, mask)[1]]
    wrong[0].set_data_from_numpy(x.double().numpy())
    with pytest.raises(InferenceServerException, match="'x'.*FP64"):
        client.infer(MODEL, wrong)  # Triton's check, from config.pbtxt
    big_x, big_mask = example(33, seq=5, seed=8)
    with pytest.raises(InferenceServerException, match="batch"):
        client.infer(MODEL, request(httpclient, big_x, big_mask))
    check_answer(client.infer(MODEL, request(httpclient, x, mask)), direct, x, mask)


def test_loadtest_drives_the_triton_server_with_a_body_drawn_from_the_artifact(server, ort_artifact):
    from kiln.serving import loadtest

    url = f"http://{server.http}/v2/models/{MODEL}/infer"
    result = loadtest.run_load(url, loadtest.body_for(ort_artifact, url, rows=2), concurrency=4, duration_s=1.0)
    assert result.requests > 0 and result.errors == 0, result.first_error
    assert result.mean_batch_requests is None  # Triton does not say; its statistics do (see above)
