"""A closed-loop HTTP load generator for served models (`kiln loadtest`).

For each concurrency, that many clients send the same request back to back for `duration`
seconds; each client waits for its answer before sending again (closed loop), so the offered
load follows the server's speed. Per concurrency: requests answered, throughput, latency P50
and P99, errors, and the mean number of requests that shared an engine call when the server
says so (kiln serve's x-kiln-batch-requests header).

The body is a kiln serve JSON request, or a Triton KServe-v2 JSON request when the URL is a
Triton infer endpoint (.../v2/models/NAME/infer); `body_for` draws one from an artifact's spec.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.errors import ServingError
from kiln.types import DTYPE_NAMES, InputSpec

TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                 "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch_requests: float | None  # None when the server does not report it
    first_error: str | None = None


def body_for(artifact: str | Path, url: str, rows: int = 1, seed: int = 0) -> bytes:
    """A JSON request drawn from the artifact's input spec: `rows` rows, other dynamic dims at
    a size inside their range (as kiln's own verification draws them)."""
    from kiln import artifact as artifacts
    from kiln.frontend.input_spec import random_inputs
    from kiln.serving.batching import batch_layout

    spec = InputSpec.from_dict(artifacts.describe(artifact).manifest["input_spec"])
    layout = batch_layout(spec, where=str(artifact))
    tensors = random_inputs(spec, seed, sizes={layout.dim.name: rows})
    if "/v2/models/" in url:
        inputs = [{"name": ts.name, "shape": list(t.shape), "datatype": TRITON_DTYPES[DTYPE_NAMES[ts.dtype]],
                   "data": t.flatten().tolist()} for ts, t in zip(spec.tensors, tensors)]
        return json.dumps({"inputs": inputs}).encode()
    return json.dumps({"inputs": {ts.name: t.tolist() for ts, t in zip(spec.tensors, tensors)}}).encode()


def run_load(url: str, body: bytes, concurrency: int, duration_s: float, timeout_s: float = 60.0) -> LoadResult:
    """`concurrency` closed-loop clients posting `body` to `url` for `duration_s` seconds."""
    latencies: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def client() -> None:
        start.wait()
        while time.perf_counter() < stop_at[0]:
            request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
            began = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    response.read()
                    shared = response.headers.get("x-kiln-batch-requests")
                elapsed = time.perf_counter() - began
                with lock:
                    latencies.append(elapsed)
                    if shared is not None:
                        batches.append(int(shared))
            except (urllib.error.URLError, OSError, ValueError) as exc:
                detail = exc.read().decode(errors="replace")[:200] if isinstance(exc, urllib.error.HTTPError) else ""
                with lock:
                    errors.append(f"{exc} {detail}".strip())

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at[0] = began + duration_s
    start.wait()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    ordered = sorted(latencies)
    return LoadResult(concurrency, seconds, len(ordered), len(errors), len(ordered) / seconds,
                      _percentile(ordered, 50), _percentile(ordered, 99),
                      statistics.fmean(batches) if batches else None, errors[0] if errors else None)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))  # nearest rank
    return ordered[index] * 1000


def render(results: list[LoadResult]) -> str:
    lines = [f"{'concurrency':>11} {'requests':>9} {'req/s':>8} {'P50 ms':>8} {'P99 ms':>8} {'errors':>7} {'mean batch':>10}"]
    for r in results:
        p50 = f"{r.p50_ms:.1f}" if r.p50_ms is not None else "-"
        p99 = f"{r.p99_ms:.1f}" if r.p99_ms is not None else "-"
        batch = f"{r.mean_batch_requests:.2f}" if r.mean_batch_requests is not None else "-"
        lines.append(f"{r.concurrency:>11} {r.requests:>9} {r.throughput_rps:>8.1f} {p50:>8} {p99:>8} {r.errors:>7} {batch:>10}")
    return "\n".join(lines)


def as_json(results: list[LoadResult]) -> list[dict]:
    return [asdict(r) for r in results]


def plot(series: dict[str, list[LoadResult]], path: str | Path, title: str = "throughput vs P99 latency") -> Path:
    """A PNG of throughput against P99 latency, one line per series, each point labelled with
    its concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ServingError("--plot needs matplotlib, which is not installed", where="plot",
                           fix="pip install 'kiln[serve]' (or: pip install matplotlib)") from None
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, results in series.items():
        points = [(r.p99_ms, r.throughput_rps, r.concurrency) for r in results if r.p99_ms is not None]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for p99, rps, concurrency in points:
            axes.annotate(str(concurrency), (p99, rps), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("P99 latency (ms)")
    axes.set_ylabel("throughput (requests/s)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
