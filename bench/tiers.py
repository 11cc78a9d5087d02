"""kiln against the fastest peer in each accuracy tier, every row timed interleaved in one run.

Tiers, by the worst cosine of a contender's output to eager fp32 over real held-out inputs
(bundled sentences for the transformers, photo views for the CNNs; never the calibration data):
  fp32  cosine >= 0.99999    tight  >= 0.9999    int8  >= 0.99
A contender counts in every tier its cosine reaches. Per row and tier the table gives the fastest
peer in the tier, kiln's fastest build in the tier, and the peer's median over kiln's (above 1:
kiln leads). Peers: eager, torch.compile, ONNX Runtime fp32 and its per-channel int8 (dynamic
for transformers, static QDQ with 8 calibration batches for CNNs), OpenVINO f32 and at its
default (bf16 where the CPU has AVX512_BF16 or AMX). kiln: precision="fp32", and precision="auto"
at each tier's floor as its budget:
  kiln-near-fp32  Budget(min_cosine=0.99999)     kiln-tight   Budget(min_cosine=0.9999)
  kiln-int8       Budget(min_cosine=0.99)
each with the same calibration batches as ONNX Runtime's static int8 (--calibration-batches, 8).
Each median is also given as a multiple of the roofline floor at this machine's measured fp32
and int8 GEMM rates (bf16 in the header).

    python bench/tiers.py                                   # every row (long: run on a quiet machine)
    python bench/tiers.py --rows minilm-b1 --rounds 2 --iters 5 --out /tmp/tiers.md
Progress goes to stderr; the markdown to stdout and --out (a .json beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import kiln  # noqa: F401  before torch, as a user's script would: kiln shortens PyTorch's OpenMP spin (kiln.host)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_peers import (BUILDERS as PEER_BUILDERS, CORES, _openvino_version, flat_outputs, fmt, load_case, log,  # noqa: E402
                       model_flops, p99, time_interleaved, weight_bytes)
from precision import TRANSFORMERS, build_onnxruntime_int8  # noqa: E402

ROWS = ("minilm-b1", "minilm-b8", "efficientnet-b1", "efficientnet-b8", "bert-base-b1", "gpt2-b1", "resnet50-b1")
TIERS = (("fp32", 0.99999), ("tight", 0.9999), ("int8", 0.99))
PEERS = ("eager", "torch.compile", "onnxruntime", "openvino", "openvino-default", "onnxruntime-int8")
KILN = ("kiln-fp32", "kiln-near-fp32", "kiln-tight", "kiln-int8")
KILN_BUDGETS = {"kiln-near-fp32": 0.99999, "kiln-tight": 0.9999, "kiln-int8": 0.99}
CALIBRATION_BATCHES = 8
EVAL_BATCHES = 4  # held-out batches each contender's cosine is measured on
SEQ = 128


# ---------------------------------------------------------------- data

def row_data(row: str, calibration_batches: int = CALIBRATION_BATCHES):
    """(model name, batch, model, timed inputs, calibration batches, evaluation batches)."""
    from kiln.examples import accuracy, models

    name, batch = row.rsplit("-b", 1)
    batch = int(batch)
    torch.manual_seed(0)
    model, _ = load_case(name, batch)
    if name in TRANSFORMERS:
        count = 1 if name == "gpt2" else 2  # GPT-2 takes the token ids only
        sentences = accuracy.distinct_sentences(accuracy.load_pairs(accuracy.EVAL_GROUPS))
        ids, mask = models.sentence_tokens(sentences[:batch * EVAL_BATCHES], seq=SEQ)
        evaluated = [(ids[i:i + batch], mask[i:i + batch])[:count] for i in range(0, batch * EVAL_BATCHES, batch)]
        calibration = [s[:count] for s in accuracy.sentence_calibration(batch, SEQ, calibration_batches * batch)]
    else:
        pixels = accuracy.load_images().pixels
        evaluated = [(pixels[i:i + batch],) for i in range(0, batch * EVAL_BATCHES, batch) if i + batch <= len(pixels)]
        calibration = accuracy.photo_calibration(batch)[:calibration_batches]
    return name, batch, model, evaluated[0], calibration, evaluated


# ---------------------------------------------------------------- contenders: each returns (fn(*tensors), note)

def build_peer(contender: str, model, inputs, calibration, name):
    """A cpu_peers builder. Its call reads the tensors it was built with; other inputs (the
    evaluation batches) are copied into them first, and the timing passes them themselves."""
    bound = tuple(t.clone() for t in inputs)
    call, _, note = PEER_BUILDERS[contender](model, bound)

    def run(*tensors):
        for slot, tensor in zip(bound, tensors):
            if tensor is not slot:
                slot.copy_(tensor)
        return call()
    run.bound = bound
    return run, note


def build_ort_int8(contender: str, model, inputs, calibration, name):
    """bench/precision.py's: dynamic per-channel for the transformers, static QDQ for CNNs."""
    return build_onnxruntime_int8(model, inputs, calibration, name)


