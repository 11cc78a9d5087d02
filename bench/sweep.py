"""The latency-accuracy curve of an example model on its bundled real data: `kiln sweep` run as a
user runs it, its table, JSON and plot kept under bench/results.

    python bench/sweep.py minilm          # MiniLM b1 on the sentence pairs
    python bench/sweep.py efficientnet    # EfficientNet-Lite0 b1 on the photos

Each is exactly this CLI command (artifacts into a temporary folder, dropped afterwards):
    kiln sweep kiln.examples.models:minilm --factory-arg batch=1 --evaluate sentence-pairs -o DIR/
    kiln sweep kiln.examples.models:efficientnet_lite0 --factory-arg batch=1 --evaluate photos -o DIR/
with --settings (default below). Writes bench/results/sweep_<name>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"minilm": ("kiln.examples.models:minilm", "sentence-pairs"),
          "efficientnet": ("kiln.examples.models:efficientnet_lite0", "photos")}
SETTINGS = "fp32,auto,auto:0.999,auto:0.995,auto:0.99,bf16,int8:0.99"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--settings", default=SETTINGS)
    parser.add_argument("--measure-seconds", default="1.0", help="timing budget per engine (kiln sweep --measure-seconds)")
    parser.add_argument("--effort", default="default")
    parser.add_argument("--calibration-samples", default="12", help="held-out calibration samples (kiln sweep --calibration-samples)")
    parser.add_argument("--out", help="results stem (default bench/results/sweep_<model>)")
    args = parser.parse_args()
    import logging

    from kiln.cli import main as kiln_main
    from kiln.progress import terminal_handler

    logging.getLogger("kiln").addHandler(terminal_handler())  # progress lines in a log file too, not only on a terminal
    logging.getLogger("kiln").setLevel(logging.INFO)

    factory, evaluate = MODELS[args.model]
    stem = Path(args.out) if args.out else HERE / "results" / f"sweep_{args.model}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-sweep-") as folder:
        argv = ["sweep", factory, "--factory-arg", "batch=1", "--evaluate", evaluate, "--settings", args.settings,
                "--effort", args.effort, "--measure-seconds", args.measure_seconds,
                "--calibration-samples", args.calibration_samples, "-o", folder + "/"]
        code = kiln_main(argv)
        if code != 0:
            return code
        data = json.loads((Path(folder) / "sweep.json").read_text())
        shutil.copyfile(Path(folder) / "sweep.png", stem.with_suffix(".png"))
    for point in data["points"]:  # the artifacts were in a temporary folder: keep their names only
        point["artifact"] = Path(point["artifact"]).name if point["artifact"] else None
    machine = _machine(load_before, time.perf_counter() - started)
    stem.with_suffix(".json").write_text(json.dumps({"command": "kiln " + " ".join(argv[:-2]) + " -o DIR/",
                                                     "machine": machine, "sweep": data}, indent=1))
    stem.with_suffix(".md").write_text(_markdown(args.model, argv, data, machine, stem.with_suffix(".png").name))
    print(f"wrote {stem}.md, .json, .png", file=sys.stderr)
    return 0


def _machine(load_before: float, seconds: float) -> dict:
    import onnxruntime
    import openvino
    import torch

    from kiln.host import cpu_flags
    from kiln.profile_host import cpu_model

    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "flags": cpu_flags(),
            "load_average_start": round(load_before, 2), "load_average_end": round(os.getloadavg()[0], 2),
            "seconds": round(seconds), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__, "python": platform.python_version()}


def _load_words(machine: dict) -> str:
    """Whether other work competed for the cores while this ran (a load above the core count)."""
    if max(machine["load_average_start"], machine["load_average_end"]) > machine["cores"]:
        return ("the machine was shared with other work while this ran (above the core count, other processes "
                "competed for the cores), so absolute times are noisy; every build and eager were timed interleaved "
                "in one loop, so the ratios are the figures to read")
    return "a quiet machine (at or below the core count); every build and eager were timed interleaved in one loop"


def _markdown(model: str, argv: list[str], data: dict, machine: dict, png: str) -> str:
    name = data["accuracy_name"]
    lines = [f"# kiln sweep: {data['model']} (batch 1) on {data['profile']} ({datetime.date.today().isoformat()})", "",
             f"- command: `kiln {' '.join(argv[:-2])} -o DIR/` (via `python bench/sweep.py {model}`)",
             f"- machine: {machine['cpu']}, {machine['cores']} usable cores; CPU flags kiln reads: {', '.join(machine['flags'])}",
             f"- 1-min load average: {machine['load_average_start']} at start, {machine['load_average_end']} at the end: "
             + _load_words(machine),
             f"- torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, openvino {machine['openvino']}, "
             f"python {machine['python']}; ran {machine['seconds']} s",
             f"- accuracy: `{name}` on the bundled real data (eager PyTorch fp32: {data['reference_score']:.6g}); "
             f"cosine to eager over {data['evaluated_inputs']} inputs (the example and the data), worst output row",
             "", f"![latency against accuracy]({png})", "",
             f"| # | setting | front | median ms | p99 ms | x eager | {name} | cosine min | backend | chosen |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| - | eager PyTorch | | {data['eager_ms']:.3f} | {data['eager_p99_ms']:.3f} | 1.00 | "
                 f"{data['reference_score']:.6g} | 1 | | |")
    for p in sorted(data["points"], key=lambda p: (p["status"] != "built", p["median_ms"] or 0)):
        if p["status"] != "built":
            lines.append(f"| {p['index']} | {p['label']} | failed | | | | | | | {p['reason']} |")
            continue
        backends = ", ".join(sorted(set(p["backends"].values())))
        lines.append(f"| {p['index']} | {p['label']} | {'yes' if p['on_front'] else ''} | {p['median_ms']:.3f} | "
                     f"{p['p99_ms']:.3f} | {p['speedup_vs_eager']:.2f} | {p['score']:.6g} | {p['cosine_min']:.6f} | "
                     f"{backends} | {p['precision_summary'] or 'fp32'} |")
    lines += ["", "Front: " + ", ".join(f"#{i}" for i in data["front"]) + " (no other point is as fast and as accurate).",
              "Each point is a verified build (optimize() verifies it against eager on its budget); its artifact, "
              "with this curve in its report, is what `kiln sweep -o DIR/ --pick N` hands over."]
    lines += [f"- note: {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
