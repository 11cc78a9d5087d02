"""CompiledModel.__call__ from many threads at once, per backend: nothing lost, nothing crossed,
nothing overwritten.

One small Conv + Linear + LayerNorm model with a dynamic batch and dict outputs is compiled
once per backend for the module. Every call gets its own input (its own values, and a batch
size that differs from the other threads' at the same step), and every output is checked
against the eager result for exactly that input at kiln's fp32 tolerance. Expected outputs are
computed up front in the main thread, so only the compiled model runs under contention.

What the backends promise, and what was measured when this file was written:
- ONNX Runtime: "Multiple threads can invoke the Run() method on the same inference session
  object" (onnxruntime docs/HighLevelDesign.md, "Key design decisions"); the Python binding
  drops the GIL around Run ("release GIL to allow multiple python threads to invoke Run() in
  parallel", onnxruntime/python/onnxruntime_pybind_state.cc), so calls really overlap.
- AOTInductor: torch._inductor.aoti_load_package(path) gives an AOTICompiledModel over one
  AOTIModelPackageLoader built with run_single_threaded=False and num_runners=1
  (torch/_inductor/package/package.py load_package), i.e. a thread-aware
  AOTInductorModelContainer with one model instance: run() takes model_exec_mutex_ shared, and a
  second caller blocks in get_available_model() until the first hands the instance back
  (torch/include/torch/csrc/inductor/aoti_runtime/model_container.h); first-run constant folding
  is double-checked under the exclusive lock. Above that, the Python binding's boxed_run
  (torch/csrc/inductor/aoti_package/pybind.cpp) keeps the GIL for the whole call. So Inductor
  calls are serialized: correct, but threads give no parallel speed-up.
- OpenVINO: an InferRequest runs one inference at a time; kiln's engine lends each call an idle
  request from a pool (creating one when all are busy) and asks for outputs the request does
  not own (share_outputs=False), so concurrent calls neither share buffers nor see later
  results.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import kiln
from kiln.verify import TOLERANCE

FP32 = TOLERANCE[kiln.Precision.FP32]
THREADS = 8
MAX_BATCH = 16
# Calls per thread in the load test: 8 x 500 (ORT) and 8 x 1000 (AOTInductor) take a few
# seconds each on 2 cores, eager references included; the Inductor build (10-20 s) dominates.
CALLS = {"onnxruntime": 500, "inductor": 1000, "openvino": 500}
ARTIFACT_CALLS = 200
HELD_CALLS = 100  # per thread in the hold-references test


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.norm(self.fc(torch.relu(self.conv(x)).flatten(1)))
        return {"logits": self.head(nn.functional.gelu(hidden)), "hidden": hidden}


@dataclass(repr=False)
class Case:
    """A model, its compiled form and a bank of distinct inputs with their eager outputs."""
    backend: str
    model: nn.Module
    compiled: kiln.CompiledModel
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    expected: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __repr__(self) -> str:  # pytest prints test arguments in tracebacks; not thousands of tensors
        return f"Case({self.backend}, {len(self.inputs)} inputs)"

    @staticmethod
    def call_index(thread: int, step: int) -> int:
        """One index per (thread, step), the same in every test, so its batch size is too."""
        return thread * 100_000 + step

    def input_for(self, index: int, batch: int) -> torch.Tensor:
        if index not in self.inputs:
            gen = torch.Generator().manual_seed(10_000 + index)
            x = torch.randn(batch, 3, 8, 8, generator=gen) * (1 + index % 5)
            with torch.no_grad():
                self.expected[index] = {k: v.clone() for k, v in self.model(x).items()}
            self.inputs[index] = x
        return self.inputs[index]


def batch_for(thread: int, step: int) -> int:
    # At any one step the 8 threads use 8 different batch sizes; each thread cycles through 1..16.
    return 1 + (step + 3 * thread) % MAX_BATCH


def _build(backend: str) -> Case:
    torch.manual_seed(0)
    model = Net().eval()
    compiled = kiln.optimize(model, "cpu-x86", (torch.randn(2, 3, 8, 8),),
                             dynamic={"x": {0: kiln.Dim("batch", 1, MAX_BATCH)}}, backend=backend,
                             precision="fp32",  # outputs are compared at fp32 tolerance
                             cache=False)  # module scope runs outside the suite's per-test private cache
    assert set(compiled.backends.values()) == {backend}
    return Case(backend, model, compiled)


@pytest.fixture(scope="module")
def ort_case() -> Case:
    return _build("onnxruntime")


@pytest.fixture(scope="module")
def inductor_case() -> Case:
    from kiln.backends.inductor import InductorBackend

    status = InductorBackend().available()
    if not status.ok:
        pytest.skip(status.reason)
    return _build("inductor")


@pytest.fixture(scope="module")
def openvino_case() -> Case:
    from kiln.backends.openvino import OpenVinoBackend

    status = OpenVinoBackend().available()
    if not status.ok:
        pytest.skip(status.reason)
    return _build("openvino")


@pytest.fixture(params=["onnxruntime", "inductor", "openvino"])
def case(request) -> Case:
    return request.getfixturevalue({"onnxruntime": "ort_case", "inductor": "inductor_case"}.get(request.param, "openvino_case"))


@contextmanager
def frequent_switches(seconds: float = 1e-4):
    """Make the interpreter switch threads ~50x more often than its default 5 ms, so Python-level
    code in CompiledModel.__call__ interleaves as much as possible."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@dataclass
