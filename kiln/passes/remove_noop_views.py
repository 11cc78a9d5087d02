"""Remove views, casts and copies that return their input unchanged.

    reshape(x, x.shape) / view / _unsafe_view / expand(x, x.shape) / alias(x) / detach(x)
    slice(x, d, 0, end>=size, 1) / to(x, x.dtype, x.device) / contiguous(x) on contiguous x
    clone(x) / _to_copy(x) with x's own dtype, device and strides            all become   x
    reshape(view(x, s1), s2)  (any two of view/reshape, x contiguous)        becomes      reshape(x, s2)
    _assert_tensor_metadata(x, dtype=x's dtype, ...)                          is dropped

Models and export leave many of these (`view(-1, 8, 32)` on a tensor already of that shape,
`to(float32)` on float32 with export's assert on its input, `clone()` of a fresh value).
Each one is a node that an exporter may turn into a real copy and that breaks fusion patterns
in later passes. Shapes are compared exactly: static sizes as ints, dynamic sizes only when
their symbolic expressions are identical, never by guessing from the example.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from kiln.passes._aliases import Writes, family, root
from kiln.fx_helpers import is_call
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
SAME_SHAPE = (*RESHAPES, aten.expand.default)
ALWAYS = (aten.alias.default, aten.detach.default)  # at inference both return their input as is
CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other)
COPIES = (aten.clone.default, aten._to_copy.default)


def remove_noop_views(gm: GraphModule, ctx: PassContext) -> PassResult:
    writes = Writes(gm)
    outputs = _output_values(gm)
    removed = collapsed = asserts = 0
    skipped: list[Skip] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
            continue
        if node.target is aten._assert_tensor_metadata.default:
            if _assert_holds(node):  # export checks a cast's input this way; the meta proves it
                gm.graph.erase_node(node)
                asserts += 1
            continue
        if is_call(node, *RESHAPES) and is_call(node.args[0], *RESHAPES):
            if (reason := _why_not_collapsible(node.args[0])) is None:
                inner = node.args[0]
                if aten.reshape.default in (node.target, inner.target):
                    # a reshape in the chain may have copied; one reshape still never fails
                    node.target = aten.reshape.default
                node.args = (inner.args[0], *node.args[1:])  # may now reshape x to its own shape
                collapsed += 1
            else:
                skipped.append(Skip(node.name, reason))
        source = node.args[0]
        if not _is_noop(node, source):
            continue
        if _is_copy(node) and (reason := _why_copy_must_stay(node, source, writes, outputs)) is not None:
            skipped.append(Skip(node.name, reason))
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        removed += 1
    return PassResult(changed=removed + collapsed + asserts > 0,
                      counts={"removed": removed, "collapsed": collapsed, "asserts_dropped": asserts},
                      skipped=tuple(skipped))


def _is_noop(node: Node, source: Node) -> bool:
    out, inp = node.meta.get("val"), source.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    if node.target in ALWAYS:
        return True
    if not same_sizes(out.shape, inp.shape):
        return False
    if node.target in SAME_SHAPE:
        return True
    if node.target is aten.slice.Tensor:
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        return step == 1  # same size and step 1: every element, from the first
    if node.target is aten.contiguous.default or node.target in CASTS or node.target in COPIES:
        # same dtype, device, layout and memory order: the values and layout are the input's
        return (out.dtype == inp.dtype and out.device == inp.device and out.layout == inp.layout
                and same_strides(out, inp))
    return False


def _is_copy(node: Node) -> bool:
    """Ops that return fresh memory even when nothing changes (the others return their input)."""
    return node.target in COPIES or (node.target in CASTS and _argument(node, "copy", False) is True)


def _argument(node: Node, name: str, default):
    for index, arg in enumerate(node.target._schema.arguments):
        if arg.name == name:
            return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)
    return default


def _assert_holds(node: Node) -> bool:
    """An export-inserted `_assert_tensor_metadata` whose every claim the shape meta proves."""
    val = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if not isinstance(val, torch.Tensor):
        return False
    claims = {"size": (val.shape, same_sizes), "stride": (val.stride(), same_sizes),
              "dtype": (val.dtype, operator.eq), "device": (val.device, operator.eq), "layout": (val.layout, operator.eq)}
    for name, (actual, equal) in claims.items():
        claim = _argument(node, name, None)
        if claim is not None and not equal(actual, claim):
            return False
    return True


def _why_copy_must_stay(node: Node, source: Node, writes: Writes, outputs: set[Node]) -> str | None:
    if (writer := writes.writer_of(node)) is not None:
        return f"its result is written in place by {writer.name}; the copy keeps {source.name} unchanged"
    if (writer := writes.writer_of_memory(source)) is not None:
        return f"{root(source).name} is written in place by {writer.name}; the copy keeps the value before it"
    returned = family(node) & outputs
    if returned:
        base = root(source)
        if base.op in ("placeholder", "get_attr"):
            return f"its result is a graph output and would alias {base.op} {base.name}"
        if (family(base) - family(node)) & outputs:
            return f"its result is a graph output and would alias another output viewing {base.name}"
    return None


def _why_not_collapsible(inner: Node) -> str | None:
    if len(inner.users) > 1:
        return f"{inner.name} is also used by {', '.join(u.name for u in inner.users)}"
    first = inner.args[0].meta.get("val") if isinstance(inner.args[0], Node) else None
    if not isinstance(first, torch.Tensor) or not contiguous(first):
        # from non-contiguous memory a single reshape may copy where the two steps viewed
        return f"{inner.args[0]} is not contiguous: one reshape from it could view where the two steps copied"
    return None


def _output_values(gm: GraphModule) -> set[Node]:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return set(output.all_input_nodes)


def _expr(value):
    return value.node.expr if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) else value


def same_size(a, b) -> bool:
    """Provably equal sizes: equal ints, or identical symbolic expressions (no range reasoning)."""
    try:
        return bool(_expr(a) == _expr(b))
    except TypeError:
        return False


def same_sizes(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every axis longer than 1 (the stride of a size-1 axis is never used)."""
    return all(same_size(sa, sb) for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if not same_size(size, 1))


def contiguous(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        if not same_size(size, 1):
            if not same_size(stride, expected):
                return False
            expected = expected * _expr(size)
    return True
