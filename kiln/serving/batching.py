"""Batching requests for a compiled model: which artifacts can be batched, and running many
requests as few engine calls.

A server batches by stacking requests along axis 0, so every input must carry one shared
dynamic dim there (`dynamic={"x": {0: "batch"}, ...}` at compile time). Requests whose other
axes differ (two sentence lengths) cannot share a call; they are grouped by those sizes and
each group runs as its own call. Each request gets back exactly its own rows of every output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kiln.errors import KilnError, ServingError
from kiln.frontend.input_spec import check_tensor
from kiln.ir import PartitionPlan
from kiln.types import Dim, InputSpec


@dataclass(frozen=True)
class BatchLayout:
    """How requests stack: along axis 0 of every input, the dynamic dim `dim`."""

    dim: Dim
    input_names: tuple[str, ...]

    @property
    def max_rows(self) -> int:
        return self.dim.max


def batch_layout(spec: InputSpec, where: str) -> BatchLayout:
    """The batch layout of an input spec, or ServingError naming the first input that has no
    dynamic batch and the `dynamic=` that would give it one."""
    if not spec.tensors:
        raise ServingError("the model takes no tensor inputs, so there is nothing to batch", where=where,
                           fix="serve a model whose inputs are tensors")
    static = [t for t in spec.tensors if not t.shape or not isinstance(t.shape[0], Dim)]
    if static:
        first = static[0]
        found = "is a scalar" if not first.shape else f"has a static batch of {first.shape[0]} on axis 0"
        dynamic = ", ".join(f"{t.name!r}: {{0: 'batch'}}" for t in spec.tensors if t.shape)
        raise ServingError(f"input {first.name!r} {found}; a server stacks requests along axis 0, which must be dynamic",
                           where=where, fix=f"compile again with dynamic={{{dynamic}}}")
    dims = {t.shape[0].name for t in spec.tensors}
    if len(dims) > 1:
        pairs = ", ".join(f"{t.name!r} has {t.shape[0].name!r}" for t in spec.tensors)
        raise ServingError(f"inputs carry different dynamic dims on axis 0 ({pairs}); requests stack only along one shared batch dim",
                           where=where, fix="compile again naming one dim for axis 0 of every input, e.g. {0: 'batch'}")
    dim = spec.tensors[0].shape[0]
    if dim.max < 2:
        raise ServingError(f"the batch dim {dim.name!r} allows at most {dim.max} row", where=where,
                           fix=f"compile again with a wider range, e.g. kiln.Dim({dim.name!r}, min=1, max=64)")
    return BatchLayout(dim, spec.names)


def flat_output_names(plan: PartitionPlan) -> tuple[str, ...]:
    """The names of what CompiledModel.run_flat returns, in its order: a one-partition plan
    returns its engine's outputs as they are, a longer one the model's outputs."""
    if len(plan.partitions) == 1:
        return tuple(plan.partitions[0].graph.output_names)
    return tuple(plan.output_names)


def check_request(spec: InputSpec, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One request's flat tensors checked against the spec (InputMismatch names the input and
    the expected spec), shared dims included."""
    if len(tensors) != len(spec.tensors):
        raise ServingError(f"request has {len(tensors)} inputs, the model takes {len(spec.tensors)}", where="request",
                           fix=f"send {spec.describe()}")
    checked = [check_tensor(ts, value) for ts, value in zip(spec.tensors, tensors)]
    seen: dict[str, tuple[int, str]] = {}
    for ts, value in zip(spec.tensors, checked):
        for axis, want in enumerate(ts.shape):
            if isinstance(want, Dim):
                size, first = value.shape[axis], seen.setdefault(want.name, (value.shape[axis], ts.name))
                if first[0] != size:
                    raise ServingError(f"dim {want.name!r} is {size} here but {first[0]} in input {first[1]!r}",
                                       where=f"input {ts.name!r}",
                                       fix=f"inputs sharing {want.name!r} must agree on its size; expected {spec.describe()}")
    return checked


def run_batched(compiled, requests: Sequence[Sequence[torch.Tensor]], max_rows: int) -> list[tuple[torch.Tensor, ...] | KilnError]:
    """Run requests (each its flat tensors in spec order, batch on axis 0) as few engine calls
    of at most `max_rows` rows; return, per request, its rows of every flat output, or the
    KilnError that refused it. A refused request never stops the others."""
    layout = batch_layout(compiled.input_spec, where="model")
    max_rows = min(max_rows, layout.max_rows)
    results: list[tuple[torch.Tensor, ...] | KilnError | None] = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, list[torch.Tensor]]]] = {}
    for index, tensors in enumerate(requests):
        try:
            checked = check_request(compiled.input_spec, tensors)
            rows = checked[0].shape[0]
            if rows > max_rows:
                raise ServingError(f"request has {rows} rows, more than the {max_rows} one call may take",
                                   where=f"input {compiled.input_spec.tensors[0].name!r}", fix=f"split it into requests of at most {max_rows} rows")
        except KilnError as exc:
            results[index] = exc
            continue
        # Requests stack only when every axis but the batch agrees.
        groups.setdefault(tuple(tuple(t.shape[1:]) for t in checked), []).append((index, checked))
    for members in groups.values():
        for chunk in _chunks(members, max_rows):
            for index, outputs in zip((i for i, _ in chunk), _run_chunk(compiled, [t for _, t in chunk])):
                results[index] = outputs
    return results  # type: ignore[return-value]


def _chunks(members: list[tuple[int, list[torch.Tensor]]], max_rows: int):
    chunk, rows = [], 0
    for member in members:
        size = member[1][0].shape[0]
        if chunk and rows + size > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(member)
        rows += size
    if chunk:
        yield chunk


def _run_chunk(compiled, requests: list[list[torch.Tensor]]) -> list[tuple[torch.Tensor, ...] | KilnError]:
    sizes = [r[0].shape[0] for r in requests]
    try:
        stacked = [torch.cat(column) if len(requests) > 1 else column[0] for column in zip(*requests)]
        outputs = compiled.run_flat(stacked)
        names = flat_output_names(compiled.plan)
        for name, out in zip(names, outputs):
            if out.dim() == 0 or out.shape[0] != sum(sizes):
                raise ServingError(f"output {name!r} has shape {tuple(out.shape)}, not the {sum(sizes)} rows of the batch on axis 0",
                                   where="model", fix="serve a model whose every output keeps the batch on axis 0")
    except KilnError as exc:
        return [exc] * len(requests)
    split = [out.split(sizes) for out in outputs]
    return [tuple(parts[i] for parts in split) for i in range(len(requests))]
