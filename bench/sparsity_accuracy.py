"""What 2:4 magnitude sparsity (no retraining) costs on the bundled real models, and how many layers
kiln's assign_sparsity prunes at each accuracy budget.

For MiniLM (sentence embeddings) and EfficientNet-Lite0 (image classes), kiln plans for the a100
profile (plan only: this machine has no GPU) with precision="fp16", sparsity="2:4" and the
bundled calibration samples at each budget. The layers it prunes are then pruned in the planned graph
(kiln's own weight lowering), which runs eagerly at fp32 on this CPU, one input at a time, and its
answers are compared with the untouched model on the bundled evaluation data (sentence pairs: embedding cosine, nearest-neighbour
agreement; photos: top-1 agreement, logit cosine). fp32 isolates what pruning costs; fp16's own
rounding is left out. "every candidate" prunes every layer the pass weighed against the budget,
whatever the budget: the cost of 2:4 with no budget at all. Nothing here is timed: sparse tensor
cores are GPU hardware, and no speed figure exists until a GPU runs scripts/gpu_check.sh.

    PYTHONPATH=. .venv/bin/python bench/sparsity_accuracy.py
    PYTHONPATH=. .venv/bin/python bench/sparsity_accuracy.py --models minilm --budgets 0.99 --out /tmp/s.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import kiln
from kiln.examples import accuracy, models
from kiln.host import cpu_flags
from kiln.ir import PartitionGraph, PrecisionPlan, Scheme
from kiln.precision.lowering import with_lowered_weights

SEQ = 128
CALIBRATION = 4  # samples the plan measures on (each budget decision runs the model on all of them)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(name: str):
    """(model, example inputs, calibration samples, evaluate(candidate model) -> dict)."""
    if name == "minilm":
        model, _ = models.minilm(1, SEQ)
        pairs = accuracy.load_pairs(accuracy.EVAL_GROUPS)
        calibration = accuracy.sentence_calibration(1, SEQ, CALIBRATION)

        def evaluate(candidate):
            r = accuracy.embedding_agreement(model, _no_grad(candidate), pairs, batch=1, seq=SEQ)
            return {"cosine_min": r.cosine_min, "cosine_mean": r.cosine_mean, "neighbours_kept": r.neighbour_agreement,
                    "pair_spearman": r.pair_spearman}
        return model, calibration[0], calibration, evaluate
    model, _ = models.efficientnet_lite0(1)
    images = accuracy.load_images()
    calibration = accuracy.photo_calibration(1)[:CALIBRATION]

    def evaluate(candidate):
        r = accuracy.classification_agreement(model, _no_grad(candidate), images, batch=1)
        return {"top1": r.top1, "top5": r.top5, "logit_cosine_min": r.cosine_min}
    return model, calibration[0], calibration, evaluate


def _no_grad(module):
    def run(*tensors):
        with torch.no_grad():
            return module(*tensors)
    return run


def planned_graph(model, example, calibration, budget: float):
    """What kiln.plan decides (capture and the pass pipeline for a100, nothing built), with the
    graph the decisions are on: the pruned layers' weights may be constants the passes made
    (EfficientNet-Lite0's convolutions with BatchNorm folded in), which no model parameter holds."""
    from kiln.api import _pass_context
    from kiln.frontend.capture import capture
    from kiln.hardware_profiles import load as load_profile
    from kiln.ir import LAYER_META
    from kiln.passes import pipeline

    options = kiln.CompileOptions(precision="fp16", sparsity="2:4", calibration=calibration,
                                  accuracy_budget=kiln.Budget(min_cosine=budget))
    captured = capture(model, example)
    pipeline.run(captured.gm, _pass_context(load_profile("a100"), options, captured, plan_only=True))
    plans = [n.meta[LAYER_META] for n in captured.gm.graph.nodes if LAYER_META in n.meta]
    return captured, plans


def pruned_graph(captured, plans) -> Callable:
    """The captured graph at fp32 with the weights of `plans` marked 2:4 pruned (kiln's own lowering)."""
    layers = [dataclasses.replace(p, scheme=Scheme.FP32) for p in plans]  # fp32: isolates what pruning costs
    graph = PartitionGraph("p0", captured.gm, captured.input_spec.names, captured.output_names, captured.example_inputs,
                           None, PrecisionPlan(layers))
    lowered = with_lowered_weights(graph).gm
    return lambda *tensors: tuple(lowered(*tensors))


def run_case(name: str, budgets: list[float]) -> list[dict]:
    model, example, calibration, evaluate = load(name)
    rows = []
    for budget in budgets:
        log(f"{name}: planning for a100 at min_cosine {budget}")
        start = time.perf_counter()
        captured, plans = planned_graph(model, example, calibration, budget)
        seconds = time.perf_counter() - start
        chosen = [p for p in plans if p.sparsity == "2:4"]
        candidates = [p for p in plans if "budget" in p.sparsity_reason]
        log(f"{name}: {len(chosen)} of {len(plans)} layers pruned; evaluating")
        rows.append({"model": name, "setting": f"min_cosine {budget}", "layers": len(plans), "candidates": len(candidates),
                     "pruned": len(chosen), "plan_seconds": round(seconds, 1),
                     **evaluate(pruned_graph(captured, chosen))})
    everything = [dataclasses.replace(p, sparsity="2:4") for p in plans if "budget" in p.sparsity_reason]
    rows.append({"model": name, "setting": "every candidate (no budget)", "layers": len(plans), "candidates": len(everything),
                 "pruned": len(everything), "plan_seconds": None, **evaluate(pruned_graph(captured, everything))})
    return rows


def write(rows: list[dict], out: Path, load_before: float, started: str) -> None:
    metrics = ["cosine_min", "cosine_mean", "neighbours_kept", "pair_spearman", "top1", "top5", "logit_cosine_min"]
    lines = ["# 2:4 sparsity: accuracy at each budget (plan for a100, pruned weights run at fp32 on CPU)", "",
             f"- date: {started}; torch {torch.__version__}",
             f"- machine: {_cpu()}, {len(os.sched_getaffinity(0))} usable cores; CPU flags kiln reads: {', '.join(cpu_flags())}",
             f"- 1-min load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at the end; the machine was shared "
             "with other work (accuracy figures do not depend on it; plan times do)",
             f"- command: `PYTHONPATH=. python bench/sparsity_accuracy.py {' '.join(sys.argv[1:])}`",
             "- nothing is timed: sparse tensor cores are GPU hardware (no speed figure until a GPU runs it)", "",
             "| model | setting | layers pruned / candidates / all | " + " | ".join(metrics) + " | plan s |",
             "| --- | --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |"]
    for r in rows:
        figures = " | ".join(f"{r[m]:.4f}" if m in r else "" for m in metrics)
        lines.append(f"| {r['model']} | {r['setting']} | {r['pruned']} / {r['candidates']} / {r['layers'] or ''} | {figures} | "
                     f"{r['plan_seconds'] if r['plan_seconds'] is not None else ''} |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"started": started, "rows": rows}, indent=1))
    print("\n".join(lines))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "efficientnet"], choices=["minilm", "efficientnet"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.99, 0.95])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparsity_accuracy.md")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    load_before, started = os.getloadavg()[0], datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = [row for name in args.models for row in run_case(name, args.budgets)]
    write(rows, args.out, load_before, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
