"""Record GEMM/convolution + activation pairs (epilogue groups) and put each in the form the
backends fuse.

    linear(x, W, b) → relu          counted as linear_relu (likewise conv_relu, linear_gelu, ...)

A pair is counted when the activation is the producer's only user, so a backend can apply it
while the GEMM's or convolution's output is still in registers. Counted after fold_batchnorm,
so conv → BatchNorm → activation shows up as conv_<activation>.

One rewrite: ONNX Runtime fuses Gemm + Relu or Sigmoid into FusedGemm (not Clip, GELU, SiLU), but
a linear over a rank-3 input exports as MatMul + Add, which ORT turns into
Reshape → Gemm → Reshape with the activation after the second Reshape, out of the fusion's
reach. Flattening the input here puts the activation before the reshape:

    act(linear(x[..., K]))   becomes   view(act(linear(view(x, [-1, K]))), [..., N])

Views cost nothing on any backend and Inductor fuses the activation either way. Other
activations are left rank-3: ORT's BiasGelu fuses the bias add with an erf GELU only when the
add stays separate from the GEMM, which the rank-3 form keeps.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from kiln.fx_helpers import is_call
from kiln.passes._match import number, users, val
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult

aten = torch.ops.aten
LINEARS = (aten.linear.default,)
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
SIMPLE_ACTIVATIONS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.hardswish.default: "hardswish",
                      aten.relu6.default: "relu6", aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh",
                      aten.hardsigmoid.default: "hardsigmoid"}
GEMM_FUSED = frozenset({"relu", "sigmoid"})  # measured: ORT fuses these into FusedGemm, not Clip (relu6)


def group_epilogues(gm: GraphModule, ctx: PassContext) -> PassResult:
    counts: dict[str, int] = {}
    flattened = 0
    for node in list(gm.graph.nodes):
        if (name := _activation(node)) is None or not isinstance(node.args[0], Node):
            continue
        producer = node.args[0]
        kind = "linear" if is_call(producer, *LINEARS) else "conv" if is_call(producer, *CONVS) else None
        if kind is None or len(users(producer)) != 1:
            continue
        counts[f"{kind}_{name}"] = counts.get(f"{kind}_{name}", 0) + 1
        if kind == "linear" and name in GEMM_FUSED and _flatten_for_gemm(gm, producer, node):
            flattened += 1
    counts["flattened_for_gemm_epilogue"] = flattened
    return PassResult(changed=flattened > 0, counts=counts)


def _activation(node: Node) -> str | None:
    if node.op != "call_function":
        return None
    if node.target in SIMPLE_ACTIVATIONS:
        return SIMPLE_ACTIVATIONS[node.target]
    if node.target is aten.gelu.default:
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if node.target is aten.hardtanh.default:
        low, high = [number(a) for a in [*node.args[1:], -1.0, 1.0][:2]]
        return "relu6" if low == 0.0 and high == 6.0 else None
    return None


def _flatten_for_gemm(gm: GraphModule, linear: Node, act: Node) -> bool:
    x = linear.args[0]
    has_bias = len(linear.args) > 2 and linear.args[2] is not None
    x_val, out_val = val(x), val(act)
    if not has_bias or x_val is None or out_val is None or x_val.dim() <= 2:
        return False  # without a bias ORT forms no Gemm; rank 2 is already a plain Gemm
    if not (isinstance(x_val.shape[-1], int) and isinstance(out_val.shape[-1], int)):
        return False
    graph = gm.graph
    with graph.inserting_before(linear):
        lead = [_size(graph, x, d) for d in range(x_val.dim() - 1)]
        rows = math.prod(x_val.shape[:-1])
        flat_x = graph.call_function(aten.view.default, (x, [-1, x_val.shape[-1]]))
        flat_x.meta["val"] = x_val.reshape(-1, x_val.shape[-1])
    with graph.inserting_after(act):
        restored = graph.call_function(aten.view.default, (act, [*lead, out_val.shape[-1]]))
        restored.meta["val"] = out_val
    act.replace_all_uses_with(restored)
    restored.args = (act, restored.args[1])
    linear.args = (flat_x, *linear.args[1:])
    linear.meta["val"] = val(linear).reshape(rows, -1)
    act.meta["val"] = out_val.reshape(rows, -1)
    for node in (linear, act):
        node.meta.pop("tensor_meta", None)  # stale shape; "val" is the one kiln keeps
    return True


def _size(graph, x: Node, dim: int):
    """dim's size: the number when static, else a sym_size node (dynamic batch and sequence)."""
    size = val(x).shape[dim]
    if isinstance(size, int):
        return size
    node = graph.call_function(aten.sym_size.int, (x, dim))
    node.meta["val"] = size
    return node
