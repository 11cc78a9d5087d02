"""Replace size computations whose value is known at compile time by Python numbers.

    n = sym_size(x, 1)                    with axis 1 static in the input spec      n -> 8
    d = sym_size(x, 0) - sym_size(y, 0)   with x and y sharing the dim "batch"      d -> 0
    r = d + 1 ; view(y, [r, -1, 4])                                 becomes   view(y, [1, -1, 4])

Export records the model's own size arithmetic (`x.size(0) // x.size(0)`, `x.numel()`) as
nodes on symbolic sizes. A node whose value is a number for every input the spec allows is
folded, so views and factories that read it get plain ints (which exporters turn into
constants rather than Shape/Gather/Mul chains). Only what holds for every size is folded:
the symbolic expression must be a number, or the spec must fix the axis. Export's own range
assumptions for a dynamic dim are not used, because they may be narrower than the spec's.
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import GraphModule, Node

from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip
from kiln.types import Dim

aten = torch.ops.aten
SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


def fold_shape_arithmetic(gm: GraphModule, ctx: PassContext) -> PassResult:
    static_axes = _static_axes(gm, ctx)
    folded, skipped = 0, []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        value = _known_value(node, static_axes)
        if value is None:
            if _is_size_computation(node) and node.target is not aten.sym_size.int and _expr(node.meta.get("val")) is not None:
                skipped.append(Skip(node.name, f"its value {node.meta['val']} depends on a dynamic size"
                                               f" ({_dims_named(gm, ctx, node.meta['val'])})"))
            continue
        for user in list(node.users):  # a number, not a node, takes its place in each user
            user.args, user.kwargs = torch.fx.node.map_aggregate(
                (user.args, user.kwargs), lambda a: value if a is node else a)
        gm.graph.erase_node(node)
        folded += 1
    return PassResult(changed=folded > 0, counts={"folded": folded}, skipped=tuple(skipped))


def _known_value(node: Node, static_axes: dict[Node, dict[int, int]]) -> int | float | bool | None:
    """The Python number `node` always computes, or None."""
    val = node.meta.get("val")
    if node.target is aten.sym_size.int and node.args[0] in static_axes:
        axes = static_axes[node.args[0]]
        axis = node.args[1] % len(node.args[0].meta["val"].shape)
        if axis in axes:
            return axes[axis]
    if not _is_size_computation(node):
        return None
    if isinstance(val, (bool, int, float)):
        return val
    if not isinstance(node.target, torch._ops.OpOverload) and not node.all_input_nodes:
        return node.target(*node.args, **node.kwargs)  # Python arithmetic on sizes folded before it
    if isinstance(val, SYM_TYPES):
        expr = val.node.expr
        if expr.is_number or expr in (sympy.true, sympy.false):
            return _as_python(val, expr)
    return None


def _is_size_computation(node: Node) -> bool:
    """Nodes that produce a size or a number, never a tensor (so a number can take their place)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target in (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default)
    module = getattr(target, "__module__", None)
    if module == "torch" and getattr(target, "__name__", "").startswith("sym_"):  # sym_max, sym_float ...
        return True
    return module in ("_operator", "operator", "math") and target is not operator.getitem


def _as_python(val, expr) -> int | float | bool:
    if isinstance(val, torch.SymBool):
        return bool(expr)
    if isinstance(val, torch.SymFloat):
        return float(expr)
    return int(expr)


def _expr(val):
    if isinstance(val, SYM_TYPES) and not val.node.expr.is_number:
        return val.node.expr
    return None


def _static_axes(gm: GraphModule, ctx: PassContext) -> dict[Node, dict[int, int]]:
    """Per graph input, the axes the input spec fixes to one size."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = ctx.input_spec.tensors
    if len(placeholders) != len(specs):
        return {}  # not the graph the spec was built for (a partition's): trust the shape meta only
    return {node: {axis: size for axis, size in enumerate(spec.shape) if isinstance(size, int)}
            for node, spec in zip(placeholders, specs)}


def _dims_named(gm: GraphModule, ctx: PassContext, val) -> str:
    """The spec's names for the symbols in `val` ("batch" rather than export's "s87")."""
    names = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, ctx.input_spec.tensors):
        shape = getattr(node.meta.get("val"), "shape", ())
        for size, dim in zip(shape, spec.shape):
            if isinstance(size, torch.SymInt) and isinstance(dim, Dim):
                names[size.node.expr] = dim.name
    symbols = sorted(val.node.expr.free_symbols, key=str)
    return ", ".join(f"{names.get(sym, sym)}" for sym in symbols) or "no input dim"
