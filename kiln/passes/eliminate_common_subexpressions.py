"""Compute each distinct value once.

    a = f(x, 3) ; b = f(x, 3)   becomes   a = f(x, 3), with b's users reading a

Captured graphs repeat work the model wrote twice: transformers build `arange(seq)` and the
same mask expansion in several places, and every layer reads `x.size(0)` again. A merged node
is one kernel (and one Transpose, one Expand in an exported engine) instead of several.

Never merged: ops with side effects (asserts, prints) or randomness, ops that write in place,
values that are written in place later (two copies of a tensor are not one when one is
mutated), and two computations separated by an in-place write that might change their inputs.
Two get_attr nodes merge only when they read the same attribute, never because the tensors
they read hold equal values.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from kiln.passes._aliases import Writes, is_mutating
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip


class _Unhashable(Exception):
    pass


def eliminate_common_subexpressions(gm: GraphModule, ctx: PassContext) -> PassResult:
    writes = Writes(gm)
    seen: dict[tuple, tuple[Node, int]] = {}  # key -> the node computing it and its epoch
    merged, skipped = 0, []
    epoch = 0  # counts in-place writes so far: values computed before and after one are not merged
    for node in list(gm.graph.nodes):
        if is_mutating(node) or node.op == "call_module":
            epoch += 1
        if node.op not in ("call_function", "get_attr"):
            continue
        try:
            key = (node.op, node.target, _key(node.args), _key(node.kwargs))
        except _Unhashable:
            continue  # an argument kiln cannot compare (a tensor constant): not worth proving equal
        first, first_epoch = seen.setdefault(key, (node, epoch))
        if first is node:
            continue
        if (reason := _why_not_merged(node, first, first_epoch != epoch, writes)) is not None:
            skipped.append(Skip(node.name, f"same as {first.name}, but {reason}"))
            seen[key] = (node, epoch)  # later copies compare with the most recent one
            continue
        node.replace_all_uses_with(first)  # first comes earlier in the graph, so it dominates
        gm.graph.erase_node(node)
        merged += 1
    return PassResult(changed=merged > 0, counts={"merged": merged}, skipped=tuple(skipped))


def _why_not_merged(node: Node, first: Node, write_between: bool, writes: Writes) -> str | None:
    if node.op == "get_attr":
        return None  # the same attribute: the very same tensor object
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in target.tags:
            return f"{target} draws new random numbers on each call"
        if target._schema.is_mutable:
            return f"{target} writes in place"
        if node.is_impure():
            return f"{target} has side effects"
    elif getattr(target, "__module__", None) not in ("_operator", "operator", "math"):
        # Python arithmetic on sizes and getitem are pure; other callables are unknown
        return f"{getattr(target, '__name__', target)} is not known to be pure"
    if write_between:
        return "an in-place write between them may change their inputs"
    if writes and (writer := writes.writer_of(node) or writes.writer_of(first)) is not None:
        return f"{writer.name} writes one of them in place"
    return None


def _key(value):
    """A hashable image of an argument: nodes by identity, numbers with their type (1, 1.0
    and True are equal in Python but not as op arguments), floats by their bits (-0.0, nan)."""
    if isinstance(value, Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _key(v)) for k, v in sorted(value.items())))
    if isinstance(value, float):
        return ("float", value.hex() if not math.isnan(value) else "nan")
    if isinstance(value, (bool, int, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(value).__name__, value)
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    raise _Unhashable(type(value).__name__)  # tensors and other objects: not worth proving equal
