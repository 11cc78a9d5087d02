"""The child side of an isolated build (see kiln/build/isolate.py):
`python -m kiln.build.worker --wait [BACKEND ...]` imports what the builds need, then reads one
job directory from stdin, builds it and exits (`python -m kiln.build.worker JOB` builds at once).

Reads JOB/request.json and the partition's program and verification files it names; writes the
engine to JOB/engine/ and the outcome to JOB/result.json. Any exception is reported in
result.json; a crash leaves no result.json and the parent reads the exit status instead.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path


def main(job: Path) -> int:
    import torch

    from kiln.backends.base import BackendSettings
    from kiln.budget import Budget
    from kiln.ir import PartitionGraph, PrecisionPlan
    from kiln.frontend.capture import drop_guard_calls
    from kiln.hardware_profiles.schema import DeviceSpec
    from kiln.types import DeviceKind, Precision
    from kiln.verify import worst_checks

    request = json.loads((job / "request.json").read_text())
    result: dict = {"ok": False}
    try:
        import importlib

        for module in request.get("import", ()):  # the user's torch.library ops, before the program names them
            importlib.import_module(module)
        exported = torch.export.load(request["program"])
        gm = exported.module()
        drop_guard_calls(gm)  # kiln checks inputs itself, as at capture
        verify = torch.load(request["verify"])
        dims = {}
        dynamic = None
        if request["dynamic"] is not None:
            dynamic = tuple(None if entry is None else {int(axis): dims.setdefault(name, torch.export.Dim(name, min=lo, max=hi))
                                                        for axis, (name, lo, hi) in entry.items()}
                            for entry in request["dynamic"])
        partition = PartitionGraph(request["partition"], gm, tuple(request["input_names"]), tuple(request["output_names"]),
                                   tuple(verify["draws"][0]), dynamic, PrecisionPlan.from_dict(request.get("precision_plan")),
                                   tuple(tuple(c) for c in verify.get("calibration", ())))
        budget = None
        if request.get("budget") is not None:
            min_cosine, max_rel_error = request["budget"]
            # a metric-only budget is checked by the parent on the finished model; here only finiteness
            budget = Budget(min_cosine, max_rel_error) if (min_cosine, max_rel_error) != (None, None) else Budget(min_cosine=-1.0)
        device = request["device"]
        settings = BackendSettings(
            DeviceSpec(device["name"], DeviceKind(device["kind"]), device["model"], device["memory_gb"],
                       device["memory_bandwidth_gbs"], {Precision(k): v for k, v in device["peak_tflops"].items()},
                       tuple(device["backends"]), device.get("cores"), tuple(device.get("features", ()))),
            request["threads"], job, Precision(request["precision"]), budget=budget, fuse=request["fuse"],
            autotune=bool(request.get("autotune", False)))
        module_name, class_name = request["backend_class"].split(":")
        import importlib

        backend = getattr(importlib.import_module(module_name), class_name)()
        start = time.perf_counter()
        engine = backend.compile(partition, settings)
        result["compile_seconds"] = time.perf_counter() - start
        runs = ((list(engine(*inputs)), list(want)) for inputs, want in zip(verify["draws"], verify["references"]))
        checks = worst_checks(partition.output_names, runs, settings.precision, settings.budget, frozenset(request.get("synthetic", ())),
                              frozenset(request.get("choices", ())))
        (job / "engine").mkdir(exist_ok=True)
        entry = engine.save(job / "engine", partition.name)
        result.update(ok=True, checks=[c.to_dict() for c in checks], entry=asdict(entry),
                      summary=getattr(engine, "summary", ""))
    except Exception as exc:  # reported to the parent, which records it as this candidate's failure
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:600]
        traceback.print_exc()
    (job / "result.json").write_text(json.dumps(result, default=str))
    return 0


def warm_up(backends: list[str]) -> None:
    """Import torch, kiln's build modules and each backend's libraries, as a build would."""
    import importlib

    import torch  # noqa: F401

    import kiln.frontend.capture  # noqa: F401
    import kiln.verify  # noqa: F401
    from kiln.backends import registry

    for name in backends:
        try:
            backend = registry.get(name)
            for module in backend.build_modules:
                importlib.import_module(module)
        except Exception:  # the build itself reports a backend that cannot load
            pass


if __name__ == "__main__":
    if sys.argv[1] == "--wait":
        warm_up(sys.argv[2:])
        line = sys.stdin.readline().strip()
        sys.exit(main(Path(line)) if line else 0)  # no job: the parent no longer needs this worker
    sys.exit(main(Path(sys.argv[1])))
