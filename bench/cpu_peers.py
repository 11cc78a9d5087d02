"""kiln against its CPU peers: eager PyTorch, torch.compile, plain ONNX Runtime, OpenVINO and kiln.

For each (model, batch) case every contender is built first, then all are timed
interleaved on the same inputs: per round, in an order that rotates each round, one
untimed call (runtimes leave worker threads spinning after a call) and `--iters` timed
calls. Reports median / p99 latency, speedup over eager, build ("compile") seconds, max
abs error against eager, and the median as a multiple of a roofline floor measured in the
same run (fp32 GEMM rate and copy bandwidth of this machine).

Run (the full benchmark; `make bench` runs the same):
    . .venv/bin/activate && python bench/cpu_peers.py
A quick smoke run:
    python bench/cpu_peers.py --models efficientnet --batches 1 --rounds 1 --iters 2 --out /tmp/smoke.md
Progress goes to stderr; the markdown table to stdout and to --out (a .json beside it).
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
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from kiln.build.select import SETTLE_SECONDS
from kiln.profile_host import cpu_model

CONTENDERS = ("eager", "torch.compile", "onnxruntime", "openvino", "kiln")
# Not run unless asked: OpenVINO's own default precision (bf16 on CPUs with AVX512_BF16), a
# lower-precision peer for comparisons with kiln's precision options.
OPTIONAL_CONTENDERS = ("openvino-default",)
CORES = len(os.sched_getaffinity(0))


def log(msg: str) -> None:
    """Progress line to stderr (stdout carries only the final table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_case(name: str, batch: int):
    """(model, inputs) for a model name and batch size."""
    from kiln.examples import models

    factories = {"minilm": lambda: models.minilm(batch=batch, seq=128),
                 "efficientnet": lambda: models.efficientnet_lite0(batch=batch),
                 "bert-base": lambda: models.bert_base(batch=batch, seq=128),
                 "gpt2": lambda: models.gpt2_small(batch=batch, seq=128),
                 "resnet50": lambda: models.resnet50(batch=batch)}
    if name not in factories:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(factories)}")
    return factories[name]()


# ---------------------------------------------------------------- roofline

def gemm_rate(n: int = 2048, reps: int = 7) -> float:
    """Median fp32 `torch.mm` rate of an n x n x n product, in FLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def copy_bandwidth(mbytes: int = 256, reps: int = 7) -> float:
    """Median bandwidth of `dst.copy_(src)` on a float32 tensor of `mbytes` MB, counting
    bytes read plus bytes written, in bytes/s."""
    src = torch.randn(mbytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (also faults the pages in)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times)


def model_flops(model: torch.nn.Module, inputs: tuple) -> int:
    """FLOPs of one eager forward. FlopCounterMode does not count the CPU SDPA kernel, so
    for a transformer (a `config` with attention sizes) add QK^T and PV when it counted none."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    flops = counter.get_total_flops()
    counted_sdpa = any("attention" in str(op) for op in counter.get_flop_counts().get("Global", {}))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "num_attention_heads") and not counted_sdpa:
        batch, seq = inputs[0].shape[:2]
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        flops += cfg.num_hidden_layers * 4 * batch * heads * seq * seq * head_dim
    return flops


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------- contenders

def flat_outputs(out, keys: list | None = None) -> list[torch.Tensor]:
    """Output tensors in a fixed order: by `keys` for dict-likes (ModelOutput, kiln's
    Outputs), else in pytree leaf order (ORT's list already is in that order)."""
    if keys is not None and hasattr(out, "keys"):
        return [out[k] for k in keys]
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def build_eager(model, inputs):
    """Eager fp32 under no_grad; nothing to build."""
    def call():
        with torch.no_grad():
            return model(*inputs)
    return call, None, ""


def build_torch_compile(model, inputs):
    """`torch.compile(model)` (inductor, default mode); the first call is the compile time."""
    compiled = torch.compile(model)

    def call():
        with torch.no_grad():
            return compiled(*inputs)
    start = time.perf_counter()
    call()
    return call, time.perf_counter() - start, ""


def build_onnxruntime(model, inputs):
    """Dynamo export at opset 20, then an ORT CPU session (ORT_ENABLE_ALL, one intra-op
    thread per usable core); export plus session creation is the compile time."""
    import onnxruntime as ort

    start = time.perf_counter()
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=20)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = CORES
    session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - start
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"exported graph takes {names}, model was given {len(inputs)} inputs")

    def call():
        feeds = {n: t.numpy() for n, t in zip(names, inputs)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]
    return call, seconds, ""