class Run:
    calls: list[int] = field(default_factory=list)  # per thread, calls that returned
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    max_in_flight: int = 0


def hammer(work, threads: int = THREADS) -> Run:
    """Run work(thread, run, enter, leave) on `threads` threads released together by a barrier;
    enter/leave bracket each model call so the test can see that calls overlapped."""
    run = Run(calls=[0] * threads)
    barrier = threading.Barrier(threads)
    lock = threading.Lock()
    in_flight = [0]

    def enter():
        with lock:
            in_flight[0] += 1
            run.max_in_flight = max(run.max_in_flight, in_flight[0])

    def leave():
        with lock:
            in_flight[0] -= 1

    def body(thread: int):
        try:
            barrier.wait(timeout=60)
            work(thread, run, enter, leave)
        except BaseException as exc:  # noqa: BLE001 - reported by the test, never lost in a thread
            with lock:
                run.errors.append(f"thread {thread}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=body, args=(t,), name=f"kiln-caller-{t}") for t in range(threads)]
    with frequent_switches():
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=300)
    assert not any(w.is_alive() for w in workers), "a caller thread hung"
    return run


def mismatch(index: int, got, want: dict[str, torch.Tensor]) -> str | None:
    """None when `got` is call `index`'s own output at fp32 tolerance; else what differs."""
    if not isinstance(got, dict) or set(got) != set(want):
        return f"call {index}: output keys {sorted(got) if isinstance(got, dict) else type(got).__name__}"
    for name, w in want.items():
        g = got[name]
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"call {index} {name}: got {g.dtype}{tuple(g.shape)}, want {w.dtype}{tuple(w.shape)}"
        if not torch.allclose(g, w, rtol=FP32.rtol, atol=FP32.atol):
            return f"call {index} {name}: max abs error {(g - w).abs().max().item():.3g}"
    return None


