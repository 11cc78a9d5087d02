"""Merge the linear projections that read one input into a single wider linear.

    q = linear(x, Wq, bq) ; k = linear(x, Wk, bk) ; v = linear(x, Wv, bv)
    becomes
    q, k, v = split_with_sizes(linear(x, [Wq; Wk; Wv], [bq; bk; bv]), [nq, nk, nv], dim=-1)

Weights stack along the output-feature axis (rows), so each slice of the merged output is
exactly one original projection. One GEMM with N = nq + nk + nv reads x once and gives the
kernel a wider, better-shaped problem than three small ones, which matters most at small
batch. Counted once per merged group.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from kiln.fx_helpers import add_constant, attr_value, call, is_call
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
MIN_GROUP = 3  # Q, K and V; a lone pair saves too little to be worth the split


def merge_qkv_projections(gm: GraphModule, ctx: PassContext) -> PassResult:
    groups: dict[Node, list[Node]] = {}
    for node in gm.graph.nodes:
        if is_call(node, aten.linear.default) and isinstance(node.args[0], Node):
            groups.setdefault(node.args[0], []).append(node)
    merged, skipped = 0, []
    for linears in groups.values():
        if len(linears) < MIN_GROUP:
            continue
        eligible = []
        for linear in linears:
            if (reason := _why_not_mergeable(gm, linear)) is not None:
                skipped.append(Skip(linear.name, reason))
            else:
                eligible.append(linear)
        if len(eligible) < MIN_GROUP:
            continue  # the skips above say why each one left the group
        if (reason := _why_not_together(gm, eligible)) is not None:
            skipped.extend(Skip(linear.name, reason) for linear in eligible)
            continue
        _merge(gm, eligible)
        merged += 1
    return PassResult(changed=merged > 0, counts={"merged": merged}, skipped=tuple(skipped))


def _bias(linear: Node):
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def _why_not_mergeable(gm: GraphModule, linear: Node) -> str | None:
    weight, bias = linear.args[1], _bias(linear)
    if attr_value(gm, weight) is None:
        return f"{linear.name}'s weight is computed, not a stored parameter"
    if len(weight.users) != 1:
        # the other user still needs the tensor, so merging would store it twice
        return f"{linear.name}'s weight is shared with {', '.join(u.name for u in weight.users if u is not linear)}"
    if attr_value(gm, weight).dim() != 2:
        return f"{linear.name}'s weight has rank {attr_value(gm, weight).dim()}, not 2"
    if bias is not None:
        if attr_value(gm, bias) is None:
            return f"{linear.name}'s bias is computed, not a stored parameter"
        if len(bias.users) != 1:
            return f"{linear.name}'s bias is shared with {', '.join(u.name for u in bias.users if u is not linear)}"
    return None


def _why_not_together(gm: GraphModule, linears: list[Node]) -> str | None:
    weights = [attr_value(gm, linear.args[1]) for linear in linears]
    biases = [attr_value(gm, b) if (b := _bias(linear)) is not None else None for linear in linears]
    names = ", ".join(linear.name for linear in linears)
    kinds = {(w.dtype, w.device) for w in weights} | {(b.dtype, b.device) for b in biases if b is not None}
    if len(kinds) > 1:
        # one merged GEMM has one dtype; a cast would change what the narrower ones compute
        return f"the weights of {names} differ in dtype or device ({', '.join(sorted(str(k[0]) for k in kinds))})"
    if len({w.shape[1] for w in weights}) > 1:
        return f"the weights of {names} have different in-features ({sorted({w.shape[1] for w in weights})})"
    if len({b is None for b in biases}) > 1:
        return f"some of {names} have a bias and some do not"
    total = sum(w.shape[0] for w in weights)
    return next(filter(None, (_view_reason(linear, total) for linear in linears)), None)


def _view_reason(linear: Node, total: int) -> str | None:
    """A slice of the merged output is not contiguous: a view that flattens the feature axis
    into another would fail on it at run time."""
    val = linear.meta["val"]
    piece = val.new_empty((*val.shape[:-1], total)).narrow(-1, 0, val.shape[-1])  # fake or meta: no data
    for user in linear.users:
        if is_call(user, aten.view.default):
            size = torch.fx.node.map_arg(user.args[1], lambda n: n.meta["val"])
            try:
                piece.view(size)
            except (RuntimeError, ValueError):  # meta kernels raise the one, fake tensors the other
                return f"{user.name} views {linear.name}'s output in a way a slice of the merged output does not allow"
    return None


def _merge(gm: GraphModule, linears: list[Node]) -> None:
    first = linears[0]  # graph order: the input and every weight read come before it
    weights = [attr_value(gm, linear.args[1]) for linear in linears]
    biases = [attr_value(gm, _bias(linear)) if _bias(linear) is not None else None for linear in linears]
    with torch.no_grad():
        weight = add_constant(gm, first, torch.cat(weights, dim=0), "qkv_weight")
        bias = add_constant(gm, first, torch.cat(biases, dim=0), "qkv_bias") if biases[0] is not None else None
    sizes = [w.shape[0] for w in weights]
    with gm.graph.inserting_before(first):
        wide = call(gm, aten.linear.default, (first.args[0], weight, bias), meta_from=first)
        parts = call(gm, aten.split_with_sizes.default, (wide, sizes, -1), meta_from=first)
        for index, linear in enumerate(linears):
            part = call(gm, operator.getitem, (parts, index), meta_from=linear)
            linear.replace_all_uses_with(part)
    for linear in linears:
        gm.graph.erase_node(linear)
