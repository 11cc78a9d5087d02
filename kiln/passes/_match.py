"""Matching helpers for the recognition passes: numbers in operands, casts that keep values,
duplicated subexpressions (export does not merge `x - mean` written twice), node replacement.

Hand-written formulas reach the graph in many orders (0.5*x*(1+t), x*(1+t)/2, ...);
`expand` reads a small arithmetic subgraph as a polynomial over its leaves so a pass
compares coefficients instead of enumerating the orders.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.fx import GraphModule, Node

from kiln.fx_helpers import is_call

aten = torch.ops.aten
CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout)
ASSERTS = (aten._assert_tensor_metadata.default,)
WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}

# Relative tolerance for written constants: 5 significant digits (1.41421, 0.79788) still
# match; a constant further off changes outputs by more than fp32's verification tolerance.
CONSTANT_RTOL = 1e-5

Mono = tuple[tuple[str, int], ...]
Poly = dict[Mono, float]


def number(arg) -> float | None:
    if isinstance(arg, numbers.Real) and not isinstance(arg, bool):
        return float(arg)
    return None


def close(got: float, want: float, rtol: float = CONSTANT_RTOL) -> bool:
    return math.isclose(got, want, rel_tol=rtol, abs_tol=1e-12)


def val(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def users(node: Node) -> list[Node]:
    """Users that compute with `node` (export's dtype asserts do not count)."""
    return [u for u in node.users if not is_call(u, *ASSERTS)]


def with_number(node, *targets) -> tuple[Node, float] | None:
    """(tensor operand, number) of a binary op with one number operand; numbers come first only
    in add and mul, where the order does not matter."""
    if not is_call(node, *targets) or len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    if isinstance(first, Node) and number(second) is not None:
        return first, number(second)
    if isinstance(second, Node) and number(first) is not None and node.target in (aten.add.Tensor, aten.mul.Tensor):
        return second, number(first)
    return None


def tensor_pairs(node, target) -> list[tuple[Node, Node]]:
    """Both operand orders of a commutative op on two tensors."""
    if not is_call(node, target) or len(node.args) != 2 or node.kwargs:
        return []
    a, b = node.args
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return []
    return [(a, b), (b, a)]


def cast_input(node: Node) -> Node | None:
    if is_call(node, *CASTS) and isinstance(node.args[0], Node) and not node.kwargs.get("memory_format"):
        return node.args[0]
    return None


def strip_casts(node: Node, widening: bool = True) -> Node:
    """The tensor a chain of value-preserving casts starts from: identity casts always, casts to
    a wider float type too when `widening`."""
    while (source := cast_input(node)) is not None:
        have, was = val(node), val(source)
        if have is None or was is None:
            break
        if have.dtype != was.dtype and not (widening and WIDER.get(was.dtype) == have.dtype):
            break
        node = source
    return node


def same_value(a, b, depth: int = 4) -> bool:
    """a and b compute the same thing: one node, or the same op on the same operands."""
    if a is b:
        return True
    if not (isinstance(a, Node) and isinstance(b, Node)) or depth == 0:
        return False
    if a.op != "call_function" or a.target != b.target or a.kwargs != b.kwargs or len(a.args) != len(b.args):
        return False
    return all(same_value(x, y, depth - 1) if isinstance(x, Node) else x == y for x, y in zip(a.args, b.args))


def trailing(dims, rank: int) -> int | None:
    """How many trailing dims `dims` names (all of them, once each), else None."""
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or rank == 0:
        return None
    positive = sorted(d % rank for d in dims)
    return len(positive) if positive == list(range(rank - len(positive), rank)) else None


def replace(gm: GraphModule, old: Node, target, args: tuple, kwargs: dict | None = None) -> Node:
    """Insert `target(*args)` before `old`, route `old`'s users to it, carry `old`'s meta, and
    erase what only `old` used (so later matching never sees half of a replaced formula)."""
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args, kwargs or {})
    for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    erase_unused(gm, old)
    return new