def build_kiln(contender: str, model, inputs, calibration, name):
    import kiln

    options = ({"precision": "fp32"} if contender == "kiln-fp32" else
               {"accuracy_budget": kiln.Budget(min_cosine=KILN_BUDGETS[contender]), "calibration": calibration})
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unproven-accuracy warning is in the report too
        compiled = kiln.optimize(model, "cpu-x86", inputs, cache=False, **options)
    for note in compiled.report.notes:  # the precision search's races: what a plan that differs between runs lost
        if note.startswith("precision=auto"):
            log(f"  {contender}: {note}")
    backends = ", ".join(sorted(set(compiled.backends.values())))
    return compiled, f"{backends}; {compiled.report.precision_summary}"


def builder(contender: str):
    if contender in KILN:
        return build_kiln
    return build_ort_int8 if contender == "onnxruntime-int8" else build_peer


# ---------------------------------------------------------------- one row

def min_cosine(reference: torch.Tensor, got: torch.Tensor) -> float:
    """The worst per-sample cosine of `got` to `reference` (first output, each sample flattened)."""
    ref, out = reference.float().flatten(1), got.float().flatten(1)
    return float(torch.nn.functional.cosine_similarity(ref, out, dim=1).min())


def tier_of(cosine: float | None) -> str | None:
    return next((tier for tier, floor in TIERS if cosine is not None and cosine >= floor), None)


def run_row(row: str, contenders: list[str], args, rates: dict) -> list[dict]:
    name, batch, model, inputs, calibration, evaluated = row_data(row, args.calibration_batches)
    flops = model_flops(model, inputs)
    with torch.no_grad():
        references = [flat_outputs(model(*e))[0] for e in evaluated]
    log(f"{row}: {flops / 1e9:.2f} GFLOP, {weight_bytes(model) / 2 ** 20:.1f} MiB weights")
    rows, calls = {}, {}
    for contender in contenders:
        log(f"{row}: building {contender} ...")
        out = {"row": row, "model": name, "batch": batch, "contender": contender, "gflop": flops / 1e9, "error": None}
        start = time.perf_counter()
        try:
            fn, out["note"] = builder(contender)(contender, model, inputs, calibration, name)
            out["build_s"] = time.perf_counter() - start
            with torch.no_grad():
                out["cosine"] = min(min_cosine(ref, flat_outputs(fn(*e))[0]) for ref, e in zip(references, evaluated))
            out["tier"] = tier_of(out["cosine"])
            fn(*inputs)  # the timed inputs back in a peer's own tensors, after the evaluation batches
            timed_inputs = getattr(fn, "bound", inputs)
            calls[contender] = (lambda fn=fn, timed_inputs=timed_inputs: fn(*timed_inputs))
            log(f"  {out['build_s']:.1f} s, cosine {out['cosine']:.6f} ({out['tier'] or 'below every tier'}); {out['note']}")
        except Exception as exc:  # one failing contender must not stop the run
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
            log(f"  FAILED: {out['error']}")
        rows[contender] = out
    log(f"{row}: timing {', '.join(calls)} ({args.rounds} rounds x {args.iters} calls, interleaved)")
    with torch.no_grad():
        samples, errors = time_interleaved(calls, args.rounds, args.iters)
    for contender, error in errors.items():
        rows[contender]["error"] = error
    for contender, times in samples.items():
        median = statistics.median(times)
        rows[contender].update(median_ms=median * 1e3, p99_ms=p99(times) * 1e3, p99_over_median=p99(times) / median,
                               x_fp32_floor=median / (flops / rates["fp32"]), x_int8_floor=median / (flops / rates["int8"]))
    return list(rows.values())


