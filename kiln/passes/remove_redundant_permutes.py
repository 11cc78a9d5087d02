"""Compose chains of permutes and transposes; drop those that compose to the identity.

    permute(permute(x, p), q)   becomes   permute(x, [p[q[0]], p[q[1]], ...])
    transpose(transpose(x, 1, 2), 1, 2)   becomes   x

Attention blocks transpose heads in and out again (`transpose(1, 2)` before the matmul and
after it), and layout changes around convolutions leave NCHW -> NHWC -> NCHW pairs. Every
permute is a Transpose node in an exported engine, often a real copy there; composing the
chain leaves at most one. The composed permute is a view with the same strides as the chain,
so everything downstream sees the same memory layout.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from kiln.fx_helpers import is_call
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
PERMUTES = (aten.permute.default, aten.transpose.int, aten.t.default)


def remove_redundant_permutes(gm: GraphModule, ctx: PassContext) -> PassResult:
    removed = composed = 0
    skipped: list[Skip] = []
    for node in list(gm.graph.nodes):
        if not is_call(node, *PERMUTES) or not is_call(node.args[0], *PERMUTES):
            continue
        inner = node.args[0]
        order = _order(inner)
        outer = _order(node)
        if order is None or outer is None:
            skipped.append(Skip(node.name, "the rank of a permuted tensor is unknown (no shape meta)"))
            continue
        total = [order[i] for i in outer]  # output axis i reads inner axis outer[i], which reads x axis order[...]
        source = inner.args[0]
        if total == sorted(total):
            node.replace_all_uses_with(source)  # a view of x with x's own shape and strides: x itself
            gm.graph.erase_node(node)
            removed += 1
            continue
        if len(inner.users) > 1:
            # the inner permute stays for its other users, so composing would not remove a node
            skipped.append(Skip(node.name, f"{inner.name} is also used by "
                                           f"{', '.join(u.name for u in inner.users if u is not node)}"))
            continue
        with gm.graph.inserting_before(node):
            single = gm.graph.call_function(aten.permute.default, (source, total))
        single.meta.update(node.meta)
        node.replace_all_uses_with(single)
        gm.graph.erase_node(node)
        composed += 1
    return PassResult(changed=removed + composed > 0, counts={"removed": removed, "composed": composed},
                      skipped=tuple(skipped))


def _order(node: Node) -> list[int] | None:
    """The permutation `node` applies: output axis i is input axis order[i]."""
    value = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    rank = value.dim()
    if node.target is aten.permute.default:
        return [d % rank if rank else 0 for d in node.args[1]]
    order = list(range(rank))
    if node.target is aten.transpose.int:
        a, b = (d % rank if rank else 0 for d in node.args[1:3])
    else:  # t(): transposes a 2-d tensor, leaves 0-d and 1-d alone
        if rank < 2:
            return order
        a, b = 0, 1
    order[a], order[b] = order[b], order[a]
    return order
