"""What kiln's int8 transformer plan runs: which backend, which layers execute on int8 kernels, where the quantize/dequantize pairs sit.

Builds a model with kiln at an int8-permitting budget (default MiniLM b1, Budget(min_cosine=0.995),
8 calibration batches, as bench/tiers.py's int8 tier does) and reads each partition's engine back:
  - OpenVINO: the compiled model's runtime graph, ops counted by (layer type, runtime precision),
    so u8/i8 GEMMs, bf16 and f32 ops show as they execute;
  - ONNX Runtime: the graph as ONNX Runtime optimised it (written by the session), ops counted by
    type (QLinearMatMul / MatMulIntegerToFloat / DynamicQuantizeLinear ... against float MatMul).
Also prints the report's precision summary, its timing verdicts and every candidate, and times the
built plan against kiln's fp32 build and OpenVINO's default (interleaved, as bench/cpu_peers.py).

    python bench/int8_layers.py
    python bench/int8_layers.py --row bert-base-b1 --min-cosine 0.995 --out /tmp/int8.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_peers import BUILDERS, CORES, log, p99, time_interleaved  # noqa: E402
from tiers import row_data  # noqa: E402


def openvino_ops(engine) -> collections.Counter:
    counts = collections.Counter()
    for op in engine.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[(kind, precision)] += 1
    return counts


def onnxruntime_ops(engine) -> collections.Counter:
    import onnx
    import onnxruntime as ort

    directory = Path(tempfile.mkdtemp(prefix="kiln-int8-layers-"))
    engine.save(directory, "engine")  # the engine's own file (its build directory may be gone)
    optimised = directory / "optimised.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(directory / "engine.onnx"), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(getattr(engine, "disabled_optimizers", ())))  # as the engine's own session
    return collections.Counter((node.op_type, "") for node in onnx.load(str(optimised)).graph.node)


def main(argv: list[str] | None = None) -> None:
    import kiln

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", default="minilm-b1")
    parser.add_argument("--min-cosine", type=float, default=0.995)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8_layers.md"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    name, batch, model, inputs, calibration, _ = row_data(args.row)
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = kiln.optimize(model, "cpu-x86", inputs, cache=False, calibration=calibration,
                                accuracy_budget=kiln.Budget(min_cosine=args.min_cosine))
        fp32 = kiln.optimize(model, "cpu-x86", inputs, cache=False, precision="fp32")
    lines = [f"# What kiln's int8 plan runs ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
             f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
             f"- {CORES} usable cores; 1-min load average {load_before:.2f} at start",
             f"- row {args.row}, Budget(min_cosine={args.min_cosine}), {len(calibration)} calibration batches",
             f"- precision: {lowered.report.precision_summary}", "", "## Report notes", ""]
    lines += [f"- {n}" for n in lowered.report.notes if "precision" in n]
    lines += ["", "## Candidates", "", "| partition | backend | status | median ms | reason |", "|---|---|---|---:|---|"]
    lines += [f"| {c.partition} | {c.backend} | {c.status} | {c.median_ms if c.median_ms is None else round(c.median_ms, 2)} | "
              f"{c.reason.replace('|', '/')} |" for c in lowered.report.candidates]
    for partition in lowered.plan.partitions:
        engine = lowered.engines[partition.name]
        reader = {"openvino": openvino_ops, "onnxruntime": onnxruntime_ops}.get(partition.backend)
        lines += ["", f"## Partition {partition.name} on {partition.backend}: ops as executed", ""]
        if reader is None:
            lines.append(f"(no reader for {partition.backend})")
            continue
        lines += ["| op | runtime precision | count |", "|---|---|---:|"]
        lines += [f"| {kind} | {precision} | {count} |" for (kind, precision), count in sorted(reader(engine).items())]
    calls = {"kiln int8 budget": lambda: lowered(*inputs), "kiln fp32": lambda: fp32(*inputs),
             "openvino-default": BUILDERS["openvino-default"](model, inputs)[0]}
    with torch.no_grad():
        samples, _ = time_interleaved(calls, args.rounds, args.iters)
    lines += ["", "## Timed interleaved", "", "| contender | median ms | p99 ms |", "|---|---:|---:|"]
    lines += [f"| {n} | {statistics.median(s) * 1e3:.2f} | {p99(s) * 1e3:.2f} |" for n, s in samples.items()]
    lines.append(f"\n1-min load average at the end: {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
