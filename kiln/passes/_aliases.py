"""Which nodes share memory, and which are written in place.

Captured graphs are not functionalised: `x.clone().add_(1)` stays an in-place add on the
clone. Passes that drop a copy or merge two computations must know which values an in-place
op writes, through any chain of views of them, and keep those.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node


def returns_alias(node: Node) -> bool:
    """True when `node`'s result shares memory with its first input (views, in-place ops)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:  # an element of split/chunk's list of views
        return isinstance(node.args[0], Node) and returns_alias(node.args[0])
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    # reshape, contiguous, to and eval-mode dropout may return their input itself
    return (any(ret.alias_info is not None for ret in node.target._schema.returns)
            or torch.Tag.maybe_aliasing_or_mutating in node.target.tags)


def is_mutating(node: Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.is_mutable)


def written_inputs(node: Node) -> list[Node]:
    """The nodes a mutating op writes in place (its `Tensor(a!)` arguments)."""
    if not is_mutating(node):
        return []
    schema = node.target._schema
    written = []
    for index, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(arg.name)
        written.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, Node))
    return written


def root(node: Node) -> Node:
    """The node whose memory `node` views (itself when it is not a view)."""
    while returns_alias(node) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def family(node: Node) -> set[Node]:
    """`node` and every view of it, transitively."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen and returns_alias(user) and user.args and user.args[0] in seen:
                seen.add(user)
                todo.append(user)
    return seen


class Writes:
    """The in-place writes of one graph, for asking whether a value (or a view of it) is written."""

    def __init__(self, gm: GraphModule):
        self.writer: dict[Node, Node] = {}
        for node in gm.graph.nodes:
            for target in written_inputs(node):
                self.writer.setdefault(target, node)

    def __bool__(self) -> bool:
        return bool(self.writer)

    def writer_of(self, node: Node) -> Node | None:
        """The first op that writes `node`'s memory through `node` or any view of it."""
        if not self.writer:
            return None
        return next((self.writer[n] for n in family(node) if n in self.writer), None)

    def writer_of_memory(self, node: Node) -> Node | None:
        """The first op that writes the memory `node` views, through any alias of it."""
        return self.writer_of(root(node))
