"""Fold inference BatchNorm into the convolution or linear layer before it.

    conv(x, W, b) -> batch_norm(γ, β, μ, σ², ε)   becomes   conv(x, W·s, (b − μ)·s + β)
    with s = γ / sqrt(σ² + ε), broadcast over W's output-channel axis (axis 0).

The same holds for linear(x, W, b) followed by BatchNorm1d over the feature axis. One
memory-bound pass over the activation per block disappears, on every backend.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from kiln.fx_helpers import add_constant, attr_value, is_call
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
LINEARS = (aten.linear.default,)
BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


def fold_batchnorm(gm: GraphModule, ctx: PassContext) -> PassResult:
    folded, skipped = 0, []
    for bn in list(gm.graph.nodes):
        if not is_call(bn, *BATCH_NORMS):
            continue
        producer = bn.args[0]
        if not is_call(producer, *CONVS, *LINEARS):
            continue  # BatchNorm on an input or after another op: nothing to fold into
        if (reason := _why_not_foldable(gm, producer, bn)) is not None:
            skipped.append(Skip(bn.name, reason))
            continue
        _fold(gm, producer, bn)
        folded += 1
    return PassResult(changed=folded > 0, counts={"folded": folded}, skipped=tuple(skipped))


def _bn_parts(bn: Node) -> tuple:
    """(weight, bias, mean, var, eps) nodes/values of either BatchNorm overload."""
    if bn.target is aten.batch_norm.default:
        _, w, b, mean, var, training, _momentum, eps, _cudnn = bn.args
        return w, b, mean, var, eps, training
    _, w, b, mean, var, _momentum, eps = bn.args
    return w, b, mean, var, eps, False


def _why_not_foldable(gm: GraphModule, producer: Node, bn: Node) -> str | None:
    w, b, mean, var, _eps, training = _bn_parts(bn)
    if training:
        return "BatchNorm uses batch statistics (training=True)"
    if len(producer.users) != 1:
        # the un-normalised result is needed elsewhere, so both versions would have to exist
        return f"{producer.name}'s output is also used by {', '.join(u.name for u in producer.users if u is not bn)}"
    weight = producer.args[1]
    if attr_value(gm, weight) is None:
        return f"{producer.name}'s weight is computed, not a stored parameter"
    if len(weight.users) != 1:
        return f"{producer.name}'s weight is shared with {', '.join(u.name for u in weight.users if u is not producer)}"
    for part, label in ((mean, "running mean"), (var, "running var")):
        if attr_value(gm, part) is None:
            return f"BatchNorm's {label} is not a stored tensor"
    for part, label in ((w, "weight"), (b, "bias")):
        if part is not None and attr_value(gm, part) is None:
            return f"BatchNorm's {label} is not a stored tensor"
    if producer.target is aten.convolution.default and producer.args[6]:
        return "transposed convolution keeps output channels on weight axis 1"
    if producer.target in LINEARS and producer.meta.get("val") is not None and producer.meta["val"].dim() != 2:
        return "BatchNorm after a linear of rank > 2 normalises a non-feature axis"
    if bn.target is not aten.batch_norm.default and not all(u.target is operator.getitem and u.args[1] == 0 for u in bn.users):
        return "BatchNorm's saved statistics are used"
    return None


def _fold(gm: GraphModule, producer: Node, bn: Node) -> None:
    w_node, b_node, mean_node, var_node, eps, _ = _bn_parts(bn)
    mean, var = attr_value(gm, mean_node), attr_value(gm, var_node)
    gamma = attr_value(gm, w_node) if w_node is not None else torch.ones_like(mean)
    beta = attr_value(gm, b_node) if b_node is not None else torch.zeros_like(mean)
    weight = attr_value(gm, producer.args[1])
    old_bias = producer.args[2] if len(producer.args) > 2 else None
    bias = attr_value(gm, old_bias) if isinstance(old_bias, Node) else None
    bias = bias if bias is not None else torch.zeros_like(mean)
    with torch.no_grad():  # in float64 so the folded weights round once, not three times
        scale = gamma.double() / torch.sqrt(var.double() + eps)
        new_weight = (weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
        new_bias = ((bias.double() - mean.double()) * scale + beta.double()).to(weight.dtype)
    w_const = add_constant(gm, producer, new_weight, "bn_weight")
    b_const = add_constant(gm, producer, new_bias, "bn_bias")
    args = list(producer.args)
    args[1] = w_const
    if len(args) > 2:
        args[2] = b_const
    else:
        args.append(b_const)
    producer.args = tuple(args)
    if bn.target is aten.batch_norm.default:
        bn.replace_all_uses_with(producer)
    else:
        for user in list(bn.users):  # getitem(bn, 0) -> producer
            user.replace_all_uses_with(producer)
            gm.graph.erase_node(user)
    gm.graph.erase_node(bn)
