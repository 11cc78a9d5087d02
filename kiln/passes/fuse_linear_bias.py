"""Turn matmuls with a stored weight, and their bias adds, into aten.linear.

    matmul(x, Wᵀ) + b                                   becomes   linear(x, W, b)
    view(addmm(b, view(x, [-1, K]), W), [..., N])       becomes   linear(x, Wᵀ, b)     (GPT-2's Conv1D)

W is a stored weight; where the graph holds it as [K, N] (fold_constants already turned
W.t() into a constant, and Conv1D keeps it that way), the [N, K] copy is made here once and
the [K, N] one is then dropped. A backend sees one GEMM with a bias epilogue instead of a
GEMM, a broadcast add and views: ONNX Runtime and Inductor fuse the bias (and the activation
after it) into the GEMM, and the ONNX fusion rules that look for MatMul+Add find them.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.fx_helpers import add_constant, attr_value, call, is_call
from kiln.passes._match import erased, replace, users, val
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
MATMULS = (aten.matmul.default, aten.mm.default)
TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default)


def fuse_linear_bias(gm: GraphModule, ctx: PassContext) -> PassResult:
    counts = {"linear": 0, "with_bias": 0}
    skipped: list[Skip] = []
    for node in list(gm.graph.nodes):
        if erased(node) or not is_call(node, *MATMULS, aten.addmm.default):
            continue
        weight, reason = _weight(gm, node)
        if reason is not None:
            skipped.append(Skip(node.name, reason))
            continue
        if weight is None:
            continue  # activation @ activation (attention scores): no stored weight to fold
        if node.target is aten.addmm.default:
            bias, x, out, leading = _addmm_parts(node, weight)
            if bias is None:
                skipped.append(Skip(node.name, "addmm's bias does not have the output's feature shape, or beta/alpha ≠ 1"))
                continue
            if leading is not None:  # x's rows were regrouped on the way in: reshape to the output's rows
                with gm.graph.inserting_before(out):
                    x = call(gm, aten.reshape.default, (x, [*leading, val(weight).shape[0]]), meta_from=node.args[1])
        else:
            x, (bias, out) = node.args[0], _bias_after(node, weight)
        replace(gm, out, aten.linear.default, (x, _stored_nk(gm, node, weight), bias))
        counts["linear"] += 1
        counts["with_bias"] += bias is not None
    return PassResult(changed=counts["linear"] > 0, counts=counts, skipped=tuple(skipped))


def _weight(gm: GraphModule, node: Node) -> tuple[Node | None, str | None]:
    """The [K, N] right operand when it is stored (or a transpose of a stored [N, K])."""
    right = node.args[2] if node.target is aten.addmm.default else node.args[1]
    value = val(right)
    if value is None or value.dim() != 2:
        return None, None
    if _transposed_attr(gm, right) is None and attr_value(gm, right) is None:
        return None, None
    left = node.args[1] if node.target is aten.addmm.default else node.args[0]
    if val(left) is None or val(left).dim() < 1 or val(left).dtype != value.dtype:
        return None, None
    others = [u.name for u in users(right) if u is not node]
    if others and _transposed_attr(gm, right) is None:
        return None, f"the weight is also used by {', '.join(others)}; a transposed copy would double its memory"
    return right, None


def _transposed_attr(gm: GraphModule, node: Node) -> Node | None:
    """W for t(W), W.transpose(0, 1) or W.permute(1, 0) with W a stored 2-d tensor."""
    if not is_call(node, *TRANSPOSES) or attr_value(gm, node.args[0]) is None or attr_value(gm, node.args[0]).dim() != 2:
        return None
    if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
        return None
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    return node.args[0]


def _stored_nk(gm: GraphModule, anchor: Node, weight: Node) -> Node:
    """linear's [N, K] weight: the stored tensor under a transpose, or a transposed copy."""
    if (source := _transposed_attr(gm, weight)) is not None:
        return source
    with torch.no_grad():
        return add_constant(gm, anchor, attr_value(gm, weight).t().contiguous(), "linear_weight")


def _bias_after(node: Node, weight: Node) -> tuple[Node | None, Node]:
    """(b, add node) for matmul(x, W) + b with b of shape [N]; (None, matmul) otherwise."""
    following = users(node)
    if len(following) != 1 or not is_call(following[0], aten.add.Tensor) or following[0].kwargs:
        return None, node
    add = following[0]
    bias = add.args[1] if add.args[0] is node else add.args[0]
    if _is_feature_vector(bias, weight) and val(add) is not None and tuple(val(add).shape) == tuple(val(node).shape):
        return bias, add
    return None, node


def _is_feature_vector(bias, weight: Node) -> bool:
    value, w = val(bias), val(weight)
    return value is not None and value.dim() == 1 and value.shape[0] == w.shape[1] and value.dtype == w.dtype


def _addmm_parts(node: Node, weight: Node) -> tuple[Node | None, Node, Node, list | None]:
    """(bias, linear input, node to replace, leading dims to reshape the input to): the input
    before a flattening view and the view that restores the leading dims, when both are there.
    When the flattened input had other leading dims than the output (attention's heads merged
    by the same reshape: GPT-2's c_proj), the input is reshaped to the output's leading dims,
    so the GEMM still sees rows of the model's rank rather than a 2-d view between reshapes."""
    bias, left = node.args[0], node.args[1]
    if node.kwargs or not _is_feature_vector(bias, weight):
        return None, left, node, None
    following = users(node)
    if not (is_call(left, aten.view.default, aten.reshape.default, aten._unsafe_view.default) and len(users(left)) == 1
            and len(following) == 1 and is_call(following[0], aten.view.default, aten.reshape.default)):
        return bias, left, node, None
    x, restored = left.args[0], following[0]
    if val(x) is None or val(restored) is None or val(x).dim() < 2:
        return bias, left, node, None
    want = (*val(x).shape[:-1], val(weight).shape[1])
    got = tuple(val(restored).shape)
    if len(got) == len(want) and val(x).shape[-1] == val(weight).shape[0] \
            and all(statically_known_true(a == b) for a, b in zip(got, want)):
        return bias, x, restored, None
    if len(got) >= 2 and statically_known_true(got[-1] == val(weight).shape[1]) \
            and all(isinstance(d, int) for d in got[:-1]):  # static sizes only: a symbolic one would need its node
        return bias, x, restored, list(got[:-1])
    return bias, left, node, None
