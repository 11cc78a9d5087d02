"""Long differential-fuzzing run: random models (tests/fuzz/generator.py) through kiln.optimize
on each backend, compared with eager PyTorch; prints a table of outcomes and the failing seeds.

    python bench/fuzz_long.py --start 0 --count 500 --backends onnxruntime,inductor --out fuzz.json
    python bench/fuzz_long.py --start 1000 --count 100000 --backends onnxruntime --budget-s 480
    python bench/fuzz_long.py --families general,masked --count 1000 --backends onnxruntime,openvino

Each case runs in a worker process that is restarted after a crash (a segfault in a native
runtime) or a hang past --timeout-s, so one bad model costs one seed, not the run. --budget-s
caps the wall time per backend: no new seed starts past it. Outcomes are those of
tests/fuzz/harness.py: ok, kiln_error, mismatch, crash; every case also runs the harness's
probes (integer inputs at and past their edges, NaN/Inf, a batch of one, padded masks). Replay
one seed in-process with `--start SEED --count 1 --in-process [--families masked]`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
MARK = "@@FUZZ-RESULT@@ "
OUTCOMES = ("ok", "kiln_error", "mismatch", "crash")


# ---------------------------------------------------------------------------- worker side
def worker() -> None:
    """Reads {"seed", "backend", "family"} lines on stdin; writes one marked JSON result line each."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from fuzz.harness import run_case

    out = sys.stdout
    for line in sys.stdin:
        job = json.loads(line)
        try:
            result = run_case(job["seed"], job["backend"], job.get("family", "general"), campaign=True).to_dict()
        except Exception as exc:  # the generator itself failed: recorded, not fatal
            result = {"seed": job["seed"], "backend": job["backend"], "family": job.get("family", "general"),
                      "outcome": "generator_error", "ops": "",
                      "error_type": type(exc).__name__, "error": str(exc)[:600], "seconds": 0.0, "details": {}}
        out.write(MARK + json.dumps(result) + "\n")
        out.flush()


