"""What ONNX Runtime's spinning worker threads cost the work that runs after a call.

kiln's ONNX Runtime engines bound their intra-op threads' spinning
(`kiln.backends.onnxruntime.INTRA_OP_SPIN_US`). This builds each model twice with kiln on
ONNX Runtime at fp32, once with that bound and once with ORT's default spinning, and times,
interleaved:
  - the engine's call alone;
  - the call followed by other work on the same cores (20 fp32 512x512 matmuls in PyTorch: what
    the next partition's engine or the user's own code would do);
  - that other work alone.
The extra time of "call then work" over "call alone" + "work alone" is what the spinning threads
took from the work.

    . .venv/bin/activate && python bench/ort_spinning.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_peers import CORES, cpu_model, log, time_interleaved, write_results  # noqa: E402

MATMULS = 20


def load(name: str):
    from kiln.examples import models

    if name == "minilm":
        model, _ = models.minilm(1, 128)
        return model, tuple(models.sentence_tokens(["a sentence to embed"], seq=128))
    model, _ = models.efficientnet_lite0(1)
    return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)


def build(model, inputs, spin_us):
    import kiln
    from kiln.backends import onnxruntime as ort_backend

    kept = ort_backend.INTRA_OP_SPIN_US
    ort_backend.INTRA_OP_SPIN_US = spin_us
    try:
        return kiln.optimize(model, "cpu-x86", inputs, backend="onnxruntime", precision="fp32", cache=False, isolate=False)
    finally:
        ort_backend.INTRA_OP_SPIN_US = kept


def run_case(name: str, rounds: int, iters: int) -> list[dict]:
    from kiln.backends.onnxruntime import INTRA_OP_SPIN_US

    model, inputs = load(name)
    weight = torch.randn(512, 512, generator=torch.Generator().manual_seed(1))

    def work():
        for _ in range(MATMULS):
            weight @ weight

    engines = {f"spin bounded ({INTRA_OP_SPIN_US} us, kiln)": build(model, inputs, INTRA_OP_SPIN_US),
               "ORT's default spinning": build(model, inputs, None)}
    calls = {"work alone": work}
    for label, compiled in engines.items():
        calls[f"{label}: call"] = lambda compiled=compiled: compiled(*inputs)
        calls[f"{label}: call, then work"] = lambda compiled=compiled: (compiled(*inputs), work())
    with torch.no_grad():
        samples, errors = time_interleaved(calls, rounds, iters)
    med = {label: statistics.median(s) * 1e3 for label, s in samples.items()}
    rows = []
    for label in engines:
        call, both = med[f"{label}: call"], med[f"{label}: call, then work"]
        rows.append({"model": name, "engine": label, "call_ms": call, "call_then_work_ms": both,
                     "work_alone_ms": med["work alone"], "taken_from_work_ms": both - call - med["work alone"],
                     "work_slowdown": (both - call) / med["work alone"]})
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [f"# ONNX Runtime's spinning threads and the work after a call ({datetime.datetime.now().isoformat(timespec='seconds')})",
             "", f"- command: `{' '.join(['python bench/ort_spinning.py', *sys.argv[1:]])}`",
             f"- machine: {cpu_model()}, {CORES} usable cores; 1-min load average {os.getloadavg()[0]:.2f}",
             f"- {args.rounds} rounds x {args.iters} timed calls, interleaved; batch 1, MiniLM at seq 128; fp32 on ONNX Runtime "
             f"built by kiln; work = {MATMULS} fp32 512x512 matmuls in PyTorch", "",
             "| model | engine | call ms | call, then work ms | work alone ms | time taken from the work ms | work ran at |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r['call_ms']:.2f} | {r['call_then_work_ms']:.2f} | "
                     f"{r['work_alone_ms']:.2f} | {r['taken_from_work_ms']:.2f} | {r['work_slowdown']:.2f}x its time alone |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,efficientnet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ort_spinning.md"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        log(f"{name}: building and timing")
        rows += run_case(name, args.rounds, args.iters)
    write_results(markdown(rows, args), rows, Path(args.out))


if __name__ == "__main__":
    main()
