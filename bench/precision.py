"""kiln's precision choices against the low-precision peers, on speed and on real-data accuracy.

For MiniLM (sentence embeddings) and EfficientNet-Lite0 (image classes) at each batch size:
  - eager fp32 (the reference for time and accuracy)
  - OpenVINO with its default precision (bf16 on CPUs with AVX512_BF16 or AMX)
  - ONNX Runtime INT8 as its users run it: `quantize_dynamic(per_channel=True)` for MiniLM,
    `quantize_static` (QDQ, per-channel, calibrated) for EfficientNet-Lite0
  - kiln `precision="auto"` at the default budget (no calibration data)
  - kiln `precision="auto"`, `accuracy_budget=Budget(min_cosine=0.995)` with calibration data
  - the same at `min_cosine=0.999`: what a stricter budget costs in speed and buys in top-1
All are timed interleaved on the same inputs; accuracy is measured on bundled real data
(kiln.examples.accuracy): ~400 English sentences (embedding cosine to fp32, min over
sentences; nearest-neighbour agreement) and ~100 views of photographs (top-1 / top-5
agreement with fp32). Calibration samples are held out from the evaluated data.

    . .venv/bin/activate && python bench/precision.py
    python bench/precision.py --models minilm --batches 1 --rounds 2 --iters 3 --out /tmp/p.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_peers import CORES, cpu_model, fmt, log, time_into_rows, write_results  # noqa: E402

CONTENDERS = ("eager", "openvino-default", "onnxruntime-int8", "kiln-auto", "kiln-0.995", "kiln-0.999")
SEQ = 128
TRANSFORMERS = ("minilm", "bert-base", "gpt2")  # ONNX Runtime int8 quantizes these dynamically


# ---------------------------------------------------------------- data

def minilm_data(batch: int):
    from kiln.examples import accuracy, models

    model, _ = models.minilm(batch, SEQ)
    evaluated = accuracy.load_pairs(accuracy.EVAL_GROUPS)
    calibration = accuracy.sentence_calibration(batch, SEQ)
    inputs = models.sentence_tokens(accuracy.distinct_sentences(evaluated)[:batch], seq=SEQ)
    return model, tuple(inputs), calibration, evaluated


def efficientnet_data(batch: int):
    from kiln.examples import accuracy, models

    model, _ = models.efficientnet_lite0(batch)
    evaluated = accuracy.load_images()
    calibration = accuracy.photo_calibration(batch)
    return model, (evaluated.pixels[:batch],), calibration, evaluated


def accuracy_of(name: str, model, fn, evaluated, batch: int) -> dict:
    from kiln.examples import accuracy

    if name == "minilm":
        result = accuracy.embedding_agreement(model, fn, evaluated, batch=batch, seq=SEQ)
        return {"cosine_min": result.cosine_min, "cosine_mean": result.cosine_mean,
                "neighbours_kept": result.neighbour_agreement, "spearman": result.pair_spearman}
    result = accuracy.classification_agreement(model, fn, evaluated, batch=batch)
    return {"top1": result.top1, "top5": result.top5, "logit_error_max": result.logit_error_max,
            "logit_cosine_min": result.cosine_min, "top1_changed_on": result.changed_text()}


# ---------------------------------------------------------------- contenders (each returns fn(*tensors))

def build_eager(model, inputs, calibration, name):
    def run(*tensors):
        with torch.no_grad():
            return model(*tensors)
    return run, "fp32"


def build_openvino_default(model, inputs, calibration, name):
    import openvino as ov

    with torch.no_grad():
        program = torch.export.export(model, inputs, strict=False)
    compiled = ov.Core().compile_model(ov.convert_model(program), "CPU",
                                       {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": CORES})
    request = compiled.create_infer_request()
    used = compiled.get_property("INFERENCE_PRECISION_HINT")  # OpenVINO's own default
    note = f"inference precision {getattr(used, 'get_type_name', lambda: used)()}"

    def run(*tensors):
        request.infer([t.numpy() for t in tensors], share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run, note


def build_onnxruntime_int8(model, inputs, calibration, name):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    work = Path(tempfile.mkdtemp(prefix="bench-ort-int8-"))
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=20)
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    program.save(str(fp32))
    names = [i.name for i in ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()]
    if name in TRANSFORMERS:
        quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
        note = "quantize_dynamic per-channel int8"
    else:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{n: t.numpy() for n, t in zip(names, sample)} for sample in calibration])

            def get_next(self):
                return next(self.items, None)
        quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        note = f"quantize_static QDQ per-channel int8, {len(calibration)} calibration batches"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = CORES
    session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])

    def run(*tensors):
        return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})[0])
    return run, note


def _kiln(model, inputs, **options):
    import kiln

    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kiln's unproven-accuracy warning is in its report too
        compiled = kiln.optimize(model, "cpu-x86", inputs, cache=False, **options)
    backends = ", ".join(sorted(set(compiled.backends.values())))
    return compiled, f"{backends}; {compiled.report.precision_summary}"


def build_kiln_auto(model, inputs, calibration, name):
    compiled, note = _kiln(model, inputs)
    return compiled, note


def build_kiln_budget(min_cosine: float):
    def build(model, inputs, calibration, name):
        import kiln

        return _kiln(model, inputs, accuracy_budget=kiln.Budget(min_cosine=min_cosine),
                     calibration=[sample for sample in calibration])
    return build


BUILDERS = {"eager": build_eager, "openvino-default": build_openvino_default,
            "onnxruntime-int8": build_onnxruntime_int8, "kiln-auto": build_kiln_auto,
            "kiln-0.995": build_kiln_budget(0.995), "kiln-0.999": build_kiln_budget(0.999)}


# ---------------------------------------------------------------- one case

def run_case(name: str, batch: int, contenders: list[str], args) -> list[dict]:
    torch.manual_seed(0)
    model, inputs, calibration, evaluated = (minilm_data if name == "minilm" else efficientnet_data)(batch)
    rows, calls = {}, {}
    for contender in contenders:
        log(f"{name} b{batch}: building {contender} ...")
        row = {"model": name, "batch": batch, "contender": contender, "error": None}
        start = time.perf_counter()
        try:
            fn, row["note"] = BUILDERS[contender](model, inputs, calibration, name)
            row["build_s"] = time.perf_counter() - start
            row.update(accuracy_of(name, model, fn, evaluated, batch))
            calls[contender] = (lambda fn=fn: fn(*inputs))
            log(f"  {row['build_s']:.1f} s; {row['note']}; " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                                        if isinstance(v, float) and k != "build_s")
                + (f"; top-1 changed on {row['top1_changed_on']}" if row.get("top1_changed_on") else ""))
        except Exception as exc:  # one failing contender must not stop the run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
            log(f"  FAILED: {row['error']}")
        rows[contender] = row
    log(f"{name} b{batch}: timing {', '.join(calls)}")
    time_into_rows(calls, rows, args.rounds, args.iters)
    return list(rows.values())


def markdown(rows: list[dict], header: list[str]) -> str:
    lines = [*header, "",
             "| model | batch | contender | median ms | p99 ms | vs eager | accuracy vs fp32 on real data | what ran |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        if "cosine_min" in r:
            acc = (f"cosine min {r['cosine_min']:.5f}, mean {r['cosine_mean']:.6f}; "
                   f"neighbours kept {r['neighbours_kept']:.1%}")
        elif "top1" in r:
            acc = (f"top-1 {r['top1']:.1%}, top-5 {r['top5']:.1%}, worst logit err {r['logit_error_max']:.3g}, "
                   f"logit cosine min {r['logit_cosine_min']:.5f}"
                   + (f"; changed: {r['top1_changed_on']}" if r.get("top1_changed_on") else ""))
        else:
            acc = "-"
        note = (f"FAILED: {r['error']}" if r["error"] else r.get("note", "")).replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['batch']} | {r['contender']} | {fmt(r.get('median_ms'), '.2f')} | "
                     f"{fmt(r.get('p99_ms'), '.2f')} | {fmt(r.get('vs_eager'), '.2f', 'x')} | {acc} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,efficientnet")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision.md"))
    args = parser.parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := set(contenders) - set(CONTENDERS):
        parser.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    if "eager" not in contenders:
        contenders.insert(0, "eager")
    from kiln.examples import accuracy

    load_before = os.getloadavg()[0]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for batch in [int(b) for b in args.batches.split(",")]:
            rows += run_case(name, batch, contenders, args)
            torch._dynamo.reset()
    header = [f"# kiln precision vs low-precision peers ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
              f"- machine: {cpu_model()}, {CORES} usable cores; 1-min load average {load_before:.2f} at start, "
              f"{os.getloadavg()[0]:.2f} at end",
              f"- {args.rounds} rounds x {args.iters} timed calls, interleaved; MiniLM at seq {SEQ}",
              f"- accuracy: MiniLM on {3 * accuracy.EVAL_GROUPS} bundled sentence pairs (calibration from the other groups); "
              f"EfficientNet-Lite0 on all {len(accuracy.VIEWS) * len(accuracy.PHOTOS)} photo views "
              f"(calibration: {len(accuracy.CALIBRATION_VIEWS) * len(accuracy.PHOTOS)} other views of the same photos)"]
    write_results(markdown(rows, header), rows, Path(args.out))


if __name__ == "__main__":
    main()
