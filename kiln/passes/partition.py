"""Cut the optimised graph into partitions, one per (device, backend) run, and record each
node's placement decision.

Placement across several devices is decided by `place_on_devices` when it runs; until a node
carries such a decision, it goes to the profile's primary device and the whole graph is one
partition. The Plan is what the runtime executes and what the artifact manifest records.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace

import torch
from torch.fx import GraphModule

from kiln.backends.base import PartitionGraph
from kiln.hardware_profiles.schema import Profile
from kiln.precision.plan import LAYER_META, PrecisionPlan
from kiln.types import InputSpec, NodeDecision


@dataclass
class Partition:
    graph: PartitionGraph
    device: str
    backend: str = ""  # filled in by backend selection

    @property
    def name(self) -> str:
        return self.graph.name


@dataclass
class Plan:
    partitions: list[Partition]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"input_names": list(self.input_names), "output_names": list(self.output_names),
                "partitions": [{"name": p.name, "device": p.device, "backend": p.backend,
                                "inputs": list(p.graph.input_names), "outputs": list(p.graph.output_names)}
                               for p in self.partitions]}


def build_plan(gm: GraphModule, profile: Profile, input_spec: InputSpec, output_names: tuple[str, ...],
               example_inputs: tuple[torch.Tensor, ...], dynamic_shapes: tuple | None,
               calibration: tuple = (), observer: str = "minmax") -> Plan:
    device = profile.primary_device
    placed = f"primary device of profile {profile.name}"
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        decision = node.meta.get("kiln")  # assign_precision's, when it ran: keep its precision and reason
        node.meta["kiln"] = NodeDecision(device=device, reasons=(placed,)) if decision is None else \
            replace(decision, device=device, reasons=(*decision.reasons, placed))
    layers = [n.meta[LAYER_META] for n in gm.graph.nodes if LAYER_META in n.meta]
    graph = PartitionGraph("p0", gm, input_spec.names, output_names, example_inputs, dynamic_shapes,
                           PrecisionPlan(layers, observer), tuple(calibration))
    return Plan([Partition(graph, device)], input_spec.names, output_names)


def op_counts(gm: GraphModule) -> dict[str, int]:
    counts = collections.Counter(str(n.target).replace("aten.", "") for n in gm.graph.nodes if n.op == "call_function")
    return dict(counts)
