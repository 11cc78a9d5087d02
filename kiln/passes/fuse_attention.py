"""Replace eager attention with one scaled_dot_product_attention node.

    p = softmax((q @ kᵀ) · s + mask, dim=-1) ; o = p @ v
    becomes
    o = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s)

The scale may sit on the scores (`· s`, `/ sqrt(d)`) or on q; inactive dropout and no-op casts
between softmax and `@ v` are looked through. A mask that is a constant equal to SDPA's own
causal mask becomes `is_causal=True`, an all-zero constant mask is dropped, and any other
additive mask is passed as `attn_mask`.
Attention without a heads axis (rank 3) gets a unit leading axis, since backends take
(B, H, L, E). One SDPA node lets each backend run its fused attention kernel (flash or
memory-efficient attention, ORT's attention contrib ops) instead of writing and re-reading the
(Lq, Lk) score matrix between four separate ops.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.fx_helpers import attr_value, call, is_call
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
SOFTMAXES = (aten.softmax.int, aten._softmax.default)
MULS = (aten.mul.Tensor, aten.mul.Scalar)
DIVS = (aten.div.Tensor, aten.div.Scalar)
# ops that return their input unchanged when dtype and device already match
NO_OPS = (aten.contiguous.default, aten.clone.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default)
ASSERTS = (aten._assert_tensor_metadata.default,)
MAX_MASK_NODES = 256  # a constant mask's subgraph larger than this is not evaluated


@dataclass
class _Attention:
    query: Node
    key_t: Node  # kᵀ as the scores matmul reads it
    value: Node
    mask: Node | None
    scale: float
    is_causal: bool
    output: Node  # probs @ v, replaced by the SDPA node
    interior: list[Node]  # nodes between the two matmuls in graph order, dead after the rewrite


def fuse_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    fused, skipped = 0, []
    for node in list(gm.graph.nodes):
        if not is_call(node, *SOFTMAXES):
            continue
        found = _match(gm, node)
        if found is None:
            continue  # a softmax that is not between two matmuls (a classifier head)
        if isinstance(found, str):
            skipped.append(Skip(node.name, found))
            continue
        _rewrite(gm, found)
        fused += 1
    return PassResult(changed=fused > 0, counts={"attention": fused}, skipped=tuple(skipped))


def _match(gm: GraphModule, softmax: Node) -> _Attention | str | None:
    scores = _trace_scores(softmax.args[0])
    output, down, down_reason = _trace_probs(softmax)
    if scores is None and output is None:
        return None
    if scores is None:
        return "softmax input is not (q @ kᵀ), scaled by a number, plus a mask"
    qk, scale, mask, up = scores
    if (reason := _softmax_reason(softmax)) or (reason := down_reason):
        return reason
    path = [softmax, *up, qk]
    for successor, node in zip(path, path[1:]):
        if len(_users(node)) != 1:
            # SDPA never materialises the scores, so nothing else can read them
            return f"the attention scores ({node.name}) are also used by {_names(_users(node), successor)}"
    query, key_t, value = qk.args[0], qk.args[1], output.args[1]
    query, scale = _fold_query_scale(query, qk, scale)
    if (reason := _shape_reason(query, key_t, value)) is not None:
        return reason
    is_causal = False
    if mask is not None:
        if (reason := _mask_reason(mask, qk)) is not None:
            return reason
        lq, lk = qk.meta["val"].shape[-2:]
        constant = _constant_value(gm, mask)
        if constant is not None and not bool(constant.any()):
            mask = None  # an all-zero mask (ViT builds one) adds nothing
        elif constant is not None and _is_causal_mask(constant, lq, lk):
            mask, is_causal = None, True
    return _Attention(query, key_t, value, mask, scale, is_causal, output, [qk, *reversed(up), softmax, *down])


def _trace_scores(node) -> tuple[Node, float, Node | None, list[Node]] | None:
    """(q @ kᵀ node, scale, mask, nodes after the matmul) for softmax's input, or None."""
    chain, mask = [], None
    if is_call(node, aten.add.Tensor) and node.kwargs.get("alpha", 1) == 1:
        first, second = node.args[:2]
        if _reaches_matmul(first):
            scores, mask = first, second
        elif _reaches_matmul(second):
            scores, mask = second, first
        else:
            return None
        chain.append(node)
        node = scores
    scale = 1.0
    while (factor := _scalar_factor(node)) is not None:
        scale *= factor
        chain.append(node)
        node = node.args[0]
    if not is_call(node, aten.matmul.default):
        return None
    return node, scale, mask, chain


