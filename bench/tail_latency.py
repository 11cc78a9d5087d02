"""Where kiln's tail latency comes from: kiln's call against the engine it wraps, and the runtime as its own users run it.

For one row (model and batch), builds kiln (`--precision`, default fp32) and the peer running the
same runtime as kiln's chosen engine (bench/cpu_peers.py's ONNX Runtime or OpenVINO builder), then
times, on the same inputs:
  - kiln: the CompiledModel call (input checks, routing, output structure);
  - kiln engine: the one engine of kiln's single partition, called directly (no Python around it);
  - the peer.
Each twice: interleaved as bench/cpu_peers.py times (a quiet pause and an untimed call before
each block, other runtimes' blocks between), and each contender alone for a long run of calls
(as a server would call it). For every timing: median, p99, p99/median, and the Python garbage
collections that ran during it (a full collection of a heap the build left large is a pause).
Also printed: the threads of this process after the builds and the child processes left.

    python bench/tail_latency.py --row minilm-b1
    python bench/tail_latency.py --row efficientnet-b1 --calls 200 --rounds 10 --out /tmp/tail.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_peers import BUILDERS, CORES, fmt, load_case, log, p99, time_interleaved, write_results  # noqa: E402

from kiln.build.select import SETTLE_SECONDS  # noqa: E402


class GcWatch:
    """Counts the garbage collections (and their longest pause) while active."""

    def __init__(self):
        self.runs, self.longest, self._start = 0, 0.0, 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.runs += 1
            self.longest = max(self.longest, time.perf_counter() - self._start)

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def time_alone(call, calls: int) -> list[float]:
    """`calls` back-to-back timed calls after a quiet pause and one untimed call."""
    time.sleep(SETTLE_SECONDS)
    call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def process_state() -> str:
    threads = len(os.listdir("/proc/self/task"))
    children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == os.getpid()]
    return f"{threads} threads in this process, {len(children)} child processes"


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def build(row: str, precision: str):
    import kiln

    name, batch = row.rsplit("-b", 1)
    torch.manual_seed(0)
    model, inputs = load_case(name, int(batch))
    with contextlib.redirect_stdout(sys.stderr):
        compiled = kiln.optimize(model, "cpu-x86", inputs, precision=precision, cache=False)
    if len(compiled.plan.partitions) != 1:
        raise SystemExit(f"kiln built {len(compiled.plan.partitions)} partitions; this script compares one engine")
    backend = next(iter(compiled.backends.values()))
    engine = next(iter(compiled.engines.values()))
    peer_name = {"openvino": "openvino" if precision == "fp32" else "openvino-default"}.get(backend, backend)
    calls = {"kiln": lambda: compiled(*inputs), "kiln engine": lambda: engine(*inputs)}
    if peer_name in BUILDERS:
        calls[f"{peer_name} (peer)"] = BUILDERS[peer_name](model, inputs)[0]
    return calls, backend, compiled.report.precision_summary


def summarize(label: str, samples: dict[str, list[float]], watch: GcWatch) -> list[dict]:
    rows = []
    for name, times in samples.items():
        median = statistics.median(times)
        rows.append({"timing": label, "contender": name, "calls": len(times), "median_ms": median * 1e3,
                     "p99_ms": p99(times) * 1e3, "p99_over_median": p99(times) / median, "max_ms": max(times) * 1e3,
                     "gc_runs": watch.runs, "gc_longest_ms": watch.longest * 1e3})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", default="minilm-b1", help="model-bBATCH, as in bench/tiers.py")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per interleaved block")
    parser.add_argument("--calls", type=int, default=200, help="back-to-back calls per contender, alone")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tail_latency.md"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    calls, backend, precision = build(args.row, args.precision)
    state = process_state()
    log(f"kiln chose {backend}; {state}")
    rows = []
    with torch.no_grad():
        with GcWatch() as watch:
            samples, errors = time_interleaved(calls, args.rounds, args.iters)
        rows += summarize("interleaved", samples, watch)
        for name, call in calls.items():
            with GcWatch() as watch:
                rows += summarize("alone", {name: time_alone(call, args.calls)}, watch)
    header = [f"# Tail latency: kiln's call, its engine, and the same runtime as a peer "
              f"({datetime.datetime.now().isoformat(timespec='seconds')})", "",
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
              f"- {CORES} usable cores; 1-min load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end "
              "(above the core count: other processes competed for the cores)",
              f"- row {args.row}; kiln built {backend} ({precision}); after the builds: {state}",
              f"- interleaved: {args.rounds} rounds x {args.iters} calls; alone: {args.calls} back-to-back calls each", "",
              "| timing | contender | calls | median ms | p99 ms | p99/median | max ms | GC runs (longest ms) |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    lines = [f"| {r['timing']} | {r['contender']} | {r['calls']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
             f"{r['p99_over_median']:.2f} | {r['max_ms']:.2f} | {r['gc_runs']} ({fmt(r['gc_longest_ms'], '.1f')}) |" for r in rows]
    write_results("\n".join(header + lines) + "\n", rows, Path(args.out))


if __name__ == "__main__":
    main()