def erase_unused(gm: GraphModule, node: Node) -> None:
    """Erase `node` if nothing but export's dtype asserts uses it, then its unused inputs."""
    pending = [node]
    while pending:
        node = pending.pop()
        if node.op != "call_function" or erased(node) or users(node):
            continue
        for check in list(node.users):
            gm.graph.erase_node(check)
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        pending.extend(inputs)


def erased(node: Node) -> bool:
    return getattr(node, "_erased", False)


# --- polynomials over leaf nodes ---------------------------------------------------------


def expand(root: Node, budget: int = 16, inner: set | None = None) -> tuple[Poly, dict[str, Node]] | None:
    """`root` as a polynomial over leaf nodes, or None when it is not one. Inner nodes with
    other users are leaves: folding them into the replacement would not remove them. The
    expanded nodes below the root are added to `inner` when given."""
    leaves: dict[str, Node] = {}
    left = [budget]

    def walk(arg, is_root: bool = False) -> Poly | None:
        if (value := number(arg)) is not None:
            return {(): value}
        if not isinstance(arg, Node):
            return None
        left[0] -= 1
        if left[0] < 0:
            return None
        if not is_root and (len(users(arg)) != 1 or not _arithmetic(arg)):
            leaves[arg.name] = arg
            return {((arg.name, 1),): 1.0}
        if not _arithmetic(arg):
            return None
        if inner is not None and not is_root:
            inner.add(arg)
        target, args, alpha = arg.target, arg.args, number(arg.kwargs.get("alpha", 1))
        if target is aten.neg.default:
            return _scale(walk(args[0]), -1.0)
        if target is aten.pow.Tensor_Scalar:
            base, exponent = walk(args[0]), args[1]
            return _power(base, int(exponent)) if base is not None else None
        if target is aten.div.Tensor:
            return _scale(walk(args[0]), 1.0 / args[1])
        a, b = walk(args[0]), walk(args[1])
        if a is None or b is None:
            return None
        if target is aten.mul.Tensor:
            return _product(a, b)
        return _sum(a, _scale(b, alpha if target is aten.add.Tensor else -alpha))

    poly = walk(root, is_root=True)
    return (poly, leaves) if poly is not None else None


def _arithmetic(node: Node) -> bool:
    if is_call(node, aten.mul.Tensor):
        return True
    if is_call(node, aten.add.Tensor, aten.sub.Tensor):
        return number(node.kwargs.get("alpha", 1)) is not None and len(node.args) == 2
    if is_call(node, aten.div.Tensor):
        return number(node.args[1]) not in (None, 0.0) and not node.kwargs
    if is_call(node, aten.pow.Tensor_Scalar):
        exponent = number(node.args[1])
        return exponent is not None and exponent == int(exponent) and 1 <= exponent <= 4
    return is_call(node, aten.neg.default)


def _scale(poly: Poly | None, factor: float) -> Poly | None:
    return None if poly is None else {k: v * factor for k, v in poly.items()}


def _sum(a: Poly, b: Poly) -> Poly:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v
    return {k: v for k, v in out.items() if v != 0.0}


def _product(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ka, va in a.items():
        for kb, vb in b.items():
            powers = dict(ka)
            for name, p in kb:
                powers[name] = powers.get(name, 0) + p
            key = tuple(sorted(powers.items()))
            out[key] = out.get(key, 0.0) + va * vb
    return {k: v for k, v in out.items() if v != 0.0}


def _power(poly: Poly, exponent: int) -> Poly:
    out: Poly = {(): 1.0}
    for _ in range(exponent):
        out = _product(out, poly)
    return out


def mono(*factors: tuple[Node, int]) -> Mono:
    return tuple(sorted((n.name, p) for n, p in factors))


def describe(poly: Poly) -> str:
    """A polynomial as text for skip reasons: 0.5·x + 0.5·x·erf."""
    def term(key: Mono, coef: float) -> str:
        names = "·".join(name if p == 1 else f"{name}^{p}" for name, p in key)
        return f"{coef:.7g}" + (f"·{names}" if names else "")
    return " + ".join(term(k, v) for k, v in sorted(poly.items())) or "0"
