"""`kiln serve` in a subprocess, as a shell runs it: it starts a local Ray instance, serves the
artifact at http://HOST:PORT/NAME with batching, answers as the artifact does, and on Ctrl-C
takes Ray down again and exits 0. Refusals are one line, before Ray starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

import kiln
from kiln.verify import TOLERANCE
from serving import serving_models
from serving.serving_models import example
from serving.serving_models import free_port

pytest.importorskip("ray")
FP32 = TOLERANCE[kiln.Precision.FP32]



def test_kiln_serve_answers_over_http_and_stops_cleanly_on_ctrl_c(ort_artifact, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(ort_artifact), "--replicas", "2",
                                    "--max-batch", "8", "--batch-wait-ms", "20", "--port", str(port), "--name", "masked"],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        deadline = time.monotonic() + 180
        while "serving " not in log.read_text():
            assert process.poll() is None, f"kiln serve exited {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"kiln serve not up after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert f"at http://127.0.0.1:{port}/masked (2 replicas, batches of up to 8 rows" in log.read_text()
        x, mask = example(2, seq=5, seed=3)
        response = requests.post(f"http://127.0.0.1:{port}/masked", json={"inputs": {"x": x.tolist(), "mask": mask.tolist()}},
                                 timeout=60)
        assert response.status_code == 200
        want = kiln.load(ort_artifact)(x, mask)
        np.testing.assert_allclose(np.asarray(response.json()["outputs"]["output.pooled"], np.float32), want["pooled"].numpy(),
                                   rtol=FP32.rtol, atol=FP32.atol)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_kiln_serve_refuses_a_static_batch_in_one_line_before_ray_starts(tmp_path):
    static = serving_models.compile_masked(tmp_path / "static.kiln", "onnxruntime", dynamic=None)
    run = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", str(static)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error:")
    assert "input 'x' has a static batch of 2 on axis 0" in lines[0] and "dynamic={'x': {0: 'batch'}" in lines[0]
