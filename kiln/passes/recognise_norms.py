"""Replace hand-written LayerNorm and RMSNorm by aten.layer_norm and aten.rms_norm.

    c = x − mean(x, D);  c / sqrt(mean(c², D) + ε) · w + b      becomes   layer_norm(x, shape(D), w, b, ε)
    (also var(x, D, correction=0), rsqrt, 1/sqrt, with or without w and b)
    x · rsqrt(mean(x², D) + ε) · w                              becomes   rms_norm(x, shape(D), w, ε)
    (also LLaMA/T5's x.to(float32) ... .to(dtype) · w)

D must be the trailing dims. Written out, a norm is six to nine passes over the activation;
as one op ONNX Runtime runs its (Skip/Simplified)LayerNormalization kernels and Inductor one
reduction kernel. The ONNX exporter (opset 20) has no RMSNormalization: it decomposes rms_norm
back to elementwise ops, which onnxscript's ORT rules then fuse into SimplifiedLayerNormalization.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from kiln.fx_helpers import is_call
from kiln.passes._match import (cast_input, erased, number, replace, same_value, strip_casts, tensor_pairs,
                                trailing, users, val, with_number)
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
VARIANCES = (aten.var.correction, aten.var.dim)
VAR_MEANS = (aten.var_mean.correction, aten.var_mean.dim)
EPS_OUTSIDE = "ε is added after the square root; a norm adds it to the variance inside it"


def recognise_norms(gm: GraphModule, ctx: PassContext) -> PassResult:
    counts = {"layer_norm": 0, "rms_norm": 0}
    skipped: list[Skip] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or erased(node) or (split := _split(node)) is None:
            continue
        numerator, radicand, eps_outside = split
        if eps_outside:
            reason = EPS_OUTSIDE if _statistic_of(radicand, numerator) else None
        else:
            reason = _layer_norm(gm, node, numerator, radicand) if _centred(numerator) else \
                _rms_norm(gm, node, numerator, radicand)
        if reason in counts:
            counts[reason] += 1
        elif reason is not None:
            skipped.append(Skip(node.name, reason))
    return PassResult(changed=sum(counts.values()) > 0, counts=counts, skipped=tuple(skipped))


def _split(node: Node) -> tuple[Node, Node, bool] | None:
    """(numerator, radicand, ε outside) of numerator · rsqrt(radicand) and its spellings, or of
    numerator / (sqrt(radicand) + ε)."""
    if is_call(node, aten.div.Tensor) and isinstance(node.args[1], Node) and not node.kwargs:
        numerator, denominator = node.args
        if is_call(denominator, aten.sqrt.default):
            return numerator, denominator.args[0], False
        if (outside := with_number(denominator, aten.add.Tensor)) and is_call(outside[0], aten.sqrt.default):
            return numerator, outside[0].args[0], True
        return None
    for numerator, factor in tensor_pairs(node, aten.mul.Tensor):
        if (radicand := _inverse_sqrt(factor)) is not None:
            return numerator, radicand, False
    return None


def _inverse_sqrt(node: Node) -> Node | None:
    """r for rsqrt(r), 1/sqrt(r) (reciprocal, times 1) and r ** -0.5."""
    if (unit := with_number(node, aten.mul.Tensor)) is not None and unit[1] == 1.0:
        node = unit[0]
    if is_call(node, aten.rsqrt.default):
        return node.args[0]
    if is_call(node, aten.reciprocal.default) and is_call(node.args[0], aten.sqrt.default):
        return node.args[0].args[0]
    if (power := with_number(node, aten.pow.Tensor_Scalar)) is not None and power[1] == -0.5:
        return power[0]
    return None


def _centred(node: Node) -> Node | None:
    """x for x − mean(x, dims, keepdim=True)."""
    if not is_call(node, aten.sub.Tensor) or node.kwargs or not isinstance(node.args[1], Node):
        return None
    x, mean = node.args
    if is_call(mean, aten.mean.dim) and same_value(mean.args[0], x):
        return x
    return None


def _statistic_of(stat, numerator: Node) -> bool:
    """Whether `stat` is a variance or mean square of `numerator` (a norm attempt at all)."""
    stat = _variance(stat)
    return _mean_square(stat, numerator) is not None or (
        is_call(stat, *VARIANCES, *VAR_MEANS) and _centred(numerator) is not None
        and same_value(stat.args[0], _centred(numerator)))


def _variance(stat: Node) -> Node:
    """var_mean(...) for getitem(var_mean(...), 0); `stat` itself otherwise."""
    if is_call(stat, operator.getitem) and stat.args[1] == 0 and is_call(stat.args[0], *VAR_MEANS):
        return stat.args[0]
    return stat


def _eps(radicand: Node) -> tuple[Node, float]:
    """(statistic, ε) of statistic + ε; ε = 0 when nothing is added."""
    added = with_number(radicand, aten.add.Tensor)
    return added if added is not None else (radicand, 0.0)


def _mean_square(stat, tensor: Node) -> tuple[list, bool] | None:
    """(dims, keepdim) of mean(t², dims) or mean(t·t, dims) with t the same value as `tensor`
    (up to value-preserving casts)."""
    if not is_call(stat, aten.mean.dim) or len(stat.args) < 2 or stat.kwargs.get("dtype") is not None:
        return None
    square = stat.args[0]
    base = None
    if (power := with_number(square, aten.pow.Tensor_Scalar)) is not None and power[1] == 2.0:
        base = power[0]
    elif is_call(square, aten.mul.Tensor) and same_value(square.args[0], square.args[1]):
        base = square.args[0]
    if base is None or not (same_value(base, tensor) or strip_casts(base) is strip_casts(tensor)):
        return None
    return list(stat.args[1]), bool(stat.args[2]) if len(stat.args) > 2 else False


def _trailing_shape(x: Node, dims, keepdim: bool) -> tuple[list[int] | None, str | None]:
    """(normalized_shape, None) or (None, reason)."""
    value = val(x)
    if value is None:
        return None, f"{x.name} has no shape information"
    if not keepdim:
        return None, "the statistic drops the reduced dims (keepdim=False), so it does not broadcast like a norm"
    count = trailing(dims, value.dim())
    if count is None:
        return None, (f"normalises over dims {list(dims)} of a rank-{value.dim()} tensor; "
                      f"layer_norm and rms_norm normalise trailing dims only")
    shape = list(value.shape[value.dim() - count:])
    if not all(isinstance(s, int) for s in shape):
        return None, f"the normalised dims {shape} have dynamic sizes"
    return shape, None


def _layer_norm(gm: GraphModule, node: Node, centred: Node, radicand: Node) -> str | None:
    x = _centred(centred)
    if val(x) is None:
        return f"{x.name} has no shape information"
    mean_dims = list(centred.args[1].args[1])
    keepdim = len(centred.args[1].args) > 2 and bool(centred.args[1].args[2])
    stat, eps = _eps(radicand)
    stat = _variance(stat)
    if (square := _mean_square(stat, centred)) is not None:
        var_dims = square[0]
    elif is_call(stat, *VARIANCES, *VAR_MEANS) and same_value(stat.args[0], x):
        if (reason := _unbiased(stat)) is not None:
            return reason
        var_dims = list(stat.args[1])
    else:
        return "x − mean(x) is divided by something other than sqrt(variance + ε) of x"
    if sorted(d % val(x).dim() for d in var_dims) != sorted(d % val(x).dim() for d in mean_dims):
        return f"mean over dims {mean_dims} but variance over dims {var_dims}"
    shape, reason = _trailing_shape(x, mean_dims, keepdim)
    if reason is not None:
        return reason
    out, weight, bias = _affine(node, shape, (aten.mul.Tensor, aten.add.Tensor))
    replace(gm, out, aten.layer_norm.default, (x, shape, weight, bias, eps))
    return "layer_norm"


def _unbiased(var: Node) -> str | None:
    if len(var.args) < 2 or var.args[1] is None:
        return "the variance is taken over all dims"
    if var.target in (aten.var.dim, aten.var_mean.dim):
        unbiased = var.args[2] if len(var.args) > 2 else True
        correction = 1 if unbiased else 0
    else:
        correction = var.kwargs.get("correction", 1)
        correction = 1 if correction is None else correction
    if number(correction) != 0.0:
        return f"the variance is unbiased (correction={correction}); layer_norm uses the biased variance"
    keepdim = var.kwargs.get("keepdim", var.args[3] if len(var.args) > 3 else False)
    return None if keepdim else "the variance drops the reduced dims (keepdim=False)"


def _rms_norm(gm: GraphModule, node: Node, numerator: Node, radicand: Node) -> str | None:
    stat, eps = _eps(radicand)
    square = _mean_square(stat, numerator)
    if square is None:
        return None  # x·rsqrt(something else): attention scales and the like, not a norm
    # the squared tensor (in T5's form the float32 copy of the numerator), past identity casts
    x = strip_casts(stat.args[0].args[0], widening=False)
    if val(x) is None or val(node) is None or val(node).dtype != val(x).dtype:
        return f"the normalised tensor ({val(node).dtype}) and its squares ({val(x).dtype}) differ in dtype"
    shape, reason = _trailing_shape(x, *square)
    if reason is not None:
        return reason
    out, weight, _ = _affine(node, shape, (aten.mul.Tensor,))
    replace(gm, out, aten.rms_norm.default, (x, shape, weight, eps))
    return "rms_norm"


def _affine(node: Node, shape: list[int], steps: tuple) -> tuple[Node, Node | None, Node | None]:
    """(last node, weight, bias) of node·w + b after the norm, where w and b have the normalised
    shape and the norm's dtype; identity casts in between (LLaMA's .to(input dtype)) are skipped."""
    dtype = val(node).dtype
    out, found = node, {}
    for step in steps:
        nxt = _only_user_through_identity_casts(out)
        if nxt is None:
            break
        param = next((p for o, p in tensor_pairs(nxt, step) if strip_casts(o, widening=False) is out), None)
        if param is None or val(param) is None or list(val(param).shape) != shape or val(param).dtype != dtype:
            continue  # a missing weight does not rule out a bias
        found[step] = param
        out = nxt
    return out, found.get(aten.mul.Tensor), found.get(aten.add.Tensor)


def _only_user_through_identity_casts(node: Node) -> Node | None:
    while True:
        following = users(node)
        if len(following) != 1:
            return None
        nxt = following[0]
        if cast_input(nxt) is node and val(nxt) is not None and val(nxt).dtype == val(node).dtype:
            node = nxt
            continue
        return nxt
