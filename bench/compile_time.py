"""How long kiln takes to give a verified engine, at each effort, against its peers' build times.

For each model and batch, at each precision (fp32 and the default "auto"):
  - a cold compile at each effort, every one in a fresh process with an empty compile cache:
      "default, first on host"  default effort with no host record (the first compile of a kind
                                of graph on this machine: every candidate is built)
      "max"                     every candidate built and timed, with autotuning; it writes the
                                host record the next rows read
      "default", "fast"         with the host record the max run wrote
    Each row gives the wall seconds of kiln.optimize() (model built and kiln imported before),
    by stage, and which candidates were built;
  - a compile-cache hit of the default build: in a fresh process, and repeated in that process;
  - kiln.load of the saved default artifact plus its first call, in a fresh process;
  - every artifact's latency, timed interleaved in one process on the example inputs
    (kiln.build.select.time_interleaved), and each as a multiple of the max effort's.
Peers, once per model and batch, each in a fresh process: ONNX Runtime (dynamo export + session)
and OpenVINO (export + convert + compile, f32) build seconds, and torch.compile's first call.

Run:
    . .venv/bin/activate && python bench/compile_time.py
A quick run:
    python bench/compile_time.py --cases minilm:1 --precisions fp32 --out /tmp/ct.md
Progress goes to stderr; the markdown table to --out (a .json beside it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("minilm:1", "minilm:8", "efficientnet:1", "efficientnet:8", "bert-base:1", "gpt2:1", "resnet50:1")
EFFORT_ROWS = ("default, first on host", "max", "default", "fast")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- child processes

def child(task: dict) -> dict:
    """One measurement in this (fresh) process; returns what the parent tabulates."""
    sys.path.insert(0, str(HERE))
    import torch

    from cpu_peers import load_case

    model, inputs = load_case(task["model"], task["batch"])
    kind = task["kind"]
    if kind in ("onnxruntime", "openvino", "torch.compile"):
        from cpu_peers import build_onnxruntime, build_openvino, build_torch_compile

        builder = {"onnxruntime": build_onnxruntime, "openvino": build_openvino, "torch.compile": build_torch_compile}[kind]
        _, seconds, _ = builder(model, inputs)
        return {"seconds": seconds}
    import kiln

    if kind == "compile":
        start = time.perf_counter()
        compiled = kiln.optimize(model, "cpu-x86", inputs, precision=task["precision"], effort=task["effort"],
                                 cache_dir=task["cache_dir"], progress=False)
        seconds = time.perf_counter() - start
        compiled.save(task["artifact"])
        return {"seconds": seconds, "timings": compiled.report.timings, "backends": compiled.backends,
                "candidates": [[c.backend, c.status, c.compile_seconds] for c in compiled.report.candidates],
                "lowered": bool(compiled.report.lowered)}
    if kind == "hit":
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            compiled = kiln.optimize(model, "cpu-x86", inputs, precision=task["precision"],
                                     effort=task.get("effort", "default"), cache_dir=task["cache_dir"], progress=False)
            seconds.append(time.perf_counter() - start)
        hit = any("loaded from the compile cache" in n for n in compiled.report.notes)
        quick = any("fingerprint" in n for n in compiled.report.notes)
        return {"first": seconds[0], "repeat": min(seconds[1:]), "hit": hit, "quick": quick}
    if kind == "load":
        start = time.perf_counter()
        loaded = kiln.load(task["artifact"])
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        loaded(*inputs)
        return {"load": load_seconds, "first_call": time.perf_counter() - start}
    if kind == "latency":
        from kiln.build.select import time_interleaved

        engines = {label: kiln.load(path) for label, path in task["artifacts"].items()}
        calls = [lambda *x, e=e: e(*x) for e in engines.values()]
        medians = time_interleaved(calls, tuple(inputs), task["seconds"] * len(calls))
        return {label: m * 1000 for label, m in zip(engines, medians)}
    raise SystemExit(f"unknown task kind {kind!r}")


def run_child(task: dict, timeout: float = 1800) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(task)]
    # Inductor keeps compiled graphs in a cache under /tmp across processes: each child gets an
    # empty one, so torch.compile's first call and kiln's Inductor candidate are timed cold
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as inductor_cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {done.returncode}: {tail[-400:]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- one case

def run_case(model: str, batch: int, precisions: list[str], efforts: list[str], peers: bool, root: Path,
             latency_seconds: float) -> dict:
    case = {"model": model, "batch": batch, "precisions": {}, "peers": {}}
    base = {"model": model, "batch": batch}
    if peers:
        for peer in ("onnxruntime", "openvino", "torch.compile"):
            log(f"{model} b{batch}: {peer} build")
            case["peers"][peer] = run_child({**base, "kind": peer})
    for precision in precisions:
        work = root / f"{model}-b{batch}-{precision}"
        work.mkdir(parents=True, exist_ok=True)
        host = work / "host-record"  # the record max writes and default/fast read
        rows, artifacts = {}, {}
        for label in EFFORT_ROWS:
            effort = "default" if label.startswith("default") else label
            if effort not in efforts or label.endswith("first on host") and "first on host" not in efforts:
                continue
            cache_dir = work / f"cache-{label.replace(', ', '-').replace(' ', '-')}"
            if label in ("default", "fast") and (host / "host-record.json").is_file():
                cache_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(host / "host-record.json", cache_dir / "host-record.json")
            artifact = work / f"{label.replace(', ', '-').replace(' ', '-')}.kiln"
            log(f"{model} b{batch} {precision}: compile, effort {label}")
            result = run_child({**base, "kind": "compile", "precision": precision, "effort": effort,
                                "cache_dir": str(cache_dir), "artifact": str(artifact)})
            rows[label] = result
            if "error" not in result:
                artifacts[label] = str(artifact)
            if label == "max" and (cache_dir / "host-record.json").is_file():
                host.mkdir(exist_ok=True)
                shutil.copy(cache_dir / "host-record.json", host / "host-record.json")
        if "default" in rows and "error" not in rows["default"]:
            log(f"{model} b{batch} {precision}: cache hit, load + first call")
            rows["default"]["cache_hit"] = run_child({**base, "kind": "hit", "precision": precision,
                                                      "cache_dir": str(work / "cache-default")})
            rows["default"]["load"] = run_child({**base, "kind": "load", "artifact": artifacts["default"]})
        if artifacts:
            log(f"{model} b{batch} {precision}: latency of {len(artifacts)} artifacts, interleaved")
            latency = run_child({**base, "kind": "latency", "artifacts": artifacts, "seconds": latency_seconds})
            for label in artifacts:
                rows[label]["latency_ms"] = latency.get(label)
        case["precisions"][precision] = rows
    return case


def run_hits(model: str, batch: int, precisions: list[str], root: Path) -> dict:
    """A build, then its cache hit and its load + first call, each in a fresh process."""
    case = {"model": model, "batch": batch, "precisions": {}, "peers": {}}
    for precision in precisions:
        work = root / f"{model}-b{batch}-{precision}-hits"
        work.mkdir(parents=True, exist_ok=True)
        base = {"model": model, "batch": batch}
        log(f"{model} b{batch} {precision}: compile (effort fast), cache hit, load + first call")
        row = run_child({**base, "kind": "compile", "precision": precision, "effort": "fast", "cache_dir": str(work / "cache"),
                         "artifact": str(work / "fast.kiln")})
        if "error" not in row:
            row["cache_hit"] = run_child({**base, "kind": "hit", "precision": precision, "effort": "fast",
                                          "cache_dir": str(work / "cache")})
            row["load"] = run_child({**base, "kind": "load", "artifact": str(work / "fast.kiln")})
        case["precisions"][precision] = {"fast": row}
    return case


# ---------------------------------------------------------------- tables

def _stages(timings: dict) -> str:
    keys = ("capture", "passes", "compile", "verify")
    return ", ".join(f"{k} {timings[k]:.1f}" for k in keys if k in timings)


def _built(candidates: list) -> str:
    built = [f"{b} {s:.1f}s" for b, status, s in candidates if status not in ("skipped", "not tried", "unsupported", "unavailable") and s]
    skipped = [b for b, status, _ in candidates if status == "skipped"]
    return "; ".join(built) + (f" (skipped {', '.join(skipped)})" if skipped else "")


def markdown(cases: list[dict], header: list[str]) -> str:
    lines = header + ["", "## Compile, cache hit, load", "",
                      "| model | precision | effort | cold compile s | stages s | candidates built (build s) | chosen | "
                      "latency ms | x max | cache hit s (fresh process / repeat) | load + first call s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        for precision, rows in case["precisions"].items():
            best = rows.get("max", {}).get("latency_ms")
            for label, row in rows.items():
                name = f"{case['model']} b{case['batch']}"
                if "error" in row:
                    lines.append(f"| {name} | {precision} | {label} | failed: {row['error'][:120]} | | | | | | | |")
                    continue
                latency = row.get("latency_ms")
                ratio = f"{latency / best:.2f}" if latency and best else ""
                hit = row.get("cache_hit")
                hit_text = (f"{hit['first']:.2f} / {hit['repeat']:.2f}{'' if hit.get('quick') else ' (full key)'}"
                            if hit and "error" not in hit and hit.get("hit") else ("no hit" if hit else ""))
                load = row.get("load")
                load_text = f"{load['load']:.2f} + {load['first_call']:.2f}" if load and "error" not in load else ""
                chosen = ", ".join(sorted(set(row["backends"].values())))
                lines.append(f"| {name} | {precision} | {label} | {row['seconds']:.1f} | {_stages(row['timings'])} | "
                             f"{_built(row['candidates'])} | {chosen}{' (lowered)' if row.get('lowered') else ''} | "
                             f"{latency:.2f} | {ratio} | {hit_text} | {load_text} |" if latency else
                             f"| {name} | {precision} | {label} | {row['seconds']:.1f} | {_stages(row['timings'])} | "
                             f"{_built(row['candidates'])} | {chosen} | | | {hit_text} | {load_text} |")
    peers = [c for c in cases if c["peers"]]
    if peers:
        lines += ["", "## Peers' build time (fresh process each)", "",
                  "| model | ONNX Runtime export + session s | OpenVINO export + convert + compile s | torch.compile first call s |",
                  "|---|---|---|---|"]
        for case in peers:
            cells = []
            for peer in ("onnxruntime", "openvino", "torch.compile"):
                result = case["peers"].get(peer, {})
                cells.append(f"{result['seconds']:.1f}" if "seconds" in result else result.get("error", "")[:80])
            lines.append(f"| {case['model']} b{case['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="model:batch, comma-separated")
    parser.add_argument("--precisions", default="fp32,auto")
    parser.add_argument("--efforts", default="fast,default,max")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-first-on-host", action="store_true",
                        help="leave out the 'default, first on host' row (every candidate built, as at max)")
    parser.add_argument("--hits-only", action="store_true",
                        help="per case and precision, one effort='fast' compile, then only its cache hit and kiln.load + "
                             "first call (for a quiet re-measurement of those columns)")
    parser.add_argument("--latency-seconds", type=float, default=2.0, help="timing budget per artifact, interleaved")
    parser.add_argument("--out", default=str(HERE / "results" / "compile_time.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child)), default=str))
        return
    sys.path.insert(0, str(HERE))
    from cpu_peers import _openvino_version
    from kiln.host import cpu_flags
    from kiln.profile_host import cpu_model
    import onnxruntime
    import torch

    efforts = [e.strip() for e in args.efforts.split(",") if e.strip()]
    if not args.no_first_on_host:
        efforts.append("first on host")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    cases = []
    with tempfile.TemporaryDirectory(prefix="kiln-compile-time-") as root:
        for spec in [c.strip() for c in args.cases.split(",") if c.strip()]:
            model, batch = spec.split(":")
            precisions = [p.strip() for p in args.precisions.split(",")]
            if args.hits_only:
                cases.append(run_hits(model, int(batch), precisions, Path(root)))
            else:
                cases.append(run_case(model, int(batch), precisions, efforts, not args.no_peers, Path(root),
                                      args.latency_seconds))
            write(cases, args, load_before, started, cpu_model(), cpu_flags(), torch.__version__, onnxruntime.__version__,
                  _openvino_version())


def write(cases, args, load_before, started, cpu, flags, torch_version, ort_version, ov_version) -> None:
    header = [f"# kiln compile time ({datetime.datetime.now().isoformat(timespec='seconds')})", "",
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
              f"- machine: {cpu}, {len(os.sched_getaffinity(0))} usable cores; CPU flags kiln reads: {', '.join(flags)}",
              f"- 1-min load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} now "
              "(above the core count means other processes competed for the cores)",
              f"- torch {torch_version}, onnxruntime {ort_version}, openvino {ov_version}, python {platform.python_version()}",
              f"- ran {time.perf_counter() - started:.0f} s; each compile in a fresh process with an empty compile cache; "
              "'default' and 'fast' read the host record the 'max' row wrote (a compile of the same kind of graph on "
              "this host before); 'default, first on host' had none",
              "- latency: every artifact of a row group loaded in one process and timed interleaved on the example inputs"]
    table = markdown(cases, header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"argv": sys.argv, "cases": cases}, indent=1, default=str))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
