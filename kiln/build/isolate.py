"""Build a candidate engine in a child process, with a time and a memory budget.

Native toolchains can crash, hang or exhaust memory (a segfault in an exporter, a C++
compiler eating RAM). The child gets the partition as a torch.export program file, builds the
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
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

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


def build_isolated(backend, partition: PartitionGraph, settings: BackendSettings, draws: list, references: list,
                   synthetic: frozenset[int], timeout_s: float, memory_mb: int | None,
                   libraries: OpLibraries = OpLibraries()) -> tuple[Engine, list[OutputCheck], str]:
    job = settings.workdir / f"{partition.name}-{backend.name}-build"
    job.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_partition(partition), job / "program.pt2")
    torch.save({"draws": [list(d) for d in draws], "references": [list(r) for r in references],
                "calibration": [list(c) for c in partition.calibration]}, job / "verify.pt")
    request = {
        "backend": backend.name, "partition": partition.name,
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
        "fuse": settings.fuse, "autotune": settings.autotune,
        "import": list(libraries.modules),  # the user's torch.library ops, registered before the program loads
    }
    (job / "request.json").write_text(json.dumps(request))
    command = [sys.executable, "-m", "kiln.build.worker", str(job)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s, env=_child_env(),
                              preexec_fn=_limit_memory(memory_mb) if memory_mb else None)
    except subprocess.TimeoutExpired:
        raise IsolatedBuildFailed(f"build of {backend.name} ran past its {timeout_s:g} s budget and was stopped",
                                  where=f"partition {partition.name}", fix="raise build_timeout_s, or drop this backend") from None
    result_file = job / "result.json"
    if done.returncode != 0 or not result_file.is_file():
        raise IsolatedBuildFailed(_describe_exit(done, backend.name, time.perf_counter() - start),
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


def _describe_exit(done: subprocess.CompletedProcess, backend: str, seconds: float) -> str:
    output = done.stdout or ""  # the child's stdout and stderr, interleaved
    tail = " | ".join(line for line in output.strip().splitlines()[-3:])
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        what = f"build of {backend} crashed ({name}) after {seconds:.1f} s"
    elif "MemoryError" in output or "std::bad_alloc" in output:
        what = f"build of {backend} ran out of memory (exit code {done.returncode})"
    else:
        what = f"build of {backend} failed with exit code {done.returncode}"
    return f"{what}; last output: {tail[-600:]}" if tail else what
