"""Serving MiniLM sentence embeddings on Ray Serve: kiln's artifact with batching, the same
with batching off, and the eager PyTorch model with the same batching (what a user would write
without kiln), each at several client concurrencies.

The model is all-MiniLM-L6-v2 (real weights) with mean pooling over the attention mask, as
sentence-transformers encodes; one request is one sentence padded to --seq tokens. kiln
compiles it with a dynamic batch and sequence length. Each deployment runs alone on a local
Ray instance (--replicas replicas, one CPU and one engine thread each) and is driven two ways
for --duration seconds per concurrency: over HTTP by `kiln loadtest`'s closed-loop client
(kiln.serving.loadtest), and by as many closed-loop callers of a DeploymentHandle from this
process. One engine call of each model alone is timed first, to separate the model's cost
from the serving path's. The client shares the machine's cores with the server: on a 2-core machine
that costs every contender alike, and the absolute numbers are lower than a separate client
would see.

Run:
    . .venv/bin/activate && python bench/serving.py
    python bench/serving.py --duration 3 --concurrency 1,8 --out /tmp/smoke.md     # a quick smoke run
Writes the markdown table to stdout and --out, a .json and a .png (throughput vs P99) beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import kiln
from kiln.serving import deployment, loadtest

SENTENCE = "A compiled model serves many short requests, and batching them is what keeps the cores busy."


class SentenceEmbedding(torch.nn.Module):
    """MiniLM's token states mean-pooled over the attention mask: one 384-vector per sentence."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def sentence_model() -> SentenceEmbedding:
    from kiln.examples.models import minilm

    encoder, _ = minilm()
    return SentenceEmbedding(encoder).eval()


def build_artifact(path: Path, seq: int) -> Path:
    from kiln.examples.models import sentence_tokens

    if path.exists():
        print(f"using {path}", file=sys.stderr)
        return path
    ids, mask = sentence_tokens([SENTENCE, "Two rows make the batch axis dynamic."], seq=seq)
    dims = {0: kiln.Dim("batch", min=1, max=64), 1: kiln.Dim("seq", min=1, max=128)}
    began = time.perf_counter()
    compiled = kiln.optimize(sentence_model(), "cpu-x86", (ids, mask), dynamic={"input_ids": dims, "attention_mask": dims})
    print(f"compiled in {time.perf_counter() - began:.0f} s: {compiled}", file=sys.stderr)
    return compiled.save(path)


def eager_deployment(replicas: int, max_batch: int, batch_wait_ms: float):
    """The eager model on Ray Serve with @serve.batch, answering the same JSON as kiln serve."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=max(2 * max_batch, 8))
    class EagerEmbedding:
        def __init__(self):
            torch.set_num_threads(1)
            self.model = sentence_model()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1000)
        async def embed(self, requests: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
            ids = torch.cat([r[0] for r in requests])
            mask = torch.cat([r[1] for r in requests])
            with torch.inference_mode():
                out = self.model(ids, mask)
            return [(row, len(requests)) for row in out.split([r[0].shape[0] for r in requests])]

        async def infer(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            row, _ = await self.embed((ids, mask))
            return {"embedding": row}

        async def __call__(self, request):
            inputs = (await request.json())["inputs"]
            row, shared = await self.embed((torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])))
            return JSONResponse({"outputs": {"embedding": row.tolist()}}, headers={"x-kiln-batch-requests": str(shared)})

    return EagerEmbedding.bind()


def no_model_deployment(replicas: int, max_batch: int, batch_wait_ms: float, dim: int = 384):
    """The same deployment, batching and JSON with no model: each request gets a fixed embedding.
    What it serves is the serving path's own ceiling on this machine (proxy, router, event
    loops, serialisation, the load generator), which no engine can lift a deployment above."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=max(2 * max_batch, 8))
    class NoModel:
        def __init__(self):
            self.row = torch.zeros(1, dim)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1000)
        async def embed(self, requests: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
            return [(self.row.expand(r[0].shape[0], -1), len(requests)) for r in requests]

        async def infer(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            row, _ = await self.embed((ids, mask))
            return {"embedding": row}

        async def __call__(self, request):
            inputs = (await request.json())["inputs"]
            row, shared = await self.embed((torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])))
            return JSONResponse({"outputs": {"embedding": row.tolist()}}, headers={"x-kiln-batch-requests": str(shared)})

    return NoModel.bind()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_contender(name: str, app, port: int, body: bytes, tensors: tuple, levels: list[int],
                  duration: float) -> tuple[list[loadtest.LoadResult], list[loadtest.LoadResult]]:
    """The deployment driven over HTTP through Ray Serve's proxy, then through a DeploymentHandle
    from this process (no HTTP, no JSON)."""
    from ray import serve

    handle = serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"http://127.0.0.1:{port}/{name}"
    loadtest.run_load(url, body, max(levels), min(3.0, duration))  # warm-up: first calls, thread pools
    over_http, over_handle = [], []
    for level in levels:
        over_http.append(loadtest.run_load(url, body, level, duration))
        over_handle.append(asyncio.run(handle_load(handle, tensors, level, duration)))
        for way, r in (("http", over_http[-1]), ("handle", over_handle[-1])):
            print(f"{name} {way} c={level}: {r.throughput_rps:.1f} req/s, P50 {r.p50_ms} ms, P99 {r.p99_ms} ms, "
                  f"errors {r.errors}, mean batch {r.mean_batch_requests}", file=sys.stderr)
    serve.delete(name)
    return over_http, over_handle