@contextmanager
def one_eager_thread():
    """Eager references on one intra-op thread. On this 2-core machine, with other processes
    busy, eager's 2-thread OpenMP barriers made each tiny forward 5-100x slower (15 ms instead
    of 0.15 ms), which made the reference bank, not the compiled calls, dominate the file's time.
    Only the main thread runs while this is in force."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def prepare(case: Case, per_thread: int) -> list[int]:
    """Inputs and eager outputs for THREADS x per_thread calls; their indices, sorted."""
    with one_eager_thread():
        for t in range(THREADS):
            for i in range(per_thread):
                case.input_for(case.call_index(t, i), batch_for(t, i))
    return sorted(case.call_index(t, i) for t in range(THREADS) for i in range(per_thread))


def test_the_output_check_tells_calls_apart(ort_case):
    """Guard for the tests below: another call's output (even with the same batch size) fails
    the check, so a crossed result cannot pass as correct."""
    with one_eager_thread():
        a = ort_case.input_for(900_000, 4)
        ort_case.input_for(900_001, 4)
    got = ort_case.compiled(a)
    assert mismatch(900_000, got, ort_case.expected[900_000]) is None
    assert mismatch(900_001, got, ort_case.expected[900_001]) is not None


def test_many_threads_each_get_their_own_correct_outputs(case):
    per_thread = CALLS[case.backend]
    indices = prepare(case, per_thread)
    seen = [[] for _ in range(THREADS)]

    def work(thread, run, enter, leave):
        for step in range(per_thread):
            index = case.call_index(thread, step)
            x = case.inputs[index]
            enter()
            try:
                out = case.compiled(x)
            finally:
                leave()
            if (problem := mismatch(index, out, case.expected[index])) is not None:
                run.mismatches.append(f"thread {thread}: {problem}")
            # Scribble on what was returned: an engine that handed out its own buffers or
            # constants would now corrupt later calls, which the checks above would catch.
            for value in out.values():
                value.fill_(float("nan"))
            seen[thread].append(index)
            run.calls[thread] += 1

    run = hammer(work)
    assert not run.errors, run.errors[:5]
    assert not run.mismatches, f"{len(run.mismatches)} wrong outputs, e.g. {run.mismatches[:5]}"
    assert run.calls == [per_thread] * THREADS
    assert sum(run.calls) == THREADS * per_thread
    assert sorted(i for s in seen for i in s) == indices
    assert run.max_in_flight >= 2, "calls never overlapped: the test did not exercise concurrency"


def test_outputs_held_by_threads_are_not_overwritten_by_later_calls(case):
    """Each thread keeps every output it gets; only after all threads have finished are they
    checked, and no two live outputs may share memory."""
    indices = prepare(case, HELD_CALLS)
    held: dict[int, dict] = {}
    lock = threading.Lock()

    def work(thread, run, enter, leave):
        for step in range(HELD_CALLS):
            index = case.call_index(thread, step)
            enter()
            try:
                out = case.compiled(case.inputs[index])
            finally:
                leave()
            with lock:
                held[index] = out
            run.calls[thread] += 1

    run = hammer(work)
    assert not run.errors, run.errors[:5]
    assert run.calls == [HELD_CALLS] * THREADS
    assert sorted(held) == indices
    problems = [p for i, out in held.items() if (p := mismatch(i, out, case.expected[i])) is not None]
    assert not problems, f"{len(problems)} held outputs changed or wrong, e.g. {problems[:5]}"
    storages = [v.untyped_storage().data_ptr() for out in held.values() for v in out.values()]
    assert len(set(storages)) == len(storages), "two live outputs share memory"


def test_a_model_loaded_from_an_artifact_is_as_thread_safe(case, tmp_path):
    """A freshly loaded model whose very first calls come from 8 threads at once (for AOTInductor,
    a new model container, whose first run takes its one-time constant-folding step under the
    exclusive lock). Loading takes milliseconds once the module's build exists, so both
    backends are covered."""
    path = case.compiled.save(tmp_path / "model.kiln")
    loaded = kiln.load(path)
    assert set(loaded.backends.values()) == {case.backend}
    per_thread = ARTIFACT_CALLS
    indices = prepare(case, per_thread)
    outputs: dict[int, dict] = {}
    lock = threading.Lock()

    def work(thread, run, enter, leave):
        for step in range(per_thread):
            index = case.call_index(thread, step)
            enter()
            try:
                out = loaded(case.inputs[index])
            finally:
                leave()
            if (problem := mismatch(index, out, case.expected[index])) is not None:
                run.mismatches.append(f"thread {thread}: {problem}")
            with lock:
                outputs[index] = out
            run.calls[thread] += 1

    run = hammer(work)
    assert not run.errors, run.errors[:5]
    assert not run.mismatches, f"{len(run.mismatches)} wrong outputs, e.g. {run.mismatches[:5]}"
    assert run.calls == [per_thread] * THREADS
    assert sorted(outputs) == indices
    changed = [i for i, out in outputs.items() if mismatch(i, out, case.expected[i])]
    assert not changed, f"{len(changed)} held outputs changed after the run, e.g. calls {changed[:5]}"
    assert run.max_in_flight >= 2
