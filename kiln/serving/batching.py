"""Batching requests for a compiled model: which artifacts can be batched, and running many
requests as few engine calls.

A server batches by stacking requests along axis 0, so every input must carry one shared
dynamic dim there (`dynamic={"x": {0: "batch"}, ...}` at compile time). Requests whose other
axes differ (two sentence lengths) are grouped by those sizes and each group runs as its own
call, unless the user names a dim that may be padded with its mask input (Batcher's `pad`).
Each request gets back exactly its own rows of every output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from kiln.errors import KilnError, ServingError
from kiln.frontend.input_spec import check_tensor, random_inputs
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


def run_batched(compiled, requests: Sequence[Sequence[torch.Tensor]], max_rows: int,
                pad: Mapping[str, str] | None = None) -> list[tuple[torch.Tensor, ...] | KilnError]:
    """Run requests (each its flat tensors in spec order, batch on axis 0) as few engine calls
    of at most `max_rows` rows; return, per request, its rows of every flat output, or the
    KilnError that refused it. A refused request never stops the others. `pad` as for Batcher."""
    return Batcher(compiled, max_rows, pad)(requests)


class Batcher:
    """Runs lists of requests for one compiled model (see the module docstring).

    pad: {dim name: mask input name}, e.g. {"seq": "attention_mask"}, for a model whose answer
    for a row does not change when that dim is padded with zeros (its mask zero there): requests
    that differ only in such dims then share a call, padded to the longest in it, and each
    answer is cut back to the request's own size. Which output axes to cut is read once, by
    running the model on two sizes of each padded dim."""

    def __init__(self, compiled, max_rows: int, pad: Mapping[str, str] | None = None):
        self.compiled = compiled
        self.spec: InputSpec = compiled.input_spec
        self.layout = batch_layout(self.spec, where="model")
        self.max_rows = min(max_rows, self.layout.max_rows)
        self.pad = dict(pad or {})
        check_pad(self.spec, self.layout, self.pad)
        self.cut_axes = _output_axes(compiled, self.spec, self.layout, self.pad) if self.pad else {}

    def __call__(self, requests: Sequence[Sequence[torch.Tensor]]) -> list[tuple[torch.Tensor, ...] | KilnError]:
        results: list[tuple[torch.Tensor, ...] | KilnError | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[torch.Tensor]]]] = {}
        for index, tensors in enumerate(requests):
            try:
                checked = check_request(self.spec, tensors)
                rows = checked[0].shape[0]
                if rows > self.max_rows:
                    raise ServingError(f"request has {rows} rows, more than the {self.max_rows} one call may take",
                                       where=f"input {self.spec.tensors[0].name!r}",
                                       fix=f"split it into requests of at most {self.max_rows} rows")
            except KilnError as exc:
                results[index] = exc
                continue
            # Requests stack only when every axis but the batch (and the padded dims) agrees.
            groups.setdefault(self._group_key(checked), []).append((index, checked))
        for members in groups.values():
            for chunk in _chunks(members, self.max_rows):
                for index, outputs in zip((i for i, _ in chunk), self._run_chunk([t for _, t in chunk])):
                    results[index] = outputs
        return results  # type: ignore[return-value]

    def _group_key(self, tensors: list[torch.Tensor]) -> tuple:
        return tuple(tuple(None if isinstance(d, Dim) and d.name in self.pad else size
                           for d, size in zip(ts.shape[1:], t.shape[1:])) for ts, t in zip(self.spec.tensors, tensors))

    def _run_chunk(self, requests: list[list[torch.Tensor]]) -> list[tuple[torch.Tensor, ...] | KilnError]:
        sizes = [r[0].shape[0] for r in requests]
        own = [self._pad_sizes(r) for r in requests]
        longest = {dim: max(o[dim] for o in own) for dim in self.pad}
        try:
            padded = [[_padded(ts, t, longest, self.pad) for ts, t in zip(self.spec.tensors, r)] for r in requests]
            stacked = [torch.cat(column) if len(padded) > 1 else column[0] for column in zip(*padded)]
            outputs = self.compiled.run_flat(stacked)
            for name, out in zip(flat_output_names(self.compiled.plan), outputs):
                if out.dim() == 0 or out.shape[0] != sum(sizes):
                    raise ServingError(f"output {name!r} has shape {tuple(out.shape)}, not the {sum(sizes)} rows of the batch on axis 0",
                                       where="model", fix="serve a model whose every output keeps the batch on axis 0")
        except KilnError as exc:
            return [exc] * len(requests)
        split = [out.split(sizes) for out in outputs]
        answers = []
        for i, sizes_of in enumerate(own):
            answer = []
            for position, parts in enumerate(split):
                part = parts[i]
                for dim, axes in self.cut_axes.get(position, {}).items():
                    for axis in axes:
                        part = part.narrow(axis, 0, sizes_of[dim])
                answer.append(part)
            answers.append(tuple(answer))
        return answers

    def _pad_sizes(self, tensors: list[torch.Tensor]) -> dict[str, int]:
        sizes = {}
        for ts, t in zip(self.spec.tensors, tensors):
            for axis, d in enumerate(ts.shape):
                if isinstance(d, Dim) and d.name in self.pad:
                    sizes[d.name] = t.shape[axis]
        return sizes


def check_pad(spec: InputSpec, layout: BatchLayout, pad: dict[str, str]) -> None:
    dims = spec.dims()
    for dim, mask in pad.items():
        if dim not in dims or dim == layout.dim.name:
            known = ", ".join(d for d in dims if d != layout.dim.name) or "none"
            raise ServingError(f"cannot pad dim {dim!r}: it is not a dynamic dim of the model other than the batch",
                               where="pad", fix=f"name one of its dynamic dims: {known}")
        carrier = next((t for t in spec.tensors if t.name == mask), None)
        if carrier is None or not any(isinstance(d, Dim) and d.name == dim for d in carrier.shape):
            raise ServingError(f"mask input {mask!r} does not carry dim {dim!r}", where="pad",
                               fix=f"name the input that masks {dim!r}, one of {', '.join(spec.names)}")


def _padded(ts, tensor: torch.Tensor, longest: dict[str, int], pad: dict[str, str]) -> torch.Tensor:
    """`tensor` padded at the end of each padded dim to the chunk's longest, with zeros (so the
    mask marks the padding as absent), or the lowest valid id where 0 is not one."""
    value = 0
    if ts.index_range is not None and not ts.index_range[0] <= 0 <= ts.index_range[1]:
        value = ts.index_range[0]
    for axis, d in enumerate(ts.shape):
        if isinstance(d, Dim) and d.name in longest and tensor.shape[axis] < longest[d.name]:
            shape = list(tensor.shape)
            shape[axis] = longest[d.name] - tensor.shape[axis]
            tensor = torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype)], dim=axis)
    return tensor


def _output_axes(compiled, spec: InputSpec, layout: BatchLayout, pad: dict[str, str]) -> dict[int, dict[str, list[int]]]:
    """{flat output position: {padded dim: output axes that follow it}}, read by running the
    model with each padded dim at two sizes, everything else alike."""
    axes: dict[int, dict[str, list[int]]] = {}
    base = {d.name: min(d.max, max(d.min, 3)) for d in spec.dims().values()}
    base[layout.dim.name] = min(layout.max_rows, max(layout.dim.min, 1))
    for dim in pad:
        dimension = spec.dims()[dim]
        if base[dim] + 1 > dimension.max:
            base[dim] = dimension.max - 1
        shapes = [[tuple(o.shape) for o in compiled.run_flat(random_inputs(spec, seed=0, sizes={**base, dim: base[dim] + step}))]
                  for step in (0, 1)]
        for position, (a, b) in enumerate(zip(*shapes)):
            changed = [axis for axis, (x, y) in enumerate(zip(a, b)) if x != y]
            if changed:
                axes.setdefault(position, {})[dim] = changed
    return axes


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