async def handle_load(handle, tensors: tuple, concurrency: int, duration: float) -> loadtest.LoadResult:
    """`concurrency` closed-loop callers of handle.infer for `duration` seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    began = time.perf_counter()
    stop = began + duration

    async def caller():
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                await handle.infer.remote(*tensors)
                latencies.append(time.perf_counter() - start)
            except Exception as exc:  # counted, as the HTTP client counts a failed request
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    seconds = time.perf_counter() - began
    ordered = sorted(latencies)
    return loadtest.LoadResult(concurrency, seconds, len(ordered), len(errors), len(ordered) / seconds,
                               loadtest._percentile(ordered, 50), loadtest._percentile(ordered, 99), None,
                               errors[0] if errors else None)


def engine_calls(artifact: Path, tensors: tuple, batches=(1, 4, 16), rounds: int = 15) -> list[dict]:
    """One engine call alone, kiln's artifact against the eager model, both on one thread (as
    each replica runs), timed interleaved; the median per call."""
    compiled = kiln.load(artifact, threads=1)
    eager = sentence_model()
    torch.set_num_threads(1)
    rows = []
    for batch in batches:
        inputs = tuple(t.repeat(batch, 1) for t in tensors)
        times: dict[str, list[float]] = {"kiln": [], "eager": []}
        with torch.inference_mode():
            compiled(*inputs), eager(*inputs)
            for _ in range(rounds):
                for label, call in (("kiln", compiled), ("eager", eager)):
                    start = time.perf_counter()
                    call(*inputs)
                    times[label].append(time.perf_counter() - start)
        kiln_ms, eager_ms = (statistics.median(times[k]) * 1000 for k in ("kiln", "eager"))
        rows.append({"batch": batch, "kiln_ms": kiln_ms, "eager_ms": eager_ms})
        print(f"engine call, batch {batch}: kiln {kiln_ms:.1f} ms, eager {eager_ms:.1f} ms", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="/tmp/kiln-bench-minilm-sentence.kiln", help="reused when it exists")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.md"))
    parser.add_argument("--no-model", action="store_true",
                        help="also serve a deployment that runs no model: the serving path's own ceiling here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    from kiln.examples.models import sentence_tokens

    artifact = build_artifact(Path(args.artifact), args.seq)
    ids, mask = sentence_tokens([SENTENCE], seq=args.seq)
    body = json.dumps({"inputs": {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}}).encode()
    calls = engine_calls(artifact, (ids, mask))

    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=args.replicas, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        contenders = {
            "kiln, batching": deployment(artifact, replicas=args.replicas, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms),
            "kiln, batching off": deployment(artifact, replicas=args.replicas, max_batch=1, batch_wait_ms=0),
            "eager, batching": eager_deployment(args.replicas, args.max_batch, args.batch_wait_ms),
        }
        if args.no_model:
            contenders["no model, batching"] = no_model_deployment(args.replicas, args.max_batch, args.batch_wait_ms)
        runs = {label: run_contender(f"c{i}", app, port, body, (ids, mask), levels, args.duration)
                for i, (label, app) in enumerate(contenders.items())}
    finally:
        serve.shutdown()
        ray.shutdown()
    write({label: r[0] for label, r in runs.items()}, {label: r[1] for label, r in runs.items()}, calls, args, artifact)
    return 0


def table(series: dict[str, list[loadtest.LoadResult]]) -> list[str]:
    lines = ["| deployment | concurrency | req/s | P50 ms | P99 ms | errors | mean requests per call |", "|---|---|---|---|---|---|---|"]
    for label, results in series.items():
        for r in results:
            batch = f"{r.mean_batch_requests:.2f}" if r.mean_batch_requests is not None else "-"
            lines.append(f"| {label} | {r.concurrency} | {r.throughput_rps:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {batch} |")
    return lines


def write(series: dict[str, list[loadtest.LoadResult]], by_handle: dict[str, list[loadtest.LoadResult]], calls: list[dict],
          args, artifact: Path) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    described = kiln.artifact.describe(artifact)
    backends = ", ".join(f"{p['name']}: {p['backend']}" for p in described.manifest["plan"]["partitions"])
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform.startswith("linux") else ""
    model_line = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("Model name")), platform.processor())
    amx = "amx_tile" in flags
    lines = [f"# Serving MiniLM sentence embeddings on Ray Serve ({datetime.date.today()})", "",
             f"{model_line}, {os.cpu_count()} cores{' (AMX)' if amx else ' (no AMX)'}; one sentence of {args.seq} tokens per request; "
             f"{args.replicas} replicas x 1 CPU; max batch {args.max_batch}, batch wait {args.batch_wait_ms} ms; "
             f"{args.duration:.0f} s per concurrency, closed loop, client on the same machine.",
             f"kiln artifact: {backends}; precision: {described.report.precision_summary or 'fp32'}", "",
             "## One engine call alone (1 thread, median of interleaved calls)", "",
             "| batch | kiln ms | eager ms | eager / kiln |", "|---|---|---|---|"]
    lines += [f"| {c['batch']} | {c['kiln_ms']:.1f} | {c['eager_ms']:.1f} | {c['eager_ms'] / c['kiln_ms']:.2f}x |" for c in calls]
    lines += ["", "## Over HTTP (Ray Serve's proxy, JSON bodies, `kiln loadtest`'s client)", ""] + table(series)
    lines += ["", "## Through a DeploymentHandle from the driver (no HTTP, no JSON)", ""] + table(by_handle)
    lines.append("")
    for way, runs in (("over HTTP", series), ("through a handle", by_handle)):
        kiln_top, eager_top = runs["kiln, batching"][-1], runs["eager, batching"][-1]
        lines.append(f"At concurrency {kiln_top.concurrency} {way}: kiln with batching {kiln_top.throughput_rps / eager_top.throughput_rps:.2f}x "
                     f"the eager deployment's throughput, P99 {kiln_top.p99_ms:.0f} ms against {eager_top.p99_ms:.0f} ms.")
        if "no model, batching" in runs:
            ceiling = runs["no model, batching"][-1].throughput_rps
            lines.append(f"  The same deployment running no model served {ceiling:.1f} req/s {way}: kiln reached "
                         f"{kiln_top.throughput_rps / ceiling:.0%} of the serving path's ceiling, eager "
                         f"{eager_top.throughput_rps / ceiling:.0%}; 2x eager would be {2 * eager_top.throughput_rps / ceiling:.0%} of it.")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({
        "engine_calls": calls, "http": {label: loadtest.as_json(r) for label, r in series.items()},
        "handle": {label: loadtest.as_json(r) for label, r in by_handle.items()}}, indent=1))
    loadtest.plot(series, out.with_suffix(".png"), title=f"MiniLM on Ray Serve over HTTP, {args.replicas} replicas")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