def _trace_probs(softmax: Node) -> tuple[Node | None, list[Node], str | None]:
    """(probs @ v node, nodes between softmax and it, reason it cannot fuse)."""
    node, chain, reason = softmax, [], None
    while True:
        users = _users(node)
        if len(users) != 1:
            to_values = next((u for u in users if is_call(u, aten.matmul.default) and u.args[0] is node), None)
            return None, chain, f"the attention probabilities ({node.name}) are also used by {_names(users, to_values)}"
        (user,) = users
        if is_call(user, aten.dropout.default):
            train = user.args[2] if len(user.args) > 2 else user.kwargs.get("train", True)
            if train is not False and user.args[1] != 0:
                # SDPA's dropout_p is training-only here; random dropout must stay visible
                reason = reason or f"dropout {user.name} is active between softmax and @ v (train=True)"
        elif not (is_call(user, *NO_OPS) and _same_type(user, node)):
            break
        chain.append(user)
        node = user
    if is_call(user, aten.matmul.default) and user.args[0] is node:
        return user, chain, reason
    return None, chain, f"the attention probabilities feed {user.name} ({user.target}), not a matmul with the values"


def _softmax_reason(softmax: Node) -> str | None:
    rank = softmax.meta["val"].dim()
    dim = softmax.args[1]
    if dim % rank != rank - 1:
        return f"softmax over dim {dim}, not the last (keys) dim of a rank-{rank} tensor"
    if softmax.target is aten._softmax.default:
        return "softmax computes in float32 from half (half_to_float=True)" if softmax.args[2] else None
    dtype = softmax.args[2] if len(softmax.args) > 2 else softmax.kwargs.get("dtype")
    if dtype is not None and dtype != softmax.args[0].meta["val"].dtype:
        return f"softmax computes in {dtype}, not in the scores' dtype"
    return None


def _shape_reason(query: Node, key_t: Node, value: Node) -> str | None:
    q, k, v = (n.meta["val"] for n in (query, key_t, value))
    if not q.is_floating_point():
        return f"attention in {q.dtype}"
    if not 2 <= q.dim() <= 4 or k.dim() != q.dim() or v.dim() != q.dim():
        return f"q, kᵀ, v have ranks {q.dim()}, {k.dim()}, {v.dim()}; SDPA here takes equal ranks 2 to 4"
    if not all(_known_equal(a, b) and _known_equal(a, c) for a, b, c in zip(q.shape[:-2], k.shape[:-2], v.shape[:-2])):
        return f"q, kᵀ, v batch dims {tuple(q.shape[:-2])}, {tuple(k.shape[:-2])}, {tuple(v.shape[:-2])} differ (matmul broadcasts them)"
    return None


def _mask_reason(mask, qk: Node) -> str | None:
    if not isinstance(mask, Node):
        return f"the scores get the number {mask!r} added, not a mask"
    m, s = mask.meta["val"], qk.meta["val"]
    if m.dtype != s.dtype:
        return f"the additive mask is {m.dtype}, the scores {s.dtype}"
    if m.dim() > s.dim() or not all(statically_known_true(a == 1) or _known_equal(a, b)
                                     for a, b in zip(reversed(m.shape), reversed(s.shape))):
        return f"mask shape {tuple(m.shape)} does not broadcast to the scores' (B, H, Lq, Lk) {tuple(s.shape)}"
    return None


def _fold_query_scale(query: Node, qk: Node, scale: float) -> tuple[Node, float]:
    """q · s @ kᵀ is (q @ kᵀ) · s: move a scale on q into SDPA's scale."""
    factor = _scalar_factor(query)
    if factor is not None and len(_users(query)) == 1:
        return query.args[0], scale * factor
    return query, scale


