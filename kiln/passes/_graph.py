"""Graph helpers shared by passes: constants held by the module, users, node locations."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node


def attr_value(gm: GraphModule, node: Node) -> torch.Tensor | None:
    """The tensor a get_attr node reads, or None for anything else."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def add_constant(gm: GraphModule, before: Node, value: torch.Tensor, hint: str) -> Node:
    """Register `value` as a buffer of `gm` and return a get_attr node reading it."""
    index = 0
    while hasattr(gm, f"_kiln_{hint}_{index}"):
        index += 1
    name = f"_kiln_{hint}_{index}"
    gm.register_buffer(name, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def source_line(node: Node) -> str | None:
    """The user's source line that produced `node`, from export's stack trace."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File ")]
    return lines[-1] if lines else None


def is_call(node: Node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets
