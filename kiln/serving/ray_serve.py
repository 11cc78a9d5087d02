"""Ray Serve deployments of kiln artifacts.

    app = kiln.serving.deployment("minilm.kiln", replicas=2, max_batch=16, batch_wait_ms=5)
    serve.run(app, route_prefix="/minilm")

Each replica loads the artifact once and batches with `@serve.batch`, counting rows (not
requests) against `max_batch`. Requests that agree on every axis but the batch share one engine
call (kiln.serving.batching); each gets back its own rows.

Over HTTP (POST to the route):
    application/json        {"inputs": {"x": [[...]], ...}}  ->  {"outputs": {"output.y": [[...]], ...}}
    application/x-npz       a NumPy .npz archive, one array per input  ->  an .npz of the outputs
Response headers say which replica answered (x-kiln-replica, x-kiln-node) and how many requests
and rows shared its engine call (x-kiln-batch-requests, x-kiln-batch-rows). A malformed request
gets HTTP 400 with {"error": ...} naming the input and the expected spec; the replica goes on.
Through a DeploymentHandle: `await handle.infer.remote(x, mask)` returns {output name: tensor}.
"""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError, ServingError
from kiln.serving import require
from kiln.serving.batching import Batcher, batch_layout, check_pad, check_request, flat_output_names
from kiln.types import DTYPE_NAMES

serve = require("ray.serve", "serving with Ray Serve")

NPZ = "application/x-npz"


@serve.deployment
class KilnDeployment:
    """One replica: the artifact loaded once, requests batched by rows."""

    def __init__(self, artifact: str, max_batch: int, batch_wait_s: float, threads: int | None, pad: dict | None = None):
        from kiln.runtime import load

        self.compiled = load(artifact, threads=threads)
        layout = batch_layout(self.compiled.input_spec, where=artifact)
        self.max_batch = min(max_batch, layout.max_rows)
        self.batcher = Batcher(self.compiled, self.max_batch, pad)
        self.spec = self.compiled.input_spec
        self.output_names = flat_output_names(self.compiled.plan)
        self.run.set_max_batch_size(self.max_batch)
        self.run.set_batch_wait_timeout_s(batch_wait_s)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id if context else "local"
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        # Ray Serve's own metrics (its Prometheus endpoint), beside the request and latency ones Serve keeps
        self.batch_requests = serve.metrics.Histogram("kiln_batch_requests", description="requests that shared one engine call",
                                                      boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.batch_rows = serve.metrics.Histogram("kiln_batch_rows", description="rows in one engine call",
                                                  boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.refused = serve.metrics.Counter("kiln_refused_requests", description="requests refused with HTTP 400")

    # __init__ replaces these two with the deployment's own; a batch's size counts rows, not requests
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, batch_size_fn=lambda items: sum(int(t[0].shape[0]) for t in items))
    async def run(self, requests: list[list[torch.Tensor]]) -> list:
        # the engine call blocks: off the replica's event loop, so the next batch can gather meanwhile
        results = await asyncio.to_thread(self.batcher, requests)
        rows = sum(int(t[0].shape[0]) for t in requests)
        self.batch_requests.observe(len(requests))
        self.batch_rows.observe(rows)
        return [(result, len(requests), rows) for result in results]

    async def infer(self, *tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The DeploymentHandle entry: flat tensors in spec order in, {output name: tensor} out."""
        result, _, _ = await self._submit(list(tensors))
        if isinstance(result, KilnError):
            raise result
        return dict(zip(self.output_names, result))

    async def __call__(self, request) -> object:
        from starlette.responses import JSONResponse, Response

        binary = request.headers.get("content-type", "").split(";")[0].strip() == NPZ
        try:
            body = await request.body()
            tensors = decode_npz(body, self.spec) if binary else decode_json(body, self.spec)
            result, requests, rows = await self._submit(tensors)
        except KilnError as exc:
            result, requests, rows = exc, 0, 0
        if isinstance(result, KilnError):
            self.refused.inc()
            message = " ".join(str(result).split())
            return JSONResponse({"error": message}, status_code=400)
        headers = {"x-kiln-replica": self.replica, "x-kiln-node": self.node,
                   "x-kiln-batch-requests": str(requests), "x-kiln-batch-rows": str(rows)}
        if binary:
            return Response(encode_npz(dict(zip(self.output_names, result))), media_type=NPZ, headers=headers)
        return JSONResponse({"outputs": {n: t.tolist() for n, t in zip(self.output_names, result)}}, headers=headers)

    async def _submit(self, tensors: list) -> tuple:
        try:
            checked = check_request(self.spec, tensors)
            rows = int(checked[0].shape[0])
            if rows > self.max_batch:  # checked here: the batcher would otherwise hold it
                raise ServingError(f"request has {rows} rows, more than the {self.max_batch} one call may take",
                                   where=f"input {self.spec.tensors[0].name!r}", fix=f"split it into requests of at most {self.max_batch} rows")
        except KilnError as exc:
            return exc, 0, 0
        return await self.run(checked)


def deployment(artifact: str | Path, *, name: str | None = None, replicas: int = 1, max_batch: int = 16,
               batch_wait_ms: float = 5.0, num_cpus: float = 1.0, num_gpus: float = 0.0, pad: dict | None = None):
    """A Ray Serve application serving the artifact: `replicas` replicas, each loading it once
    with `num_cpus` threads and batching up to `max_batch` rows, waiting at most
    `batch_wait_ms` to fill a batch. `pad` ({"seq": "attention_mask"}) lets requests of
    different lengths share a call (kiln.serving.batching.Batcher). Refuses an artifact
    without a dynamic batch before Ray starts anything (ServingError naming the input and the
    `dynamic=` to compile with)."""
    from kiln import artifact as artifacts
    from kiln.types import InputSpec

    path = Path(artifact).expanduser().resolve()
    spec = InputSpec.from_dict(artifacts.describe(path).manifest["input_spec"])
    layout = batch_layout(spec, where=str(path))
    if pad:
        check_pad(spec, layout, dict(pad))
    if not 1 <= max_batch <= layout.max_rows:
        raise ServingError(f"max batch {max_batch} lies outside the compiled range {layout.dim.name}[{layout.dim.min}..{layout.dim.max}]",
                           where=str(path), fix=f"give a max batch from 1 to {layout.max_rows}")
    if replicas < 1 or batch_wait_ms < 0 or num_cpus <= 0:
        raise ServingError(f"replicas={replicas}, batch_wait_ms={batch_wait_ms}, num_cpus={num_cpus}", where="deployment",
                           fix="give at least 1 replica, a wait of 0 ms or more and a positive num_cpus")
    options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
               # room for a full batch to queue on each replica while one runs
               "max_ongoing_requests": max(2 * max_batch, 8)}
    if name:
        options["name"] = name
    return KilnDeployment.options(**options).bind(str(path), max_batch, batch_wait_ms / 1000.0, max(1, int(num_cpus)),
                                                    dict(pad) if pad else None)


def decode_json(body: bytes, spec) -> list[torch.Tensor]:
    """{"inputs": {name: nested lists}} as tensors of the spec's dtypes, in spec order."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServingError(f"body is not valid JSON ({exc})", where="request", fix=_expected(spec)) from None
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, dict):
        raise ServingError("body has no \"inputs\" object", where="request", fix=_expected(spec))
    _check_names(inputs, spec)
    tensors = []
    for ts in spec.tensors:
        try:
            array = np.asarray(inputs[ts.name])
        except ValueError as exc:  # ragged nested lists
            raise ServingError(f"not a rectangular array ({str(exc).splitlines()[0]})", where=f"input {ts.name!r}",
                               fix=f"send {ts.describe()}") from None
        wanted = np.dtype(DTYPE_NAMES[ts.dtype]) if ts.dtype != torch.bfloat16 else np.dtype("float32")
        if array.dtype.kind not in "biuf" or (wanted.kind in "iub" and array.dtype.kind == "f"):
            raise ServingError(f"values of JSON kind {array.dtype.name} cannot be {DTYPE_NAMES[ts.dtype]}", where=f"input {ts.name!r}",
                               fix=f"send {ts.describe()}")
        tensors.append(torch.from_numpy(array.astype(wanted)).to(ts.dtype))
    return tensors


def decode_npz(body: bytes, spec) -> list[torch.Tensor]:
    """An .npz archive (np.savez), one array per input name, read without pickle."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise ServingError(f"body is not a readable .npz archive ({type(exc).__name__}: {exc})", where="request",
                           fix=f"send np.savez(buffer, **inputs) with {spec.describe()}") from None
    _check_names(arrays, spec)
    return [torch.from_numpy(np.ascontiguousarray(arrays[ts.name])) for ts in spec.tensors]


def encode_npz(outputs: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: t.numpy() for name, t in outputs.items()})
    return buffer.getvalue()


def _check_names(given: dict, spec) -> None:
    missing = [n for n in spec.names if n not in given]
    if missing:
        raise ServingError(f"input {missing[0]!r} is missing", where=f"input {missing[0]!r}", fix=_expected(spec))
    unknown = sorted(set(given) - set(spec.names))
    if unknown:
        raise ServingError(f"unknown input {unknown[0]!r}", where=f"input {unknown[0]!r}", fix=_expected(spec))


def _expected(spec) -> str:
    return f"send every input: {spec.describe()}"
