"""What kiln's fusion buys: each model on each backend with fusion off and on.

"Off" is `fusion=False`: kiln's fusion passes and its lowering into the runtime's fused ops
are skipped; each runtime's own built-in optimizer still runs (ORT_ENABLE_ALL, Inductor's
default fusions), so the difference is what kiln adds. For every (model, backend) pair both
builds are verified against eager by kiln, then timed interleaved with eager on the same
inputs. Reports op counts before and after the passes, what the backend did with the graph
(ONNX Runtime's fused ops, Inductor's generated kernels), median / p99 latency and the
on/off speedup.

    . .venv/bin/activate && python bench/fusion.py                      # all models, batch 8
    python bench/fusion.py --models bert-base-eager --backends onnxruntime --rounds 2 --iters 3
Progress goes to stderr; the markdown table to stdout and to --out (a .json beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_peers import CORES, cpu_model, flat_outputs, fmt, log, time_into_rows, write_results  # noqa: E402

MODELS = ("minilm", "minilm-eager", "efficientnet", "bert-base", "bert-base-eager", "gpt2", "gpt2-eager", "resnet50")
BACKENDS = ("onnxruntime", "inductor", "openvino")


def load_model(name: str, batch: int):
    """(model, inputs) for a bench model name; `-eager` names use hand-written attention."""
    from kiln.examples import models

    attn = "eager" if name.endswith("-eager") else "sdpa"
    base = name.removesuffix("-eager")
    factories = {"minilm": lambda: models.minilm(batch, 128, attn=attn),
                 "efficientnet": lambda: models.efficientnet_lite0(batch),
                 "bert-base": lambda: models.bert_base(batch, 128, attn=attn),
                 "gpt2": lambda: models.gpt2_small(batch, 128, attn=attn),
                 "resnet50": lambda: models.resnet50(batch)}
    if base not in factories:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return factories[base]()


def build(model, inputs, backend: str, fusion: bool) -> dict:
    """One verified kiln build; returns its callable and what its report says."""
    import kiln

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        compiled = kiln.optimize(model, "cpu-x86", inputs, backend=backend, fusion=fusion, precision="fp32", cache=False,
                                 isolate=False)
    seconds = time.perf_counter() - start
    report = compiled.report
    chosen = next(c for c in report.candidates if c.status == "chosen")
    fused = {k: v for p in report.passes if p.stage == "fusion" for k, v in p.counts.items() if v}
    passes = ", ".join(f"{k} {v}" for k, v in fused.items()) or "-"
    return {"call": lambda: compiled(*inputs), "compile_s": seconds, "ops_captured": report.captured_ops,
            "ops_after": sum(p.nodes for p in report.partitions), "passes": passes, "backend_detail": chosen.detail,
            "max_err": max(v["max_abs_error"] for v in report.verification) if report.verification else None}


def run_model(name: str, batch: int, backends: list[str], args) -> list[dict]:
    torch.manual_seed(0)
    model, inputs = load_model(name, batch)
    with torch.no_grad():
        reference = model(*inputs)
    keys = list(reference.keys()) if hasattr(reference, "keys") else None
    calls = {"eager": lambda: model(*inputs)}
    rows = {}
    for backend in backends:
        for fusion in (False, True):
            label = f"{backend}/{'on' if fusion else 'off'}"
            log(f"{name} b{batch}: building {label} ...")
            row = {"model": name, "batch": batch, "backend": backend, "fusion": fusion, "error": None}
            try:
                built = build(model, inputs, backend, fusion)
                calls[label] = built.pop("call")
                row.update(built)
                got = flat_outputs(calls[label](), keys)
                row["max_err"] = max(float((g - r).abs().max()) for g, r in zip(got, flat_outputs(reference, keys)))
                log(f"  {row['compile_s']:.1f} s, ops {row['ops_captured']} -> {row['ops_after']}, {row['backend_detail']}")
            except Exception as exc:  # one failing build must not stop the run
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
                log(f"  FAILED: {row['error']}")
            rows[label] = row
    log(f"{name} b{batch}: timing {', '.join(calls)}")
    eager_row = {"model": name, "batch": batch, "backend": "eager", "fusion": None, "error": None}
    time_into_rows(calls, {**rows, "eager": eager_row}, args.rounds, args.iters)
    for backend in backends:
        on, off = rows.get(f"{backend}/on", {}), rows.get(f"{backend}/off", {})
        if on.get("median_ms") and off.get("median_ms"):
            on["on_vs_off"] = off["median_ms"] / on["median_ms"]
    if "median_ms" in eager_row:
        rows["eager"] = eager_row
    return list(rows.values())


def markdown(rows: list[dict], header: list[str]) -> str:
    lines = [*header, "",
             "| model | batch | backend | fusion | ops captured -> after | kiln fusion passes | backend graph | "
             "median ms | p99 ms | vs eager | on vs off | compile s |",
             "|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        fusion = "-" if r["fusion"] is None else ("on" if r["fusion"] else "off")
        ops = f"{r['ops_captured']} -> {r['ops_after']}" if r.get("ops_captured") else "-"
        detail = (f"FAILED: {r['error']}" if r["error"] else r.get("backend_detail", "")).replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {fusion} | {ops} | {r.get('passes', '-')} | "
                     f"{detail} | {fmt(r.get('median_ms'), '.2f')} | {fmt(r.get('p99_ms'), '.2f')} | "
                     f"{fmt(r.get('vs_eager'), '.2f', 'x')} | {fmt(r.get('on_vs_off'), '.2f', 'x')} | "
                     f"{fmt(r.get('compile_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per block")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fusion.md"))
    args = parser.parse_args(argv)
    from kiln.backends import registry

    backends = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        status = registry.get(name).available() if name in registry.BACKENDS else None
        if status is None or not status.ok:
            log(f"skipping backend {name}: {status.reason if status else 'not a kiln backend here'}")
            continue
        backends.append(name)
    load_before = os.getloadavg()[0]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += run_model(name, args.batch, backends, args)
        torch._dynamo.reset()
    header = [f"# kiln fusion on vs off ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
              f"- machine: {cpu_model()}, {CORES} usable cores; 1-min load average {load_before:.2f} at start, "
              f"{os.getloadavg()[0]:.2f} at end",
              f"- torch {torch.__version__}, python {platform.python_version()}; profile cpu-x86, fp32",
              f"- {args.rounds} rounds x {args.iters} timed calls per build, interleaved with eager",
              "- off = `fusion=False` (kiln's fusion passes and fused-op lowering skipped; runtimes' own "
              "optimizers still on)"]
    write_results(markdown(rows, header), rows, Path(args.out))


if __name__ == "__main__":
    main()
