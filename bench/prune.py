"""What structured pruning by magnitude buys and costs, without retraining: for each model, at
each level (fraction of prunable parameters removed), the parameters left, eager and kiln fp32
latency, and accuracy against the unpruned model on the bundled real data.

Cases (model:batch): minilm (all-MiniLM-L6-v2, seq 128), bert-base (transformers' default
BertConfig, random seeded weights, seq 128), efficientnet (EfficientNet-Lite0, 224x224).
Accuracy, measured on the eager pruned model (the kiln engine is verified against it at fp32
tolerance, so it answers the same):
  - minilm: `embedding_agreement` on the bundled sentence pairs: embedding cosine to the
    unpruned model (mean, min), and the task score itself, paraphrase-vs-unrelated ROC AUC
    of the pruned model against the unpruned one's;
  - bert-base: random weights have no task, so only the embedding cosine to the unpruned model
    on the same sentences (the AUC columns are meaningless there and left out);
  - efficientnet: `classification_agreement` on the bundled photo views: top-1 and top-5
    agreement with the unpruned model and the worst logit cosine.
Latency: every level's eager model and kiln engine (`kiln.optimize(..., precision="fp32",
effort=...)`) timed interleaved in one process (kiln.build.select.time_interleaved), medians,
reported as ratios against level 0 of the same column.

Run:
    PYTHONPATH=. python bench/prune.py                       # all cases -> bench/results/prune.md + .json
    PYTHONPATH=. python bench/prune.py --cases efficientnet:1 --levels 0,0.5 --out /tmp/p.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CASES = "efficientnet:1,minilm:1,bert-base:1,minilm:8"
LEVELS = "0,0.1,0.3,0.5,0.7"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(name: str, batch: int):
    from kiln.examples import models

    factories = {"minilm": lambda: models.minilm(batch=batch, seq=128),
                 "bert-base": lambda: models.bert_base(batch=batch, seq=128),
                 "efficientnet": lambda: models.efficientnet_lite0(batch=batch)}
    if name not in factories:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(factories)}")
    return factories[name]()


class Memo:
    """The unpruned model's outputs, computed once per input batch and reused at every level."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def __call__(self, *inputs):
        key = tuple(hash(t.numpy().tobytes()) for t in inputs)
        if key not in self.seen:
            self.seen[key] = self.model(*inputs)
        return self.seen[key]


def accuracy(name: str, reference, candidate) -> dict:
    """Accuracy of `candidate` against the unpruned `reference` on the bundled real data."""
    from kiln.examples import accuracy as acc

    with torch.no_grad():
        if name == "efficientnet":
            got = acc.classification_agreement(reference, candidate)
            return {"top1_agreement": got.top1, "top5_agreement": got.top5, "logit_cosine_min": got.cosine_min}
        got = acc.embedding_agreement(reference, candidate)
    row = {"cosine_mean": got.cosine_mean, "cosine_min": got.cosine_min}
    if name == "minilm":  # a trained model: its own task score on the labelled pairs
        row.update(auc=got.separation_candidate, auc_unpruned=got.separation_reference, pair_spearman=got.pair_spearman)
    return row


def run_case(name: str, batch: int, levels: list[float], effort: str, budget: float) -> dict:
    import kiln
    from kiln.build.select import time_interleaved

    model, inputs = load(name, batch)
    log(f"{name} b{batch}: pruning at {levels}")
    pruned = kiln.prune_levels(model, inputs, levels)
    rows, engines, reference = [], [], Memo(model)
    for result in pruned:
        row = {"level": result.level, **result.to_dict()}
        row.pop("per_layer"), row.pop("skipped")
        row["kept"] = {kind: sum(k for _, kd, k, _ in result.per_layer if kd == kind) for kind in result.removed}
        row["total"] = {kind: sum(t for _, kd, _, t in result.per_layer if kd == kind) for kind in result.removed}
        if batch == 1:  # accuracy does not depend on the timing batch; measure it once per model
            row["accuracy"] = accuracy(name, reference, result.model)
        log(f"  level {result.level}: {result.parameters_after:,} parameters; compiling")
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            compiled = kiln.optimize(result.model, "cpu-x86", inputs, precision="fp32", effort=effort, cache=False)
        row["compile_s"] = time.perf_counter() - start
        row["backends"] = sorted(set(compiled.backends.values()))
        rows.append(row)
        engines += [result.model, compiled]
    log(f"  timing {len(engines)} engines interleaved")
    with torch.no_grad():
        medians = time_interleaved(engines, inputs, budget)
    for i, row in enumerate(rows):
        row["eager_ms"], row["kiln_ms"] = medians[2 * i] * 1e3, medians[2 * i + 1] * 1e3
    for row in rows:
        row["eager_speedup"] = rows[0]["eager_ms"] / row["eager_ms"]
        row["kiln_speedup"] = rows[0]["kiln_ms"] / row["kiln_ms"]
        row["kiln_vs_unpruned_eager"] = rows[0]["eager_ms"] / row["kiln_ms"]
    return {"model": name, "batch": batch, "rows": rows}


