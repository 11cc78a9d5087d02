"""Give every backend PyTorch's answer for a query whose attention mask hides every key.

    out = sdpa(q, k, v, attn_mask=m)
        becomes
    out = where(any(allowed(m), dim=-1, keepdim=True), sdpa(q, k, v, attn_mask=m), 0)

allowed(m) is m itself for a boolean mask and m > -inf for an additive one. A fully padded
sequence in a batch (an all-zero attention_mask row) masks every key of its queries. PyTorch's
SDPA returns zeros for such a query; OpenVINO returns NaN there and ONNX Runtime the mean of V
(measured on BERT-style models, fp32), both silently. With the guard, every backend computes
the same zeros whatever its softmax does with an all-masked row; where() takes its value from
one branch only, so a NaN in the discarded branch does not leak. The reduction runs once per
mask (the cleanup after this pass merges the copies every layer makes) and costs one pass over
the mask.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node

from kiln.fx_helpers import add_constant, attr_value, call, is_call
from kiln.passes._match import val
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
GUARDED = "kiln_fully_masked_guard"  # node.meta flag: this SDPA's output already goes through the guard


def guard_fully_masked_attention(gm: GraphModule, ctx: PassContext) -> PassResult:
    guarded, skipped = 0, []
    for node in list(gm.graph.nodes):
        if not is_call(node, SDPA) or node.meta.get(GUARDED):
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if not isinstance(mask, Node):
            continue  # no mask (or causal only): every query sees at least one key
        mask_val = val(mask)
        if mask_val is None or mask_val.dim() < 1:
            skipped.append(Skip(node.name, "attention mask without a known shape"))
            continue
        users = list(node.users)
        with gm.graph.inserting_before(node.next):  # in order, right after the attention
            stored = attr_value(gm, mask) if mask.op == "get_attr" else (None if isinstance(mask_val, FakeTensor) else mask_val)
            if stored is None:
                allowed = mask if mask_val.dtype == torch.bool else call(gm, aten.gt.Scalar, (mask, float("-inf")), meta_from=node)
                any_key = call(gm, aten.any.dim, (allowed, -1, True), meta_from=node)
            else:  # a mask stored in the model: its fully masked rows are known now
                rows = (stored if stored.dtype == torch.bool else stored > float("-inf")).any(-1, keepdim=True)
                if bool(rows.all()):
                    skipped.append(Skip(node.name, "the mask is a constant that leaves every query a key"))
                    continue
                any_key = add_constant(gm, node.next, rows, "attention_rows")
            out = call(gm, aten.where.ScalarOther, (any_key, node, 0.0), meta_from=node)
        for user in users:
            user.replace_input_with(node, out)
        node.meta[GUARDED] = True
        guarded += 1
    return PassResult(changed=guarded > 0, counts={"guarded": guarded}, skipped=tuple(skipped))