def cells(rows: list[dict]) -> list[dict]:
    """Per row and tier: the fastest in-tier peer, kiln's fastest in-tier build, and the ratio."""
    result = []
    for row in dict.fromkeys(r["row"] for r in rows):
        timed = [r for r in rows if r["row"] == row and r.get("median_ms") is not None and r.get("tier")]
        for tier, floor in TIERS:
            inside = [r for r in timed if r["cosine"] >= floor]
            peer_best = min((r for r in inside if r["contender"] in PEERS), key=lambda r: r["median_ms"], default=None)
            kiln_best = min((r for r in inside if r["contender"] in KILN), key=lambda r: r["median_ms"], default=None)
            ratio = peer_best["median_ms"] / kiln_best["median_ms"] if peer_best and kiln_best else None
            result.append({"row": row, "tier": tier, "peer": peer_best and peer_best["contender"],
                           "peer_ms": peer_best and peer_best["median_ms"], "kiln": kiln_best and kiln_best["contender"],
                           "kiln_ms": kiln_best and kiln_best["median_ms"], "kiln_p99_ms": kiln_best and kiln_best["p99_ms"],
                           "lead": ratio})
    return result


# ---------------------------------------------------------------- report

def markdown(rows: list[dict], summary: list[dict], header: list[str]) -> str:
    lines = [*header, "", "## Each contender", "",
             "| row | contender | median ms | p99 ms | p99/median | cosine (worst) | tier | x fp32 floor | x int8 floor | build s | note |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        note = (f"FAILED: {r['error']}" if r["error"] else r.get("note", "")).replace("|", "\\|")
        lines.append(f"| {r['row']} | {r['contender']} | {fmt(r.get('median_ms'), '.2f')} | {fmt(r.get('p99_ms'), '.2f')} | "
                     f"{fmt(r.get('p99_over_median'), '.2f')} | {fmt(r.get('cosine'), '.6f')} | {r.get('tier') or '-'} | "
                     f"{fmt(r.get('x_fp32_floor'), '.1f')} | {fmt(r.get('x_int8_floor'), '.1f')} | "
                     f"{fmt(r.get('build_s'), '.1f')} | {note} |")
    lines += ["", "## kiln against the fastest peer in each tier", "",
              "| row | tier | fastest peer | its median ms | kiln's fastest in tier | median ms | p99 ms | kiln's lead |",
              "|---|---|---|---:|---|---:|---:|---:|"]
    for c in summary:
        lines.append(f"| {c['row']} | {c['tier']} | {c['peer'] or '-'} | {fmt(c['peer_ms'], '.2f')} | {c['kiln'] or '-'} | "
                     f"{fmt(c['kiln_ms'], '.2f')} | {fmt(c['kiln_p99_ms'], '.2f')} | {fmt(c['lead'], '.2f', 'x')} |")
    lines += ["", "## kiln's own checks: budget plans against kiln's fp32, and tail latency", "",
              "| row | kiln-fp32 ms | " + " | ".join(f"{k} ms (fp32 / it)" for k in KILN_BUDGETS) + " | worst kiln p99/median |",
              "|---|---:|" + "---:|" * len(KILN_BUDGETS) + "---:|"]
    for row in dict.fromkeys(r["row"] for r in rows):
        mine = {r["contender"]: r for r in rows if r["row"] == row and r["contender"] in KILN and r.get("median_ms")}
        fp32 = mine.get("kiln-fp32", {}).get("median_ms")

        def against(name):
            ms = mine.get(name, {}).get("median_ms")
            return "-" if ms is None else f"{ms:.2f} ({fmt(fp32 / ms if fp32 else None, '.2f', 'x')})"
        worst = max((r["p99_over_median"] for r in mine.values()), default=None)
        lines.append(f"| {row} | {fmt(fp32, '.2f')} | " + " | ".join(against(k) for k in KILN_BUDGETS) + f" | {fmt(worst, '.2f')} |")
    return "\n".join(lines) + "\n"


def measured_rates() -> dict:
    """GEMM rates of this machine in (FL)OP/s: fp32 and bf16 torch.mm, int8 torch._int_mm."""
    from kiln.profile_host import gemm_tflops

    rates = {name: gemm_tflops(dtype, 1024, 1.0) for name, dtype in
             (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8))}
    return {name: (tops or 0.0) * 1e12 for name, tops in rates.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--contenders", default=",".join(PEERS + KILN))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10, help="timed calls per block")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tiers.md"))
    parser.add_argument("--calibration-batches", type=int, default=CALIBRATION_BATCHES,
                        help="held-out batches calibrating kiln's tiers and ONNX Runtime's static int8 alike")
    parser.add_argument("--label", default="", help="a line for the header, e.g. what else ran on the machine")
    args = parser.parse_args(argv)
    rows_asked = [r.strip() for r in args.rows.split(",") if r.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := (set(rows_asked) - set(ROWS)) | (set(contenders) - set(PEERS) - set(KILN)):
        parser.error(f"unknown rows or contenders {sorted(unknown)}; rows: {', '.join(ROWS)}; contenders: {', '.join(PEERS + KILN)}")
    import onnxruntime

    from kiln.host import cpu_flags
    from kiln.profile_host import cpu_model

    load_before = os.getloadavg()[0]
    log("measuring GEMM rates ...")
    rates = measured_rates()
    log(", ".join(f"{k} {v / 1e9:.0f} G(FL)OP/s" for k, v in rates.items()))
    rows = []
    for row in rows_asked:
        rows += run_row(row, contenders, args, rates)
        torch._dynamo.reset()
    summary = cells(rows)
    load_after = os.getloadavg()[0]
    header = [f"# kiln against the fastest peer in each accuracy tier ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
              *([f"- **{args.label}**"] if args.label else []),
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
              f"- machine: {cpu_model()}, {CORES} usable cores; CPU flags kiln reads: {', '.join(cpu_flags())}",
              f"- 1-min load average {load_before:.2f} at start, {load_after:.2f} at end"
              + (" (above the core count: other processes competed for the cores)" if max(load_before, load_after) > CORES
                 else " (at or below the core count: a quiet machine)"),
              f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {_openvino_version()}, "
              f"python {platform.python_version()}; GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}",
              "- measured GEMM rates (1024^3): " + ", ".join(f"{k} {v / 1e9:.0f} G(FL)OP/s" for k, v in rates.items()),
              f"- {args.rounds} rounds x {args.iters} timed calls per contender, interleaved (rotating order, a quiet pause "
              "and an untimed call before each block)",
              f"- calibration: the same {args.calibration_batches} held-out batches for kiln and ONNX Runtime's static int8 "
              "(dynamic int8 takes none)",
              f"- tiers by the worst per-sample cosine to eager fp32 over {EVAL_BATCHES} held-out real batches: "
              + ", ".join(f"{t} >= {f}" for t, f in TIERS)]
    table = markdown(rows, summary, header)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"argv": sys.argv, "rates": rates, "loadavg_start": load_before,
                                                    "rows": rows, "cells": summary}, indent=1, default=str))
    log(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
