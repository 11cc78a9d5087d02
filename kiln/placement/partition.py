"""Cut the placed graph into partitions, one per run of nodes on the same (device, backend),
and record each partition's inputs, outputs and example values.

Nodes carry `place_on_devices`' NodeDecision; a node without one goes to the profile's primary
device. Nodes are ordered topologically, preferring to continue with the current partition's
(device, backend) while such a node is ready, so independent branches on one device merge;
each run of that order is a partition. Partitions therefore only read values of earlier
partitions: the quotient graph is acyclic by construction, and `_check_acyclic` verifies it.
Shape arithmetic (SymInt nodes) is copied into every partition that needs it instead of
crossing partitions. Each partition becomes its own GraphModule over named flat tensors.
With one partition the captured graph itself is the partition, as before placement existed.
"""

from __future__ import annotations

import collections

import networkx as nx
import torch
from torch.fx import Graph, GraphModule, Node

from kiln.hardware_profiles.schema import Profile
from kiln.ir import DECISION_META, LAYER_META, Partition, PartitionGraph, PartitionPlan, PrecisionPlan
from kiln.placement import cost_model as cm
from kiln.types import InputSpec, NodeDecision


def partition_graph(gm: GraphModule, profile: Profile, input_spec: InputSpec, output_names: tuple[str, ...],
                    example_inputs: tuple[torch.Tensor, ...], dynamic_shapes: tuple | None,
                    calibration: tuple = (), observer: str = "minmax") -> PartitionPlan:
    for node in gm.graph.nodes:
        if node.op == "call_function" and not _decision(node):
            node.meta[DECISION_META] = NodeDecision(device=profile.primary_device, reasons=(f"primary device of profile {profile.name}",))
    runs = _runs(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = {p: name for p, name in zip(placeholders, input_spec.names)}
    if len(runs) <= 1:
        key = _key(runs[0][0]) if runs and runs[0] else (profile.primary_device, "")
        graph = PartitionGraph("p0", gm, input_spec.names, output_names, example_inputs, dynamic_shapes,
                               _precision_plan(gm.graph.nodes, observer), tuple(calibration))
        partitions = [_partition(graph, key, profile)]
        plan = PartitionPlan(partitions, input_spec.names, output_names)
    else:
        plan = _split(gm, runs, names, profile, input_spec, output_names, example_inputs, dynamic_shapes,
                      tuple(calibration), observer)
    _estimate(gm, plan, profile, names)
    return plan


def _precision_plan(nodes, observer: str) -> PrecisionPlan:
    """The layers assign_precision planned among `nodes` (none when it did not run)."""
    return PrecisionPlan([n.meta[LAYER_META] for n in nodes if LAYER_META in n.meta], observer)


def _decision(node: Node) -> NodeDecision | None:
    decision = node.meta.get(DECISION_META)
    return decision if isinstance(decision, NodeDecision) and decision.device else None


def _key(node: Node) -> tuple[str, str]:
    decision = _decision(node)
    return decision.device, decision.backend or ""


def _replicable(node: Node) -> bool:
    """Shape arithmetic: recomputed in each partition rather than passed between them."""
    return node.op == "call_function" and isinstance(node.meta.get("val"), (torch.SymInt, int, float, bool))


def _runs(gm: GraphModule) -> list[list[Node]]:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and not _replicable(n)]
    members = set(nodes)
    deps = {n: _grouped_inputs(n, members) for n in nodes}
    users = collections.defaultdict(list)
    for node, inputs in deps.items():
        for dep in inputs:
            users[dep].append(node)
    waiting = {n: len(deps[n]) for n in nodes}
    order = {n: i for i, n in enumerate(nodes)}
    ready = [n for n in nodes if waiting[n] == 0]
    runs: list[list[Node]] = []
    current = None
    while ready:
        same = [n for n in ready if _key(n) == current]
        node = min(same or ready, key=order.get)
        ready.remove(node)
        if _key(node) != current or not runs:
            runs.append([])
            current = _key(node)
        runs[-1].append(node)
        for user in users[node]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    return runs


def _grouped_inputs(node: Node, members: set) -> set[Node]:
    """Partitioned nodes `node` reads, looking through shape arithmetic."""
    found, stack = set(), list(node.all_input_nodes)
    while stack:
        arg = stack.pop()
        if arg in members:
            found.add(arg)
        elif _replicable(arg):
            stack.extend(arg.all_input_nodes)
    return found


def _partition(graph: PartitionGraph, key: tuple[str, str], profile: Profile) -> Partition:
    device, backend = key
    return Partition(graph, device, placed_backend=backend, device_kind=profile.devices[device].kind.value)


def _split(gm, runs, names, profile, input_spec, output_names, example_inputs, dynamic_shapes,
           calibration: tuple, observer: str) -> PartitionPlan:
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    graph_outputs = list(output_node.args[0]) if isinstance(output_node.args[0], (tuple, list)) else [output_node.args[0]]
    value_name = lambda node: names.get(node, node.name)  # noqa: E731
    built = [_extract(run, value_name) for run in runs]
    needed = {n for _, inputs, _ in built for n in inputs} | set(graph_outputs)
    symbols = _symbol_dims(names, dynamic_shapes)
    values = dict(zip(input_spec.names, example_inputs))
    # each calibration sample flows through the chain too, so every partition sees its own inputs
    samples = [dict(zip(input_spec.names, sample)) for sample in calibration]
    partitions = []
    for index, (run, (graph, inputs, env)) in enumerate(zip(runs, built)):
        outputs = [n for n in run if n in needed]
        graph.output(tuple(env[n] for n in outputs))
        module = GraphModule(gm, graph)
        in_names = tuple(value_name(n) for n in inputs)
        out_names = tuple(n.name for n in outputs)
        example = tuple(values[n] for n in in_names)
        with torch.no_grad():
            values.update(zip(out_names, module(*example)))
            for sample in samples:
                sample.update(zip(out_names, module(*(sample[n] for n in in_names))))
        partition_calibration = tuple(tuple(sample[n] for n in in_names) for sample in samples)
        pg = PartitionGraph(f"p{index}", module, in_names, out_names, example, _partition_dynamic(inputs, symbols),
                            _precision_plan(run, observer), partition_calibration)
        partitions.append(_partition(pg, _key(run[0]), profile))
    _check_acyclic(partitions)
    return PartitionPlan(partitions, input_spec.names, output_names, output_sources=tuple(value_name(n) for n in graph_outputs))


