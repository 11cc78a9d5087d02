"""Replace hand-written activations by the ATen op they spell out.

    0.5·x·(1 + erf(x/√2))                          becomes   gelu(x)
    0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))      becomes   gelu(x, approximate="tanh")
    x·sigmoid(x)                                    becomes   silu(x)
    x·relu6(x + 3)/6   (hardtanh, clamp(0, 6))      becomes   hardswish(x)
    relu6(x + 3)/6                                  becomes   hardsigmoid(x)

Written out, each is five to ten elementwise ops, each a pass over the activation; as one op
every backend runs one kernel, and GELU and friends become fusable epilogues of the GEMM or
convolution before them (ONNX Runtime's BiasGelu and FusedConv, Inductor's pointwise fusion).
The formula is read as a polynomial over its leaves, so any order of the factors matches;
its constants must match within CONSTANT_RTOL, otherwise the place is skipped with the reason.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from kiln.fx_helpers import is_call
from kiln.passes._match import close, describe, erased, expand, mono, number, replace, users, with_number
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
ERF_SCALE = 1 / math.sqrt(2)
TANH_SCALE = math.sqrt(2 / math.pi)
TANH_CUBIC = 0.044715
CLAMPS = (aten.relu6.default, aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
          aten.clamp_max.default, aten.relu.default)


def recognise_activations(gm: GraphModule, ctx: PassContext) -> PassResult:
    counts = {"gelu": 0, "gelu_tanh": 0, "silu": 0, "hardswish": 0, "hardsigmoid": 0}
    skipped: list[Skip] = []
    inside: set[Node] = set()  # parts of a formula already matched or skipped as a whole
    # Outermost first: x·(relu6(x+3)/6) is one hardswish, not a hardsigmoid inside a product.
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or erased(node) or node in inside or not users(node) \
                or node.target not in (aten.mul.Tensor, aten.div.Tensor):
            continue
        found = _match(node, inside)
        if found is None:
            continue
        if isinstance(found, str):
            skipped.append(Skip(node.name, found))
            continue
        name, target, x, kwargs = found
        replace(gm, node, target, (x,), kwargs)
        counts[name] += 1
    return PassResult(changed=sum(counts.values()) > 0, counts=counts, skipped=tuple(skipped))


def _match(root: Node, inside: set[Node]):
    """(count name, op, input, kwargs), a skip reason, or None when `root` is no activation."""
    below: set[Node] = set()
    expanded = expand(root, inner=below)
    if expanded is None:
        return None
    poly, leaves = expanded
    for leaf in leaves.values():
        for matcher in (_gelu, _silu, _hardswish, _hardsigmoid):
            if (found := matcher(poly, leaf, leaves)) is not None:
                inside.update(below)
                return found
    return None


def _other_leaf(leaves: dict[str, Node], leaf: Node) -> Node | None:
    others = [n for n in leaves.values() if n is not leaf]
    return others[0] if len(others) == 1 else None


def _gelu(poly, t: Node, leaves):
    """poly = a·x + b·x·t with t = erf(u) or tanh(u), u a polynomial in x."""
    if not is_call(t, aten.erf.default, aten.tanh.default) or (x := _other_leaf(leaves, t)) is None:
        return None
    if set(poly) != {mono((x, 1)), mono((x, 1), (t, 1))}:
        return None
    inner = expand(t.args[0]) if isinstance(t.args[0], Node) else None
    if t.args[0] is x:
        inner = ({mono((x, 1)): 1.0}, {x.name: x})
    if inner is None or set(inner[1]) != {x.name}:
        return None
    erf = t.target is aten.erf.default
    name = "gelu" if erf else "gelu_tanh"
    want_inner = {mono((x, 1)): ERF_SCALE} if erf else {mono((x, 1)): TANH_SCALE, mono((x, 3)): TANH_SCALE * TANH_CUBIC}
    want = {mono((x, 1)): 0.5, mono((x, 1), (t, 1)): 0.5}
    if not _matches(poly, want) or not _matches(inner[0], want_inner):
        got = f"{describe(poly)} with {t.name} = {t.target.__name__.split('.')[0]}({describe(inner[0])})"
        return (f"looks like {name} but its constants differ: {got}; "
                f"{name} needs 0.5·x + 0.5·x·{t.name} with {t.name}'s argument {describe(want_inner)}")
    return name, aten.gelu.default, x, {} if erf else {"approximate": "tanh"}


def _silu(poly, s: Node, leaves):
    """poly = x·sigmoid(x)."""
    if not is_call(s, aten.sigmoid.default) or (x := _other_leaf(leaves, s)) is None:
        return None
    if set(poly) != {mono((x, 1), (s, 1))}:
        return None
    arg = s.args[0]
    inner = {mono((x, 1)): 1.0} if arg is x else (expand(arg) or ({}, {}))[0]
    if not inner or any(name != x.name for key in inner for name, _ in key):
        return None  # a gate over another tensor (GLU), not a self-gated activation
    if not _matches(poly, {mono((x, 1), (s, 1)): 1.0}) or not _matches(inner, {mono((x, 1)): 1.0}):
        return (f"x·sigmoid form {describe(poly)} with {s.name} = sigmoid({describe(inner)}) is not silu, "
                f"which needs x·sigmoid(x) exactly")
    return "silu", aten.silu.default, x, {}


def _hardswish(poly, r: Node, leaves):
    """poly = x·clamp(x + 3, 0, 6)/6, or x·hardsigmoid(x)."""
    x = _other_leaf(leaves, r)
    if x is None or set(poly) != {mono((x, 1), (r, 1))}:
        return None
    if is_call(r, aten.hardsigmoid.default) and r.args[0] is x:
        scale, reason = 1.0, None
    else:
        clamp = _clamp_x_plus_3(r)
        if clamp is None or clamp[0] is not x:
            return None
        scale, reason = 1 / 6, clamp[1]
    if reason is None and not _matches(poly, {mono((x, 1), (r, 1)): scale}):
        reason = f"scaled by {poly[mono((x, 1), (r, 1))]:.7g}, not 1/6"
    if reason is not None:
        return f"x·clamp(x + c, lo, hi)·k form is not hardswish: {reason}"
    return "hardswish", aten.hardswish.default, x, {}


def _hardsigmoid(poly, r: Node, leaves):
    """poly = clamp(x + 3, 0, 6)/6."""
    if len(leaves) != 1 or set(poly) != {mono((r, 1))} or (clamp := _clamp_x_plus_3(r)) is None:
        return None
    x, reason = clamp
    if reason is None and not _matches(poly, {mono((r, 1)): 1 / 6}):
        reason = f"scaled by {poly[mono((r, 1))]:.7g}, not 1/6"
    if reason is not None:
        return f"clamp(x + c, lo, hi)·k form is not hardsigmoid: {reason}"
    return "hardsigmoid", aten.hardsigmoid.default, x, {}


def _clamp_x_plus_3(r: Node) -> tuple[Node, str | None] | None:
    """(x, None) for relu6(x + 3) and its hardtanh/clamp spellings, (x, reason) when the bounds
    or the offset differ, None for anything else."""
    if not is_call(r, *CLAMPS):
        return None
    lo, hi, inner = _bounds(r)
    if (shifted := with_number(inner, aten.add.Tensor)) is None or len(users(inner)) != 1:
        return None
    x, offset = shifted
    if not (close(lo, 0.0) and close(hi, 6.0)):
        return x, f"clamps to [{lo}, {hi}], not [0, 6]"
    if not close(offset, 3.0):
        return x, f"adds {offset:.7g} before clamping, not 3"
    return x, None


def _bounds(r: Node) -> tuple[float, float, Node]:
    """(low, high, clamped tensor) of a chain of relu6/hardtanh/clamp/clamp_min/clamp_max."""
    lo, hi, node = -math.inf, math.inf, r
    while True:
        low, high = _own_bounds(node)
        lo, hi = max(lo, low), min(hi, high)
        inner = node.args[0]
        if not (is_call(inner, *CLAMPS) and len(users(inner)) == 1):
            return lo, hi, inner
        node = inner


def _own_bounds(node: Node) -> tuple[float, float]:
    if node.target is aten.relu6.default:
        return 0.0, 6.0
    if node.target is aten.relu.default:
        return 0.0, math.inf
    if node.target is aten.hardtanh.default:
        low, high = [*node.args[1:], -1.0, 1.0][:2]
    elif node.target is aten.clamp.default:
        low, high = [*node.args[1:], None, None][:2]
    elif node.target is aten.clamp_min.default:
        low, high = node.args[1], None
    else:
        low, high = None, node.args[1]
    low, high = number(low), number(high)
    return (-math.inf if low is None else low), (math.inf if high is None else high)


def _matches(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(close(got[k], want[k]) for k in want)