def _scalar_factor(node) -> float | None:
    if not isinstance(node, Node) or len(node.args) != 2 or not isinstance(node.args[0], Node):
        return None
    operand = node.args[1]
    if not isinstance(operand, numbers.Real) or isinstance(operand, bool) or node.kwargs:
        return None
    if is_call(node, *MULS):
        return float(operand)
    if is_call(node, *DIVS) and operand != 0:
        return 1.0 / float(operand)
    return None


def _reaches_matmul(node) -> bool:
    while _scalar_factor(node) is not None:
        node = node.args[0]
    return is_call(node, aten.matmul.default)


def _constant_value(gm: GraphModule, node: Node) -> torch.Tensor | None:
    """`node`'s value when it depends only on stored tensors (a mask built from aranges)."""
    needed, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in needed:
            continue
        needed.add(current)
        if len(needed) > MAX_MASK_NODES:
            return None
        if current.op == "get_attr":
            continue
        target = current.target
        if current.op != "call_function" or not isinstance(target, torch._ops.OpOverload) \
                or torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
            return None
        stack.extend(current.all_input_nodes)
    values: dict[Node, object] = {}
    for current in gm.graph.nodes:  # graph order is a topological order
        if current not in needed:
            continue
        if current.op == "get_attr":
            values[current] = attr_value(gm, current)
            continue
        args, kwargs = torch.fx.node.map_arg((current.args, current.kwargs), values.__getitem__)
        try:
            with torch.no_grad():
                values[current] = current.target(*args, **kwargs)
        except Exception:  # an op that cannot run here just leaves the mask unproven
            return None
    value = values[node]
    return value if isinstance(value, torch.Tensor) else None


def _is_causal_mask(value: torch.Tensor, lq, lk) -> bool:
    """True when `value`, added to the scores, is exactly SDPA's is_causal (top-left tril)."""
    if not value.is_floating_point() or not isinstance(lq, int) or not isinstance(lk, int) or value.dim() < 2:
        return False
    try:
        full = torch.broadcast_to(value, (*value.shape[:-2], lq, lk))
    except RuntimeError:
        return False
    keep = torch.ones(lq, lk, dtype=torch.bool).tril()
    zero = full == 0
    # every row keeps its first key, so a blocked entry this negative contributes exactly 0
    blocked = full <= torch.finfo(full.dtype).min / 2
    return bool((zero == keep).all() and (zero | blocked).all())


def _rewrite(gm: GraphModule, att: _Attention) -> None:
    out = att.output
    rank = att.query.meta["val"].dim()
    with gm.graph.inserting_before(out):
        key = _untransposed(att.key_t, rank) or call(gm, aten.transpose.int, (att.key_t, -2, -1), meta_from=att.key_t)
        q, k, v = att.query, key, att.value
        for _ in range(4 - rank):  # SDPA kernels and exporters take (B, H, L, E)
            q, k, v = (call(gm, aten.unsqueeze.default, (t, 0), meta_from=t) for t in (q, k, v))
        result = call(gm, aten.scaled_dot_product_attention.default, (q, k, v, att.mask, 0.0, att.is_causal),
                      {"scale": att.scale}, meta_from=out)
        for _ in range(4 - rank):
            result = call(gm, aten.squeeze.dim, (result, 0), meta_from=out)
    out.replace_all_uses_with(result)
    gm.graph.erase_node(out)
    # erased here, not left to dead-code removal: dropout counts as impure and shape asserts
    # are users, so either would keep the dead chain alive
    for node in reversed(att.interior):
        for user in list(node.users):
            if is_call(user, *ASSERTS):
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)


def _untransposed(key_t: Node, rank: int) -> Node | None:
    if is_call(key_t, aten.transpose.int) and {d % rank for d in key_t.args[1:3]} == {rank - 2, rank - 1}:
        return key_t.args[0]
    return None


def _users(node: Node) -> list[Node]:
    return [u for u in node.users if not is_call(u, *ASSERTS)]


def _names(users: list[Node], inside: Node | None) -> str:
    named = [("the model's output" if u.op == "output" else u.name) for u in users if u is not inside]
    return ", ".join(named) or "nothing"


def _same_type(node: Node, source: Node) -> bool:
    a, b = node.meta.get("val"), source.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device


def _known_equal(a, b) -> bool:
    return statically_known_true(a == b)
