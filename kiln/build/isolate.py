"""Build a candidate engine in a child process, with a time and a memory budget.

Native toolchains can crash, hang or exhaust memory (a segfault in an exporter, a C++
compiler eating RAM). The child (started ahead by a WorkerPool, one fresh process per
candidate) gets the partition as a torch.export program file, builds the
engine with the named backend, verifies it on the verification inputs, and saves the engine
files; the parent then loads those files. A crash, a hang past the budget or an out-of-memory
kill ends only the child, and the parent records signal, exit code and the last lines it
printed, then goes on with the next candidate.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kiln.backends.base import BackendSettings, Engine, EngineEntry, export_partition
from kiln.ir import PartitionGraph
from kiln.errors import BackendError
from kiln.verify import OutputCheck


class IsolatedBuildFailed(BackendError):
    """The child process building a candidate failed, crashed, or ran past its budget."""


# Op namespaces torch itself defines: any other namespace is a user's torch.library op.
TORCH_NAMESPACES = frozenset({"aten", "prims", "prim", "quantized", "_quantized", "quantized_decomposed", "higher_order",
                              "onednn", "mkldnn", "mkl", "inductor", "_c10d_functional", "c10d_functional", "profiler"})


@dataclass(frozen=True)
class OpLibraries:
    """The modules defining a graph's torch.library ops, which a child process must import to
    load the graph; and the ops whose definition no child can import (a script's __main__)."""

    modules: tuple[str, ...] = ()
    unimportable: tuple[str, ...] = ()


def op_libraries(gm: torch.fx.GraphModule) -> OpLibraries:
    modules, unimportable = [], []
    for target in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_function"):
        if not isinstance(target, torch._ops.OpOverload) or target.namespace in TORCH_NAMESPACES:
            continue
        module = _defining_module(target)
        if module is None or module == "__main__":
            unimportable.append(str(target))
        else:
            modules.append(module)
    return OpLibraries(tuple(dict.fromkeys(modules)), tuple(unimportable))


def _defining_module(op: torch._ops.OpOverload) -> str | None:
    """The importable module that registers `op`: torch.library.custom_op's function, else the
    file the dispatcher says registered the op's schema."""
    from torch._library import custom_ops

    qualname = f"{op.namespace}::{op._schema.name.split('::')[-1]}"
    definition = custom_ops.OPDEFS.get(qualname)
    if definition is not None:
        return getattr(definition._init_fn, "__module__", None)
    dump = torch._C._dispatch_dump(qualname)
    match = re.search(r"debug: registered at (.+?):\d+", dump)
    if match is None:
        return None
    path = os.path.realpath(match.group(1))
    return next((name for name, module in list(sys.modules.items())
                 if getattr(module, "__file__", None) and os.path.realpath(module.__file__) == path), None)


@dataclass(frozen=True)
class PartitionFiles:
    """One partition's program and verification data, written once and read by every
    candidate's child (each used to write its own copy)."""

    program: Path
    verify: Path

    @classmethod
    def write(cls, partition: PartitionGraph, draws: list, references: list, directory: Path) -> "PartitionFiles":
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(directory / "program.pt2", directory / "verify.pt")
        program = export_partition(partition)
        # files a child reads once, moments later, from this machine: no CRC-32 over every weight
        # (0.4-0.8 s of GPT-2's 500 MB), which only the zip format asks for
        checksums = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.export.save(program, files.program)
            torch.save({"draws": [list(d) for d in draws], "references": [list(r) for r in references],
                        "calibration": [list(c) for c in partition.calibration]}, files.verify)
        finally:
            torch.serialization.set_crc32_options(checksums)
        return files


class WorkerPool:
    """Child processes that import torch, kiln and the candidates' backend libraries before a
    build needs them. Each takes one job and exits, so every candidate still builds in a fresh
    process; the seconds of imports run while the parent captures, runs passes or builds the
    previous candidate instead of before each build."""

    def __init__(self, backends: tuple[str, ...], memory_mb: int | None = None):
        self.backends, self.memory_mb = tuple(backends), memory_mb
        self._dir = Path(tempfile.mkdtemp(prefix="kiln-workers-"))
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._spawned = 0
        self._expected, self._ahead = 0, 0
        self._closed = False

    def expect(self, jobs: int, ahead: int = 2) -> None:
        """`jobs` builds are about to come: keep up to `ahead` of them a worker that is already
        importing (not more: an idle worker's imports take a core from the builds running)."""
        with self._lock:
            self._expected, self._ahead = jobs, ahead
            self._top_up()

    def take(self) -> "_Worker":
        with self._lock:
            worker = self._idle.pop(0) if self._idle else self._spawn()
            self._expected = max(0, self._expected - 1)
            self._top_up()
            return worker

    def _top_up(self) -> None:
        while not self._closed and len(self._idle) < min(self._expected, self._ahead):
            self._idle.append(self._spawn())

    def _spawn(self) -> "_Worker":
        self._spawned += 1
        log_path = self._dir / f"worker-{self._spawned}.log"
        with open(log_path, "w") as log_file:  # the child keeps its own descriptor
            process = subprocess.Popen([sys.executable, "-m", "kiln.build.worker", "--wait", *self.backends],
                                       stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                       env=_child_env(), preexec_fn=_limit_memory(self.memory_mb) if self.memory_mb else None)
        return _Worker(process, log_path)

    def release_idle(self) -> None:
        """Stop the workers started ahead and not taken (a selection that builds in this process
        after all): their imports would take a core from the build. Later jobs start their own."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._expected = 0
        for worker in idle:
            worker.process.kill()
            worker.process.wait()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.release_idle()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Worker:
    process: subprocess.Popen
    log: Path

    def run(self, job: Path, timeout_s: float) -> tuple[int | None, str]:
        """Hand the worker `job` and wait: (exit code, or None past `timeout_s`; its output)."""
        try:
            self.process.stdin.write(f"{job}\n")
            self.process.stdin.close()
        except OSError:  # it died while importing; its exit status and output say why
            pass
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        return code, self.log.read_text(errors="replace") if self.log.is_file() else ""


def build_isolated(backend, partition: PartitionGraph, settings: BackendSettings, files: PartitionFiles,
                   synthetic: frozenset[int], timeout_s: float, workers: WorkerPool,
                   libraries: OpLibraries = OpLibraries(), choices: frozenset[str] = frozenset()) -> tuple[Engine, list[OutputCheck], str]:
    job = settings.workdir / f"{partition.name}-{backend.name}-build"
    job.mkdir(parents=True, exist_ok=True)
    request = {
        "backend": backend.name, "partition": partition.name,
        "program": str(files.program), "verify": str(files.verify),
        # the class itself, so the child builds with exactly the backend the parent chose
        "backend_class": f"{type(backend).__module__}:{type(backend).__qualname__}",
        "input_names": list(partition.input_names), "output_names": list(partition.output_names),
        "dynamic": _dims(partition.dynamic_shapes),
        "device": {**asdict(settings.device), "kind": settings.device.kind.value,
                   "peak_tflops": {p.value: v for p, v in settings.device.peak_tflops.items()}},
        "threads": settings.threads, "precision": settings.precision.value,
        "precision_plan": partition.precision.to_dict(),
        "budget": None if settings.budget is None else [settings.budget.min_cosine, settings.budget.max_rel_error],
        "synthetic": sorted(synthetic),  # the draws held to the precision's tolerance (verify.worst_checks)
        "choices": sorted(choices & set(partition.output_names)),  # routing choices (verify.compare)
        "fuse": settings.fuse, "autotune": settings.autotune,
        "import": list(libraries.modules),  # the user's torch.library ops, registered before the program loads
    }
    (job / "request.json").write_text(json.dumps(request))
    start = time.perf_counter()
    code, output = workers.take().run(job, timeout_s)
    if code is None:
        raise IsolatedBuildFailed(f"build of {backend.name} ran past its {timeout_s:g} s budget and was stopped",
                                  where=f"partition {partition.name}", fix="raise build_timeout_s, or drop this backend")
    result_file = job / "result.json"
    if code != 0 or not result_file.is_file():
        raise IsolatedBuildFailed(_describe_exit(code, output, backend.name, time.perf_counter() - start),
                                  where=f"partition {partition.name}", fix="see the lines quoted; the other candidates were still tried")
    result = json.loads(result_file.read_text())
    if not result["ok"]:
        raise IsolatedBuildFailed(result["error"], where=f"partition {partition.name} (child process)",
                                  fix="try another backend")
    entry = EngineEntry(**result["entry"])
    engine = backend.load(job / "engine", entry, settings)
    engine.summary = result.get("summary", "")
    checks = [OutputCheck(**c) for c in result["checks"]]
    return engine, checks, result.get("summary", "")


def _child_env() -> dict:
    """The parent's environment, with its import path, so the child imports the same code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _dims(dynamic_shapes) -> list | None:
    """torch.export Dims -> JSON: per input, {axis: [name, min, max]}."""
    if dynamic_shapes is None:
        return None
    out = []
    for entry in dynamic_shapes:
        out.append(None if entry is None else {str(axis): [d.__name__, d.min, d.max] for axis, d in entry.items()})
    return out


def _limit_memory(memory_mb: int):
    def apply() -> None:
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def _describe_exit(returncode: int, output: str, backend: str, seconds: float) -> str:
    """`output` is the child's stdout and stderr, interleaved."""
    tail = " | ".join(line for line in output.strip().splitlines()[-3:])
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        what = f"build of {backend} crashed ({name}) after {seconds:.1f} s"
    elif "MemoryError" in output or "std::bad_alloc" in output:
        what = f"build of {backend} ran out of memory (exit code {returncode})"
    else:
        what = f"build of {backend} failed with exit code {returncode}"
    return f"{what}; last output: {tail[-600:]}" if tail else what
