"""Remove nodes whose results nobody uses.

Export keeps some dead values (unused weights such as BatchNorm's num_batches_tracked,
shape computations whose users were folded). Fewer nodes means smaller exported engines and
less for later passes to walk. Impure nodes (asserts, in-place updates) stay.
"""

from __future__ import annotations

from torch.fx import GraphModule

from kiln.passes.context import PassContext
from kiln.passes.result import PassResult


def remove_dead_code(gm: GraphModule, ctx: PassContext) -> PassResult:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    # get_attr nodes count as pure, so the call above drops unused weights' reads; the
    # tensors themselves are dropped here so engines and artifacts do not carry them.
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed_attrs = 0
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner_path) if owner_path else gm, attr)
            removed_attrs += 1
    removed = before - len(gm.graph.nodes)
    return PassResult(changed=removed > 0 or removed_attrs > 0, counts={"removed": removed, "constants_dropped": removed_attrs})
