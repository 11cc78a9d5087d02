"""What the model does with each integer input, read from the captured graph.

- Index inputs: an input that reaches an embedding lookup, index_select, gather or tensor
  indexing through value-preserving ops only (views, slices, copies, integer casts) can take
  only the values that table has rows for. PyTorch raises IndexError past them; backends do
  not (an Inductor engine aborts the whole process from a C++ bounds check, OpenVINO returns
  finite garbage, ONNX Runtime takes negative ids silently). The range is recorded in the input
  spec and checked on every call, so a bad id is an InputMismatch naming it.
- Mask inputs: an integer or boolean input of zeros and ones that is named like a mask or
  reaches an attention mask, a where() condition or a masked_fill mask. Verification draws such
  inputs with padding, fully padded rows included, as real batches have them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from kiln.types import InputSpec, TensorSpec

aten = torch.ops.aten

# Ops whose output holds the same values as their first argument (rearranged, sliced or copied).
_SAME_VALUES = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.clone.default, aten.contiguous.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.flatten.using_ints, aten.alias.default, aten.repeat.default, aten.narrow.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.lift_fresh_copy.default,
})
_MASK_USES = {aten.scaled_dot_product_attention.default: 3, aten.where.self: 0, aten.where.ScalarOther: 0,
              aten.where.ScalarSelf: 0, aten.where.Scalar: 0, aten.masked_fill.Scalar: 1, aten.masked_fill.Tensor: 1}
_MASK_SEARCH_NODES = 200  # nodes looked at from one input when looking for a mask use


def with_input_roles(spec: InputSpec, gm: GraphModule) -> InputSpec:
    """`spec` with each tensor's index range and mask flag as the graph `gm` uses them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(spec.tensors):
        return spec  # not the flat graph capture makes: nothing to read
    tensors = []
    for ts, node in zip(spec.tensors, placeholders):
        if ts.dtype.is_floating_point or ts.dtype.is_complex:
            tensors.append(ts)
            continue
        index_range = _index_range(node) if ts.dtype != torch.bool else None
        mask = index_range is None and _zeros_and_ones(ts) and ("mask" in ts.name.lower() or _reaches_mask_use(node))
        tensors.append(dataclasses.replace(ts, index_range=index_range, mask=mask))
    return dataclasses.replace(spec, tensors=tuple(tensors))


def _zeros_and_ones(ts: TensorSpec) -> bool:
    return ts.dtype == torch.bool or (ts.low is not None and ts.high is not None and 0 <= ts.low and ts.high <= 1)


def _index_range(placeholder: Node) -> tuple[int, int] | None:
    """The values every lookup the input reaches accepts (the intersection), or None."""
    ranges = []
    stack, seen = [placeholder], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if user.target in _SAME_VALUES and user.args and user.args[0] is node and _stays_integer(user):
                stack.append(user)
            elif (found := _lookup_range(user, node)) is not None:
                ranges.append(found)
    if not ranges:
        return None
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return (low, high) if low <= high else None


def _stays_integer(node: Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and value.dtype != torch.bool


def _lookup_range(user: Node, index: Node) -> tuple[int, int] | None:
    """The values `user` accepts in `index` when it looks rows up with it."""
    if user.target is aten.embedding.default and len(user.args) > 1 and user.args[1] is index:
        return _rows(user.args[0], 0, negative=False)
    if user.target is aten.index_select.default and len(user.args) > 2 and user.args[2] is index:
        return _rows(user.args[0], user.args[1], negative=False)
    if user.target is aten.gather.default and len(user.args) > 2 and user.args[2] is index:
        return _rows(user.args[0], user.args[1], negative=False)
    if user.target is aten.index.Tensor and len(user.args) > 1:
        positions = [i for i, item in enumerate(user.args[1]) if item is index]
        if positions:
            found = [_rows(user.args[0], axis, negative=True) for axis in positions]
            if any(f is None for f in found):
                return None
            return max(f[0] for f in found), min(f[1] for f in found)
    return None


def _rows(table, axis: int, negative: bool) -> tuple[int, int] | None:
    """[0, size - 1] of `table` along `axis` ([-size, size - 1] where negative indexes wrap)."""
    value = table.meta.get("val") if isinstance(table, Node) else None
    if not isinstance(value, torch.Tensor) or not -value.dim() <= axis < value.dim():
        return None
    size = value.shape[axis]
    if not isinstance(size, int):  # a dynamic table size: nothing fixed to check against
        return None
    return (-size if negative else 0, size - 1)


def _reaches_mask_use(placeholder: Node) -> bool:
    stack, seen = [placeholder], {placeholder}
    while stack and len(seen) < _MASK_SEARCH_NODES:
        node = stack.pop()
        for user in node.users:
            position = _MASK_USES.get(user.target)
            if position is not None and (position < len(user.args) and user.args[position] is node
                                         or position == 3 and user.kwargs.get("attn_mask") is node):
                return True
            if user not in seen and user.op == "call_function":
                seen.add(user)
                stack.append(user)
    return False