def _build_openvino(model, inputs, precision: str | None):
    """`openvino.convert_model` of the exported program, compiled for CPU with the latency hint
    and one thread per usable core; `precision` sets INFERENCE_PRECISION_HINT (None: OpenVINO's
    default, which is bf16 on CPUs with AVX512_BF16 or AMX)."""
    import openvino as ov

    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, inputs, strict=False)
    ov_model = ov.convert_model(program)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": CORES}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    seconds = time.perf_counter() - start
    request = compiled.create_infer_request()
    used = compiled.get_property("INFERENCE_PRECISION_HINT")

    def call():
        request.infer([t.numpy() for t in inputs], share_inputs=True)
        return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(len(compiled.outputs))]
    return call, seconds, f"inference precision {getattr(used, 'get_type_name', lambda: used)()}"


def build_openvino(model, inputs):
    return _build_openvino(model, inputs, "f32")


def build_openvino_default(model, inputs):
    return _build_openvino(model, inputs, None)


def build_kiln(model, inputs):
    """`kiln.optimize(model, "cpu-x86", inputs, precision="fp32")` (every peer here runs fp32);
    its wall time is the compile time and the note names the backend each partition got."""
    import kiln

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        # a real build, not a cache hit
        compiled = kiln.optimize(model, "cpu-x86", inputs, precision="fp32", cache=False)
    seconds = time.perf_counter() - start
    note = ", ".join(sorted(set(compiled.backends.values())))
    return (lambda: compiled(*inputs)), seconds, note


BUILDERS = {"eager": build_eager, "torch.compile": build_torch_compile,
            "onnxruntime": build_onnxruntime, "openvino": build_openvino,
            "openvino-default": build_openvino_default, "kiln": build_kiln}


# ---------------------------------------------------------------- one case

