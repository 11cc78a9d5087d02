"""Candidate builds in child processes: a crash, a hang or an out-of-memory in one candidate
is recorded and the search goes on with the others."""

import pytest
import torch
from torch import nn

import kiln
from kiln.backends import registry

import support_backends


@pytest.fixture
def misbehaving(monkeypatch):
    """Register the misbehaving backends next to the real ones for this test only."""
    table = dict(registry.BACKENDS)
    for cls in (support_backends.SegfaultingBackend, support_backends.HangingBackend,
                support_backends.MemoryHungryBackend, support_backends.RaisingBackend):
        table[cls.name] = f"support_backends:{cls.__name__}"
    monkeypatch.setattr(registry, "BACKENDS", table)


def _compile(candidates, **options):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU()).eval()
    profile_options = dict(select="measure", isolate=True, cache=False, verify_draws=0, measure_seconds=0.05)
    profile_options.update(options)
    # a profile whose cpu prefers the given candidates, then onnxruntime
    from dataclasses import replace

    profile = kiln.hardware_profiles.load("cpu-x86")
    device = replace(profile.primary, backends=(*candidates, "onnxruntime"))
    profile = replace(profile, devices={"cpu": device})
    return kiln.optimize(model, profile, (torch.randn(2, 6),), **profile_options)


def _record(compiled, backend):
    return next(c for c in compiled.report.candidates if c.backend == backend)


def test_a_segfaulting_build_is_recorded_with_its_signal_and_the_search_goes_on(misbehaving):
    compiled = _compile(["segfaulting"])
    record = _record(compiled, "segfaulting")
    assert record.status == "failed" and "SIGSEGV" in record.reason and "about to crash" in record.reason
    assert compiled.backends == {"p0": "onnxruntime"}


def test_a_hanging_build_is_stopped_at_its_time_budget(misbehaving):
    compiled = _compile(["hanging"], build_timeout_s=25)  # room for onnxruntime's real build after it
    record = _record(compiled, "hanging")
    assert record.status == "failed" and "25 s budget" in record.reason
    assert compiled.backends == {"p0": "onnxruntime"}


def test_a_build_past_its_memory_budget_fails_alone(misbehaving):
    compiled = _compile(["memory_hungry"], build_memory_mb=1500)
    record = _record(compiled, "memory_hungry")
    assert record.status == "failed" and "MemoryError" in record.reason
    assert compiled.backends == {"p0": "onnxruntime"}


def test_an_exception_in_the_child_build_is_reported_with_its_message(misbehaving):
    compiled = _compile(["raising"])
    assert "exporter exploded" in _record(compiled, "raising").reason


def test_the_overall_time_budget_skips_candidates_not_yet_started(misbehaving):
    # two candidates build side by side: onnxruntime, third, waits for the segfaulting one's slot,
    # which frees only after its child's imports, past the 2 s budget
    with pytest.raises(kiln.BackendUnavailable) as info:
        _compile(["hanging", "segfaulting"], build_timeout_s=3, time_budget_s=2)
    message = str(info.value)
    assert "hanging: failed" in message and "segfaulting: failed" in message
    assert "onnxruntime: skipped" in message and "time_budget_s" in message


@pytest.mark.parametrize("options, ahead", [
    ({"precision": "fp32"}, 1),  # several backends measured, no analysis to slow: one child imports during capture
    ({"precision": "fp32", "effort": "fast"}, 0),  # one candidate, built in this process
    ({"precision": "fp32", "backend": "onnxruntime"}, 0),
    ({"precision": "fp32", "isolate": False}, 0),
    ({}, 0),  # precision="auto": the children's imports would slow its analysis
], ids=["fp32", "fast", "forced backend", "isolate off", "auto"])
def test_a_compile_that_will_build_in_children_starts_one_before_capture(options, ahead):
    from kiln.api import _build_workers
    from kiln.hardware_profiles import load

    pool = _build_workers(kiln.CompileOptions(**options), load("cpu-x86"))
    try:
        assert len(pool._idle) == ahead
    finally:
        pool.close()


def test_a_worker_started_ahead_is_stopped_when_the_build_runs_in_this_process():
    from kiln.build.isolate import WorkerPool

    pool = WorkerPool(("onnxruntime",))
    try:
        pool.expect(1, ahead=1)
        (started,) = pool._idle
        pool.release_idle()
        assert not pool._idle and started.process.poll() is not None
    finally:
        pool.close()


def test_a_candidate_that_cannot_build_here_does_not_count_toward_building_in_children(caplog):
    import logging
    from dataclasses import replace

    pytest.importorskip("openvino")
    profile = kiln.hardware_profiles.load("cpu-x86")
    profile = replace(profile, devices={"cpu": replace(profile.primary, backends=("onnxruntime", "openvino"))})
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU()).eval()
    with caplog.at_level(logging.INFO, logger="kiln"):
        # kiln's ONNX Runtime path does not lower bf16: OpenVINO is the one candidate to build
        compiled = kiln.optimize(model, profile, (torch.randn(2, 6),), precision="bf16", select="measure", effort="max",
                                 cache=False)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("building partition"))
    assert "candidates onnxruntime, openvino" in line and "child process" not in line
    assert _record(compiled, "onnxruntime").status == "unsupported" and compiled.backends == {"p0": "openvino"}


def test_the_partition_files_a_child_reads_load_back_and_leave_torch_s_checksum_setting_alone(tmp_path):
    from kiln.build.isolate import PartitionFiles

    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU()).eval()
    x = torch.randn(2, 6)
    compiled = kiln.optimize(model, "cpu-x86", (x,), precision="fp32", backend="onnxruntime", cache=False, verify=False)
    partition = compiled.plan.partitions[0].graph
    files = PartitionFiles.write(partition, [(x,)], [(model(x),)], tmp_path)
    assert torch.serialization.get_crc32_options() is True  # the user's setting, restored
    out = torch.export.load(files.program).module()(x)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, model(x))
    assert torch.equal(torch.load(files.verify)["draws"][0][0], x)
