"""Where a TensorRT engine first leaves ONNX Runtime's results, layer by layer, through
NVIDIA's Polygraphy (`pip install polygraphy`): the diagnosis to run when kiln's verification
of a TensorRT engine fails.

Polygraphy marks every tensor of kiln's ONNX graph (the one TensorRT parsed, casts and Q/DQ
included) as an output in both runtimes, runs them on the same feeds and compares each tensor
at kiln's tolerance. TensorRT rebuilds the network with every layer's output marked, which
changes what it fuses: the comparison is of the graph's layers, not of kiln's engine bit for
bit. The first failing tensor in the graph's order names the ONNX node that produced it and,
through `tensorrt_config.onnx_node_owners`, kiln's fx node.

Needs a GPU and TensorRT for the TensorRT side; `compare_runners` takes any Polygraphy runners,
which is how it is tested on CPU (two ONNX Runtime sessions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy


@dataclass(frozen=True)
class Divergence:
    tensor: str  # the first tensor, in graph order, outside the tolerance
    node: str  # the ONNX node producing it
    op: str
    owner: str | None  # kiln's fx node the ONNX node came from, when known
    agreeing: int  # tensors before it that matched
    compared: int  # tensors compared in all

    def describe(self) -> str:
        owner = f" (kiln node {self.owner})" if self.owner else ""
        return (f"first diverging layer: {self.op} node {self.node}{owner}, output {self.tensor}; "
                f"{self.agreeing} of {self.compared} compared tensors before it agreed")


def graph_order(onnx_path: Path) -> list[tuple[str, str, str]]:
    """(tensor, producing node, op type) for every node output, in the graph's node order."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [(out, node.name, node.op_type) for node in model.graph.node for out in node.output if out]


def first_failure(order: Sequence[tuple[str, str, str]], passed: Mapping[str, bool],
                  owners: Mapping[str, str] | None = None) -> Divergence | None:
    """The first tensor of `order` that was compared and failed; None when all compared agree."""
    compared = [entry for entry in order if entry[0] in passed]
    for index, (tensor, node, op) in enumerate(compared):
        if not passed[tensor]:
            return Divergence(tensor, node, op, (owners or {}).get(node), index, len(compared))
    return None


def compare_runners(runners: Sequence, feeds: Sequence[Mapping[str, numpy.ndarray]], onnx_path: Path, rtol: float,
                    atol: float, owners: Mapping[str, str] | None = None) -> Divergence | None:
    """Run `runners` (Polygraphy runners, the first under test, the second the reference) on
    `feeds` and return the first tensor of the graph at `onnx_path` they disagree on."""
    from polygraphy.comparator import Comparator, CompareFunc

    results = Comparator.run(list(runners), data_loader=[dict(f) for f in feeds])
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(rtol=rtol, atol=atol))
    accuracy = accuracy if hasattr(accuracy, "items") else accuracy[0]  # one result per compare function (0.53)
    passed: dict[str, bool] = {}
    for iterations in accuracy.values():
        for outputs in iterations:
            for name, result in outputs.items():
                passed[name] = passed.get(name, True) and bool(result)
    return first_failure(graph_order(onnx_path), passed, owners)


def first_divergence(onnx_path: Path, feeds: Sequence[Mapping[str, numpy.ndarray]], rtol: float, atol: float,
                     strongly_typed: bool = True, owners: Mapping[str, str] | None = None) -> Divergence | None:
    """TensorRT against ONNX Runtime on kiln's ONNX graph, every tensor marked as an output."""
    from polygraphy import constants
    from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, ModifyNetworkOutputs, NetworkFromOnnxPath, TrtRunner

    network = ModifyNetworkOutputs(NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed), outputs=constants.MARK_ALL)
    tensorrt = TrtRunner(EngineFromNetwork(network, config=CreateConfig(tf32=False)), name="tensorrt")
    marked = BytesFromOnnx(ModifyOutputs(OnnxFromPath(str(onnx_path)), outputs=constants.MARK_ALL))
    reference = OnnxrtRunner(SessionFromOnnx(marked), name="onnxruntime")
    return compare_runners([tensorrt, reference], feeds, onnx_path, rtol, atol, owners)