def time_interleaved(calls: dict, rounds: int, iters: int) -> tuple[dict, dict]:
    """Per round, each contender in a rotating order: a pause for the previous contender's
    spinning worker threads to park (kiln's SETTLE_SECONDS), one untimed call, then `iters`
    timed calls. Returns (timed samples in seconds per contender, error text per contender that
    raised while timed; such a contender is dropped from later rounds)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    errors: dict[str, str] = {}
    order = list(calls)
    for r in range(rounds):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            if name in errors:
                continue
            call = calls[name]
            time.sleep(SETTLE_SECONDS)
            try:
                call()
                for _ in range(iters):
                    t = time.perf_counter()
                    call()
                    samples[name].append(time.perf_counter() - t)
            except Exception as exc:
                errors[name] = f"while timed: {type(exc).__name__}: {exc}"[:200]
                log(f"  {name} FAILED {errors[name]}")
        log(f"  round {r + 1}/{rounds} done")
    return {n: s for n, s in samples.items() if s and n not in errors}, errors


def time_into_rows(calls: dict, rows: dict, rounds: int, iters: int) -> None:
    """Time `calls` interleaved (eager among them) and write each row's median / p99 / speedup
    over eager, or the error it raised while timed. Used by the other bench scripts."""
    with torch.no_grad():
        samples, errors = time_interleaved(calls, rounds, iters)
    eager = statistics.median(samples["eager"]) if "eager" in samples else None
    for label, row in rows.items():
        if label in errors:
            row["error"] = errors[label]
        if label in samples:
            med = statistics.median(samples[label])
            row.update(median_ms=med * 1e3, p99_ms=p99(samples[label]) * 1e3, vs_eager=eager / med if eager else None)


def p99(values: list[float]) -> float:
    """99th percentile, linear interpolation (the max for fewer than ~100 samples)."""
    return float(np.percentile(values, 99))


def run_case(name: str, batch: int, contenders: list[str], args, rate: float, bw: float) -> list[dict]:
    """Build every contender for one case, time them interleaved, and return table rows."""
    torch.manual_seed(0)
    model, inputs = load_case(name, batch)
    flops, wbytes = model_flops(model, inputs), weight_bytes(model)
    floor_s = max(flops / rate, wbytes / bw)
    log(f"{name} b{batch}: {flops / 1e9:.2f} GFLOP, {wbytes / 2 ** 20:.1f} MiB weights, "
        f"floor {floor_s * 1e3:.2f} ms")
    with torch.no_grad():
        reference = model(*inputs)
    keys = list(reference.keys()) if hasattr(reference, "keys") else None
    ref_flat = flat_outputs(reference, keys)

    base = {"model": name, "batch": batch, "gflop": flops / 1e9, "weight_mib": wbytes / 2 ** 20,
            "floor_ms": floor_s * 1e3}
    rows, calls = {}, {}
    for contender in ["eager"] + [c for c in contenders if c != "eager"]:
        log(f"{name} b{batch}: building {contender} ...")
        row = dict(base, contender=contender, compile_s=None, note="", error=None)
        try:
            call, row["compile_s"], row["note"] = BUILDERS[contender](model, inputs)
            out = flat_outputs(call(), keys)
            if len(out) != len(ref_flat):
                raise RuntimeError(f"{len(out)} outputs, eager has {len(ref_flat)}")
            row["max_abs_err"] = max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, ref_flat))
            calls[contender] = call
            log(f"  built in {row['compile_s'] or 0:.1f} s, max abs err {row['max_abs_err']:.2e} {row['note']}")
        except Exception as exc:  # one failing contender must not stop the run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            log(f"  FAILED: {row['error']}")
        rows[contender] = row

    log(f"{name} b{batch}: timing {', '.join(calls)} ({args.rounds} rounds x {args.iters} iters)")
    samples, errors = time_interleaved(calls, args.rounds, args.iters)
    for contender, error in errors.items():
        rows[contender]["error"] = error
    eager_median = statistics.median(samples["eager"]) if samples.get("eager") else None
    for contender, times in samples.items():
        med = statistics.median(times)
        rows[contender].update(median_ms=med * 1e3, p99_ms=p99(times) * 1e3, x_floor=med / floor_s,
                               vs_eager=eager_median / med if eager_median else None,
                               samples_ms=[t * 1e3 for t in times])
    keep = set(contenders)
    return [r for c, r in rows.items() if c in keep]


# ---------------------------------------------------------------- report

def fmt(value, spec: str, suffix: str = "") -> str:
    """Format a number (plus `suffix`), or '-' when absent."""
    return "-" if value is None else format(value, spec) + suffix


def markdown(rows: list[dict], header: list[str]) -> str:
    """The results table with its header lines."""
    lines = [*header, "",
             "| model | batch | contender | median ms | p99 ms | vs eager | x floor | compile s | max abs err | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = f"FAILED: {r['error']}" if r["error"] else r["note"]
        note = note.replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['batch']} | {r['contender']} | {fmt(r.get('median_ms'), '.2f')} | "
                     f"{fmt(r.get('p99_ms'), '.2f')} | {fmt(r.get('vs_eager'), '.2f', 'x')} | "
                     f"{fmt(r.get('x_floor'), '.1f')} | {fmt(r.get('compile_s'), '.1f')} | "
                     f"{fmt(r.get('max_abs_err'), '.1e')} | {note} |")
    return "\n".join(lines) + "\n"


def write_results(table: str, rows: list[dict], out: Path) -> None:
    """Print the markdown table and write it to `out`, with the rows and argv as JSON beside it."""
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1, default=str))
    log(f"wrote {out}")


def _openvino_version() -> str:
    try:
        import openvino
    except ImportError:
        return "not installed"
    return openvino.get_version()


def main(argv: list[str] | None = None) -> None:
    """Parse flags, measure the roofline, run every case and write the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base,efficientnet")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10, help="timed calls per block")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_peers.md"))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    args = parser.parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(CONTENDERS) - set(OPTIONAL_CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS + OPTIONAL_CONTENDERS)}")
    import onnxruntime as ort

    load_before = os.getloadavg()[0]
    log("measuring GEMM rate and copy bandwidth ...")
    rate, bw = gemm_rate(), copy_bandwidth()
    log(f"fp32 GEMM {rate / 1e9:.0f} GFLOP/s, copy {bw / 1e9:.1f} GB/s")
    rows = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for batch in [int(b) for b in args.batches.split(",")]:
            rows += run_case(model_name, batch, contenders, args, rate, bw)
            torch._dynamo.reset()  # drop compiled graphs of the finished case

    header = [f"# kiln vs CPU peers ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
              f"- machine: {cpu_model()}, {CORES} usable cores (torch threads {torch.get_num_threads()})",
              f"- 1-min load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end "
              "(above the core count means other processes competed for the cores)",
              f"- torch {torch.__version__}, onnxruntime {ort.__version__}, openvino {_openvino_version()}, "
              f"python {platform.python_version()}",
              f"- measured fp32 GEMM (2048^3 mm): {rate / 1e9:.0f} GFLOP/s; copy bandwidth (256 MB, "
              f"read+write): {bw / 1e9:.1f} GB/s",
              f"- {args.rounds} rounds x {args.iters} timed calls per contender, interleaved; "
              "x floor = median / max(FLOPs / GEMM rate, weight bytes / bandwidth)"]
    table = markdown(rows, header)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    meta = {"argv": sys.argv, "cpu": cpu_model(), "cores": CORES, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "gemm_gflops": rate / 1e9, "copy_gbs": bw / 1e9,
            "loadavg_start": load_before, "loadavg_end": os.getloadavg()[0]}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    log(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