def _accuracy_text(row: dict) -> str:
    a = row.get("accuracy")
    if not a:
        return "(measured at b1)"
    if "top1_agreement" in a:
        return f"top-1 {a['top1_agreement']:.1%}, top-5 {a['top5_agreement']:.1%}, logit cos min {a['logit_cosine_min']:.3f}"
    text = f"cos mean {a['cosine_mean']:.3f}, min {a['cosine_min']:.3f}"
    if "auc" in a:
        text += f"; AUC {a['auc']:.3f} (unpruned {a['auc_unpruned']:.3f}), pair spearman {a['pair_spearman']:.3f}"
    return text


def markdown(cases: list[dict], header: list[str]) -> str:
    lines = list(header)
    for case in cases:
        lines += ["", f"## {case['model']} b{case['batch']}", "",
                  "| level | prunable removed | kept (of total) | parameters | eager ms | eager x | kiln ms | kiln x "
                  "| kiln vs unpruned eager | backend | accuracy vs unpruned |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in case["rows"]:
            kept = ", ".join(f"{kind} {r['kept'][kind]}/{r['total'][kind]}" for kind in r["kept"])
            lines.append(f"| {r['level']:.1f} | {r['fraction_removed']:.1%} | {kept} | {r['parameters_after'] / 1e6:.2f}M "
                         f"| {r['eager_ms']:.2f} | {r['eager_speedup']:.2f} | {r['kiln_ms']:.2f} | {r['kiln_speedup']:.2f} "
                         f"| {r['kiln_vs_unpruned_eager']:.2f} | {', '.join(r['backends'])} | {_accuracy_text(r)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"model:batch, comma-separated (default {CASES})")
    parser.add_argument("--levels", default=LEVELS, help=f"prune levels (default {LEVELS})")
    parser.add_argument("--effort", default="fast", choices=["fast", "default", "max"], help="kiln compile effort")
    parser.add_argument("--latency-seconds", type=float, default=8.0, help="timing budget per case, interleaved")
    parser.add_argument("--out", default=str(HERE / "results" / "prune.md"))
    args = parser.parse_args(argv)
    import onnxruntime

    from kiln.host import cpu_flags
    from kiln.profile_host import cpu_model

    levels = [float(x) for x in args.levels.split(",")]
    load_before, started, cases = os.getloadavg()[0], time.perf_counter(), []
    for spec in [c.strip() for c in args.cases.split(",") if c.strip()]:
        name, batch = spec.split(":")
        cases.append(run_case(name, int(batch), levels, args.effort, args.latency_seconds))
        header = [f"# Structured pruning by magnitude, no retraining ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
                  f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
                  f"- machine: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores; CPU flags kiln reads: "
                  f"{', '.join(cpu_flags())}",
                  f"- 1-min load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} now. The machine was shared "
                  "with other work during this run (above the core count means other processes competed for the cores): "
                  "ratios measured interleaved hold better than the absolute milliseconds",
                  f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, python {platform.python_version()}",
                  f"- ran {time.perf_counter() - started:.0f} s; kiln engines: precision fp32, effort {args.effort}, verified "
                  "against the eager pruned model; latency medians of every level's eager model and engine timed "
                  "interleaved in one process; 'x' columns: speed-up against level 0 of the same column",
                  "- level: requested fraction of prunable parameters (those the heads, FFN neurons and MBConv expanded "
                  "channels own) removed, the same fraction in every layer; 'prunable removed' is what rounding gave",
                  "- accuracy against the unpruned model on the bundled data, measured on the eager pruned model: MiniLM "
                  "and BERT-base on the sentence pairs (embedding cosine; MiniLM also its paraphrase-vs-unrelated AUC, a "
                  "task score), EfficientNet-Lite0 on the photo views (top-1/top-5 agreement). BERT-base has random "
                  "weights (built from the default config), so only its cosine to the unpruned model means anything"]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(cases, header))
        out.with_suffix(".json").write_text(json.dumps({"argv": sys.argv, "load_before": load_before,
                                                        "cases": cases}, indent=1, default=str))
        log(f"wrote {out}")


if __name__ == "__main__":
    main()
