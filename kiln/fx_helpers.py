"""torch.fx helpers shared by passes, precision lowering and backends: constants held by the
module, node construction with shape meta, module paths and source lines of nodes."""

from __future__ import annotations

import difflib

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


def meta_value(target, args: tuple, kwargs: dict | None = None):
    """What `target(*args, **kwargs)` would return, computed on the args' shape meta ("val").

    Runs the op under the graph's FakeTensorMode (symbolic sizes stay symbolic); constants a pass
    registered carry real tensors as "val" and are converted. Without a fake mode, meta tensors."""
    import torch.utils._pytree as pytree
    from torch._guards import detect_fake_mode

    vals = pytree.tree_map_only(Node, lambda n: n.meta["val"], (args, kwargs or {}))
    tensors = [v for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    fake_mode = detect_fake_mode(tensors)
    if fake_mode is None:
        vals = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), vals)
        return target(*vals[0], **vals[1])
    from torch._subclasses.fake_tensor import FakeTensor

    vals = pytree.tree_map_only(torch.Tensor, lambda t: t if isinstance(t, FakeTensor) else fake_mode.from_tensor(t), vals)
    with fake_mode:
        return target(*vals[0], **vals[1])


def call(gm: GraphModule, target, args: tuple, kwargs: dict | None = None, meta_from: Node | None = None) -> Node:
    """Insert `target(*args, **kwargs)` at the graph's insertion point with its "val" meta,
    copying the rest of `meta_from`'s meta (source line, module stack) when given."""
    node = gm.graph.call_function(target, args, kwargs or {})
    if meta_from is not None:
        node.meta.update({k: v for k, v in meta_from.meta.items() if k not in ("val", "tensor_meta")})
    node.meta["val"] = meta_value(target, args, kwargs)
    return node


def module_paths(node: Node) -> list[str]:
    """Module paths of `node`, outermost first, without capture's wrapper prefix."""
    paths = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = path[len("model."):] if path.startswith("model.") else ("" if path == "model" else path)
        if path:
            paths.append(path)
    return paths


def in_module(node: Node, key: str) -> bool:
    """Whether `key` names `node` or a module that holds it (a path prefix at a dot)."""
    return node.name == key or any(p == key or p.startswith(key + ".") for p in module_paths(node))


def module_hint(nodes, key: str) -> str:
    """What a user who named `key` for no node could name instead: the closest module path or
    node name, and the top-level modules (sorted paths alone would list only the first blocks)."""
    paths = sorted({p for n in nodes for p in module_paths(n)})
    close = difflib.get_close_matches(key, paths + [n.name for n in nodes], n=1, cutoff=0.6)
    top = sorted({p.split(".")[0] for p in paths})
    guess = f"did you mean {close[0]!r}? " if close else ""
    return (f"{guess}name a module path (or a prefix of one at a dot) or a node name; "
            f"top-level modules: {', '.join(top[:20]) or 'none'}")
