"""Fold subgraphs that depend only on weights and constants into precomputed tensors.

    w2 = transpose(w) * 0.5 ; y = x @ w2    becomes   y = x @ C,  C computed once here

Work that runs on every call but never changes (weight transposes, casts, position-id tables,
scale products) moves to compile time. Results much larger than their inputs (expand, repeat)
stay unfolded past a few MiB: storing them would cost more memory than recomputing them.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from kiln.fx_helpers import add_constant, attr_value
from kiln.passes._aliases import returns_alias, written_inputs
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip

GROWTH_LIMIT = 4  # a folded tensor may be at most this many times the bytes of its inputs ...
SMALL_BYTES = 4 * 1024 * 1024  # ... or this size, whichever is larger (position tables fit)


def fold_constants(gm: GraphModule, ctx: PassContext) -> PassResult:
    values: dict[Node, torch.Tensor | object] = {}
    foldable: list[Node] = []
    skipped: list[Skip] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = attr_value(gm, node)
            if value is not None:
                values[node] = value
        elif node.op == "call_function" and _pure(node) and _inputs_known(node, values):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            try:
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
            except Exception as exc:  # an op that cannot run eagerly here simply stays in the graph
                skipped.append(Skip(node.name, f"evaluating it failed: {type(exc).__name__}"))
                continue
            foldable.append(node)
    folded = 0
    written = _written_in_place(gm)
    for node in foldable:
        value = values[node]
        if not isinstance(value, torch.Tensor) or node.op != "call_function":
            continue  # tuples and Python scalars are folded through their tensor users
        if all(user in values for user in node.users):
            continue  # only boundary nodes (used by non-constant code) become stored constants
        if node in written:
            # a stored constant written in place would carry each call's write into the next
            skipped.append(Skip(node.name, f"written in place later by {written[node].name}"))
            continue
        # storage, not numel: an expanded view of a small weight holds only the weight's bytes
        source_bytes = sum(values[n].untyped_storage().nbytes() for n in node.all_input_nodes
                           if isinstance(values.get(n), torch.Tensor))
        size = value.numel() * value.element_size()
        if size > max(SMALL_BYTES, GROWTH_LIMIT * source_bytes):
            skipped.append(Skip(node.name, f"folding would store {size} bytes from {source_bytes} bytes of inputs"))
            continue
        const = add_constant(gm, node, value, "const")
        node.replace_all_uses_with(const)
        folded += 1
    return PassResult(changed=folded > 0, counts={"folded": folded}, skipped=tuple(skipped))


def _written_in_place(gm: GraphModule) -> dict[Node, Node]:
    """Every node whose memory an in-place op writes (through any chain of views) -> that op."""
    written: dict[Node, Node] = {}
    for node in gm.graph.nodes:
        for target in written_inputs(node):
            while True:
                written.setdefault(target, node)
                if not (returns_alias(target) and isinstance(target.args[0], Node)):
                    break
                target = target.args[0]
    return written


def _pure(node: Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    # random ops differ per call; in-place and view-of-mutable ops must keep running
    if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
        return False
    return True


def _inputs_known(node: Node, values: dict) -> bool:
    return all(n in values for n in node.all_input_nodes)

