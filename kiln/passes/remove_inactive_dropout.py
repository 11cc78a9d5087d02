"""Remove dropout that is inactive at inference.

    y = dropout(x, p, train=False)   becomes   y = x

Export keeps eval-mode dropout as a node (MiniLM holds 13). It computes the identity, but an
exporter may still emit a copy for it; removing it lets neighbours fuse.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from kiln.fx_helpers import is_call
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

aten = torch.ops.aten


def remove_inactive_dropout(gm: GraphModule, ctx: PassContext) -> PassResult:
    removed, skipped = 0, []
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.dropout.default):
            continue
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if train is not False:
            # active dropout changes values at random; an inference engine must not drop it silently
            skipped.append(Skip(node.name, "dropout is active (train=True)"))
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        removed += 1
    return PassResult(changed=removed > 0, counts={"removed": removed}, skipped=tuple(skipped))