def _extract(run: list[Node], value_name) -> tuple[Graph, list[Node], dict]:
    """A new graph computing `run`: tensors from outside become placeholders (first, in the
    order first read), weights get_attrs, shape arithmetic is copied in. Returns the graph
    (its output is added once every partition's inputs are known), its inputs and the node map."""
    members = set(run)
    inputs: list[Node] = []
    for node in run:
        stack = list(reversed(node.all_input_nodes))
        while stack:
            arg = stack.pop()
            if _replicable(arg):
                stack.extend(reversed(arg.all_input_nodes))
            elif arg not in members and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
    graph, env = Graph(), {}
    for arg in inputs:
        env[arg] = graph.placeholder(value_name(arg))
        env[arg].meta = dict(arg.meta)

    def lookup(arg: Node) -> Node:
        if arg not in env:
            env[arg] = graph.get_attr(arg.target) if arg.op == "get_attr" else graph.node_copy(arg, lookup)
            env[arg].meta = dict(arg.meta)
        return env[arg]

    for node in run:
        env[node] = graph.node_copy(node, lookup)
    return graph, inputs, env


def _symbol_dims(names, dynamic_shapes) -> dict[str, object]:
    """Symbol of a graph input's dynamic axis -> the torch.export Dim kiln exports it with."""
    symbols = {}
    if dynamic_shapes is None:
        return symbols
    for (placeholder, _), axes in zip(names.items(), dynamic_shapes):
        val = placeholder.meta.get("val")
        for axis, dim in (axes or {}).items():
            if val is not None and isinstance(val.shape[axis], torch.SymInt):
                symbols[str(val.shape[axis])] = dim
    return symbols


def _partition_dynamic(inputs: list[Node], symbols: dict) -> tuple | None:
    if not symbols:
        return None
    shapes = []
    for node in inputs:
        val = node.meta.get("val")
        axes = {}
        for axis, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt):  # a derived size (s0 * 2) is left for export to infer
                axes[axis] = symbols.get(str(size), torch.export.Dim.AUTO)
        shapes.append(axes or None)
    return tuple(shapes) if any(shapes) else None


def _check_acyclic(partitions: list[Partition]) -> None:
    producer = {name: p.name for p in partitions for name in p.graph.output_names}
    quotient = nx.DiGraph()
    quotient.add_nodes_from(p.name for p in partitions)
    quotient.add_edges_from((producer[name], p.name) for p in partitions for name in p.graph.input_names if name in producer)
    if not nx.is_directed_acyclic_graph(quotient):
        raise RuntimeError(f"partitioning produced a cycle: {nx.find_cycle(quotient)}")


def _estimate(gm: GraphModule, plan: PartitionPlan, profile: Profile, names: dict) -> None:
    """Per partition: the cost model's time for its nodes plus its inputs' transfers."""
    host = cm.host_device(profile)
    device_of = {n: _decision(n).device for n in gm.graph.nodes if n.op == "call_function"}
    where = {names.get(n, n.name): device_of.get(n, host) for n in gm.graph.nodes}
    node_of = {names.get(n, n.name): n for n in gm.graph.nodes}
    records = []
    for partition in plan.partitions:
        device = profile.devices[partition.device]
        seconds = 0.0
        for name in partition.graph.input_names:
            val = node_of[name].meta.get("val") if name in node_of else None
            seconds += cm.transfer_seconds(cm.tensor_bytes(val), where.get(name, host), partition.device, profile)
        for node in _nodes_of(gm, partition, plan):
            decision = _decision(node)
            cost = cm.node_cost(gm, node, decision.precision)
            node_s = cm.node_seconds(cost, device, decision.precision) if not _replicable(node) else 0.0
            node_s = node_s if node_s is not None else cm.node_seconds(cost, device, next(iter(device.precisions))) or 0.0
            seconds += node_s
            records.append({"node": node.name, "op": str(node.target).replace("aten.", ""), "partition": partition.name,
                            "device": partition.device, "backend": decision.backend or partition.placed_backend,
                            "precision": decision.precision.value, "est_us": round(node_s * 1e6, 3),
                            "inputs": [names.get(a, a.name) for a in node.all_input_nodes if a.op != "get_attr"],
                            "reasons": list(decision.reasons)})
        partition.estimated_ms = seconds * 1e3
    plan.placement = records


def _nodes_of(gm: GraphModule, partition: Partition, plan: PartitionPlan) -> list[Node]:
    if len(plan.partitions) == 1:
        return [n for n in gm.graph.nodes if n.op == "call_function"]
    originals = {n.name: n for n in gm.graph.nodes}
    return [originals[n.name] for n in partition.graph.gm.graph.nodes
            if n.op == "call_function" and n.name in originals and not _replicable(n)]