class Worker:
    def __init__(self, stderr_path: Path):
        self.stderr_path = stderr_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env, cwd=str(ROOT))
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.sel.close()
            self.stderr.close()
            self.proc = None

    def run(self, seed: int, backend: str, timeout: float, family: str = "general") -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.start()
        start = time.monotonic()
        self.proc.stdin.write((json.dumps({"seed": seed, "backend": backend, "family": family}) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(MARK):
                    return json.loads(text[len(MARK):])
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                self.stop()
                return _failure(seed, backend, family, "Timeout", f"no result within {timeout:.0f} s (worker killed)", start)
            if not self.sel.select(timeout=min(left, 5.0)):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:  # the worker died mid-case
                code = self.proc.wait()
                tail = _tail(self.stderr_path)
                self.stop()
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                return _failure(seed, backend, family, "WorkerDied", f"worker process died ({how}); stderr tail: {tail}", start)
            self.buffer += chunk


def _failure(seed: int, backend: str, family: str, kind: str, text: str, start: float) -> dict:
    return {"seed": seed, "backend": backend, "family": family, "outcome": "crash", "ops": _ops_of(seed, family),
            "error_type": kind, "error": text[:600], "seconds": time.monotonic() - start, "details": {}}


def _ops_of(seed: int, family: str) -> str:
    try:
        from fuzz.harness import describe_model, make_model

        return describe_model(make_model(seed, family)[0])
    except Exception as exc:  # noqa: BLE001
        return f"(generator failed: {exc})"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-500:]


# ---------------------------------------------------------------------------- reporting
def signature(result: dict) -> str:
    """The failure with run-specific details (temp paths, node numbers, sizes) blanked, to
    group one bug's many seeds."""
    text = re.sub(r"/tmp/\S+", "<tmp>", result.get("error", ""))
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return f"{result['outcome']} | {result.get('family', 'general')} | {result.get('error_type', '')} | {text[:140]}"


def summarize(results: list[dict]) -> dict:
    by_backend: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    seconds: dict[str, float] = collections.defaultdict(float)
    for r in results:
        by_backend[r["backend"]][r["outcome"]] += 1
        seconds[r["backend"]] += r.get("seconds", 0.0)
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for r in results:
        if r["outcome"] != "ok":
            groups[signature(r)].append(r)
    return {
        "counts": {b: dict(c) for b, c in by_backend.items()},
        "seconds": dict(seconds),
        "distinct_failures": [{"signature": sig, "count": len(rs), "seeds": [(r["backend"], r["seed"]) for r in rs],
                               "root_causes": sorted({r.get("details", {}).get("root_cause", "") for r in rs} - {""}),
                               "example": {k: rs[0].get(k) for k in ("seed", "backend", "outcome", "error_type", "error", "ops")}}
                              for sig, rs in sorted(groups.items(), key=lambda kv: -len(kv[1]))],
    }


def print_report(results: list[dict], summary: dict) -> None:
    outcomes = [o for o in OUTCOMES] + sorted({r["outcome"] for r in results} - set(OUTCOMES))
    width = max([len(b) for b in summary["counts"]] + [7])
    print()
    print(f"{'backend':<{width}}  {'models':>6}  " + "  ".join(f"{o:>10}" for o in outcomes) + "  seconds")
    for backend, counts in summary["counts"].items():
        total = sum(counts.values())
        print(f"{backend:<{width}}  {total:>6}  " + "  ".join(f"{counts.get(o, 0):>10}" for o in outcomes)
              + f"  {summary['seconds'][backend]:7.0f}")
    failing = [r for r in results if r["outcome"] != "ok"]
    if not failing:
        print("\nno failing seeds")
        return
    print(f"\n{len(summary['distinct_failures'])} distinct failure(s):")
    for group in summary["distinct_failures"]:
        ex = group["example"]
        seeds = ", ".join(f"{b}:{s}" for b, s in group["seeds"][:12]) + (" ..." if len(group["seeds"]) > 12 else "")
        print(f"\n* {group['count']}x {ex['outcome']} {ex['error_type']}: {ex['error'][:300]}")
        print(f"  seeds: {seeds}")
        print(f"  e.g. seed {ex['seed']}: {ex['ops'][:400]}")
        for root in group["root_causes"][:4]:
            print(f"  root cause: {root[:300]}")
    print("\nfailing seeds:")
    for r in failing:
        print(f"  {r['backend']:<12} seed {r['seed']:<7} {r['outcome']:<10} {r['error_type']}: {r['error'][:160]}")


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--count", type=int, default=100, help="seeds per backend (fewer if --budget-s runs out)")
    parser.add_argument("--seeds", help="comma-separated seeds to run instead of --start/--count (re-running failures)")
    parser.add_argument("--backends", default="onnxruntime", help="comma-separated kiln backends")
    parser.add_argument("--families", default="general", help="comma-separated model families: general, masked")
    parser.add_argument("--out", type=Path, help="write every result and the summary as JSON here")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall seconds per backend; no new seed starts past it (comma list for one per backend)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per model; a worker past it is killed")
    parser.add_argument("--in-process", action="store_true", help="no worker process (for replaying a seed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(args.start, args.start + args.count))
    # each result is also appended to OUT.jsonl as it comes, so a run stopped midway keeps what ran
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    progress = args.out.with_suffix(".jsonl").open("a") if args.out else None
    budgets = [None] * len(backends)
    if args.budget_s is not None:
        budgets = [args.budget_s] * len(backends)
    results: list[dict] = []
    log_path = Path(tempfile.gettempdir()) / f"kiln-fuzz-worker-{os.getpid()}.log"
    runner = Worker(log_path)
    started = time.time()
    try:
        for backend, budget in zip(backends, budgets):
            t0 = time.monotonic()
            for seed in seeds:
                if budget is not None and time.monotonic() - t0 > budget:
                    break
                family = families[seed % len(families)]  # the families take turns over the seeds
                if args.in_process:
                    from fuzz.harness import run_case

                    result = run_case(seed, backend, family, campaign=True).to_dict()
                else:
                    result = runner.run(seed, backend, args.timeout_s, family)
                results.append(result)
                if progress is not None:
                    progress.write(json.dumps(result) + "\n")
                    progress.flush()
                mark = "." if result["outcome"] == "ok" else f"\n  seed {seed}: {result['outcome']} {result['error_type']}: {result['error'][:150]}\n"
                print(mark, end="", flush=True)
            print(f"\n{backend}: {sum(r['backend'] == backend for r in results)} models in {time.monotonic() - t0:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; reporting what ran", flush=True)
    finally:
        runner.stop()
        if progress is not None:
            progress.close()
    summary = summarize(results)
    summary["wall_seconds"] = time.time() - started
    print_report(results, summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                        "results": results}, indent=1))
        print(f"\nwrote {args.out}")
    return 0 if all(r["outcome"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
