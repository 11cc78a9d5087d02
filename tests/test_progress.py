"""Progress from the Python API: shown on a terminal (or when asked), never left configured,
and other libraries' noise that kiln's own imports cause kept out of the user's way."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import torch

import kiln


def _tiny():
    return torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(), torch.randn(2, 8)


def test_progress_true_prints_each_stage_on_stderr_and_leaves_the_kiln_logger_as_it_was(capfd):
    logger = logging.getLogger("kiln")
    handlers, level = list(logger.handlers), logger.level
    model, x = _tiny()
    kiln.optimize(model, "cpu-x86", x, backend="onnxruntime", cache=False, progress=True)
    err = capfd.readouterr().err
    for stage in ("profile", "capture", "passes", "compile", "verify"):
        assert f"] {stage} done in" in err, err
    assert logger.handlers == handlers and logger.level == level


def test_progress_false_prints_nothing(capfd):
    model, x = _tiny()
    kiln.optimize(model, "cpu-x86", x, backend="onnxruntime", cache=False, progress=False)
    assert "[kiln" not in capfd.readouterr().err


def test_a_script_whose_stderr_is_not_a_terminal_gets_no_progress_and_no_torchao_noise(tmp_path):
    script = textwrap.dedent("""
        import torch, kiln
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
        samples = [torch.randn(4, 64) for _ in range(4)]
        compiled = kiln.optimize(model, "cpu-x86", samples[0], backend="inductor", precision="int8", calibration=samples,
                                 accuracy_budget=kiln.Budget(min_cosine=0.99), cache=False, isolate=False)
        print("built", compiled.report.precision_summary[:40])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "built precision=int8: int8-static" in done.stdout
    assert "[kiln" not in done.stderr
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr[-2000:]


def test_a_long_step_says_how_long_it_has_run_and_what_is_left_from_this_host_s_last_run(caplog, monkeypatch):
    import time

    from kiln import progress

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.05)
    with caplog.at_level(logging.INFO, logger="kiln"):
        with progress.heartbeat("building onnxruntime for partition p0", expected_seconds=30.0):
            time.sleep(0.3)
        with progress.heartbeat("building openvino for partition p0"):
            time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records]
    assert any("building onnxruntime for partition p0" in line and "s left (30 s last time on this host)" in line for line in lines)
    assert any("building openvino for partition p0" in line and "so far" in line for line in lines)
    assert sum("done in" in line for line in lines) == 2
