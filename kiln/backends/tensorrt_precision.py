"""A partition's precision plan written into the ONNX graph TensorRT parses, for a strongly
typed build: TensorRT then takes every tensor's type from the graph, with no precision flags,
no per-layer precision setters and no calibrator (TensorRT 11 has none of them).

    bf16 / fp16   each lowered layer between casts (`precision.lowering.cast_layers`, the way
                  Inductor and OpenVINO run a float plan): its input cast down, its weight (on
                  kiln's float grid) and bias constants of the type, its output cast back to
                  fp32; between two lowered layers the value stays in the type
    int8-static   QuantizeLinear/DequantizeLinear pairs on the layer's input and weight. The
                  weight is per output channel and symmetric, on kiln's int8 grid already
                  (`precision.lowering`), so its scale absmax/127 gives back kiln's integers.
                  The input is per tensor from kiln's calibrated range, made symmetric:
                  TensorRT quantizes with zero points of 0 only, so [lo, hi] becomes
                  ±max(|lo|, |hi|) (a coarser step than kiln's uint8 simulation where lo is 0)
    fp8-e4m3      the same pairs in FLOAT8E4M3FN, per tensor: the weight's scale is its
                  amax/448, as kiln simulates it; the input's is the amax over the partition's
                  calibration samples (TensorRT needs it at build time; the simulation scales
                  each call by its own amax)
    int8-dynamic  refused: TensorRT has no per-call int8 activation scales
    int4-weight   refused: kiln's int4 groups have zero points, TensorRT's int4 weights none

Layers are found in the ONNX graph by their weights, as the ONNX Runtime lowering finds them
(`onnxruntime_precision._layer_nodes`); each Q/DQ pair feeds only its layer, so other readers
of the same value keep the float tensor, as the sensitivity analysis simulated them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import torch
from torch.fx import GraphModule, Interpreter

from kiln.backends.onnxruntime import export_onnx
from kiln.backends.onnxruntime_precision import LAYER_OP_TYPES, _layer_nodes
from kiln.backends.tensorrt_config import onnx_node_owners
from kiln.errors import BackendError
from kiln.ir import LayerPlan, PartitionGraph, Scheme
from kiln.precision.lowering import FLOAT_TYPES, cast_layers
from kiln.precision.schemes import FP8_MAX
from kiln.types import Precision

INT8_MAX = 127.0
QDQ_SCHEMES = {Scheme.INT8_STATIC: Precision.INT8, Scheme.FP8: Precision.FP8}
REFUSED = {
    Scheme.INT8_DYNAMIC: ("TensorRT quantizes int8 activations with scales fixed at build time, not per call",
                          "give kiln calibration data (its int8 plans are then static), or use backend='onnxruntime'"),
    Scheme.INT4_WEIGHT: ("kiln's int4 weights have a zero point per group and TensorRT's int4 weights are symmetric",
                         "use backend='onnxruntime' or 'inductor' for int4, or another precision"),
}


@dataclass
class LoweredGraph:
    """The ONNX file TensorRT parses, and what the lowering did to it."""

    program: object  # the exporter's ONNXProgram (before Q/DQ insertion)
    gm: GraphModule  # the fx graph exported: the partition's, or a copy with casts
    layer_precisions: dict[str, Precision] = field(default_factory=dict)  # ONNX node -> precision by Q/DQ or casts
    summary: str = ""


def export_lowered(partition: PartitionGraph, path: Path) -> LoweredGraph:
    """Export `partition` to `path` with its precision plan in the graph's own types."""
    plan = partition.precision
    where = f"partition {partition.name}"
    for scheme in sorted(plan.schemes() & set(REFUSED)):
        reason, fix = REFUSED[scheme]
        raise BackendError(f"the precision plan has {scheme} layers: {reason}", where=where, fix=fix)
    gm = partition.gm
    cast: dict[str, Precision] = {}
    for scheme, dtype in FLOAT_TYPES.items():
        names = {layer.node for layer in plan.by_scheme(scheme)}
        if names:
            gm = cast_layers(gm, names, dtype)
            cast.update(dict.fromkeys(names, scheme.precision))
    exported = partition if gm is partition.gm else dataclasses.replace(partition, gm=gm)
    program = export_onnx(exported, path)
    lowered = LoweredGraph(program, gm)
    if cast:  # the ONNX nodes converted from each cast layer, for the report
        lowered.layer_precisions.update({onnx: cast[fx] for onnx, fx in onnx_node_owners(program, gm).items() if fx in cast})
    parts = [f"{scheme}: {len(plan.by_scheme(scheme))} layers between casts" for scheme in FLOAT_TYPES if plan.by_scheme(scheme)]
    quantized = [layer for layer in plan.lowered if layer.scheme in QDQ_SCHEMES]
    if quantized:
        by_qdq, missing = insert_qdq(path, program, quantized, _input_amax(partition, quantized))
        lowered.layer_precisions.update(by_qdq)
        count = len(by_qdq)
        parts.append(f"Q/DQ on {count} ONNX nodes from {len(quantized)} int8/fp8 layers")
        if missing:
            parts.append(f"not found in the ONNX graph (left fp32): {', '.join(missing)}")
    lowered.summary = "; ".join(parts)
    return lowered


def _input_amax(partition: PartitionGraph, layers: list[LayerPlan]) -> dict[str, float]:
    """Each layer's input amax: kiln's calibrated range for int8-static, else the largest |x| the
    layer's input takes on the partition's calibration samples (or its example inputs)."""
    amax: dict[str, float] = {}
    measure = set()
    for layer in layers:
        if layer.scheme == Scheme.INT8_STATIC and layer.input_range is not None:
            amax[layer.node] = max(abs(layer.input_range[0]), abs(layer.input_range[1]))
        else:
            measure.add(layer.node)
    if measure:
        seen: dict[str, float] = {}

        class Recorder(Interpreter):
            def run_node(self, node):
                if node.name in measure:
                    x = self.env[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else None
                    if isinstance(x, torch.Tensor) and x.numel():
                        seen[node.name] = max(seen.get(node.name, 0.0), float(x.detach().abs().max()))
                return super().run_node(node)

        with torch.no_grad():
            for sample in partition.calibration or (partition.example_inputs,):
                Recorder(partition.gm).run(*sample)
        amax.update(seen)
    return amax


def insert_qdq(path: Path, program, layers: list[LayerPlan], input_amax: dict[str, float]) -> tuple[dict[str, Precision], list[str]]:
    """Rewrite the ONNX model at `path` in place: a Q/DQ pair on the input and on the weight of
    each ONNX node computing one of `layers`. Returns {ONNX node: precision} and the layers no
    ONNX node was found for."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    by_weight = _layer_nodes(model, program.exported_program)
    initializers = {i.name: i for i in graph.initializer}
    done: dict[str, Precision] = {}
    missing = []
    for layer in layers:
        names = by_weight.get(layer.weight, [])
        if not names or layer.node not in input_amax:
            missing.append(layer.node)
            continue
        for name in names:
            node = next(n for n in graph.node if n.name == name)
            weight = initializers.get(node.input[1])
            if weight is None or node.op_type not in LAYER_OP_TYPES:
                missing.append(layer.node)
                continue
            precision = QDQ_SCHEMES[layer.scheme]
            new_nodes = _qdq(graph, node, 0, precision, numpy.float32(_scale(input_amax[layer.node], precision)), None)
            values = onnx.numpy_helper.to_array(weight).astype(numpy.float32)
            axis = _channel_axis(node, values.ndim)
            if precision is Precision.INT8:
                reduce = tuple(d for d in range(values.ndim) if d != axis)
                absmax = numpy.abs(values).max(axis=reduce) if reduce else numpy.abs(values)
                scale = numpy.maximum(absmax / INT8_MAX, numpy.float32(1e-12)).astype(numpy.float32)
            else:
                scale, axis = numpy.float32(_scale(float(numpy.abs(values).max()), precision)), None
            new_nodes += _qdq(graph, node, 1, precision, scale, axis)
            index = list(graph.node).index(node)
            for offset, made in enumerate(new_nodes):  # before their reader: the graph stays topologically sorted
                graph.node.insert(index + offset, made)
            done[name] = precision
    onnx.save(model, str(path))
    return done, sorted(set(missing))


def _scale(amax: float, precision: Precision) -> float:
    top = INT8_MAX if precision is Precision.INT8 else FP8_MAX
    return max(amax, 1e-12) / top


def _channel_axis(node, rank: int) -> int:
    """The output-channel axis of a layer's weight: Conv [O, I, ...] 0; Gemm 0 when it multiplies
    by the transpose, else 1; MatMul [.., K, N] the last."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        import onnx

        trans_b = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1


def _qdq(graph, node, input_index: int, precision: Precision, scale, axis: int | None) -> list:
    """QuantizeLinear -> DequantizeLinear on `node`'s input `input_index`, feeding `node` only."""
    import onnx
    from onnx import TensorProto

    source = node.input[input_index]
    stem = f"{node.name}_kiln_{'x' if input_index == 0 else 'w'}"
    scale = numpy.asarray(scale, dtype=numpy.float32)
    graph.initializer.append(onnx.numpy_helper.from_array(scale, f"{stem}_scale"))
    if precision is Precision.INT8:
        zero = onnx.numpy_helper.from_array(numpy.zeros(scale.shape, dtype=numpy.int8), f"{stem}_zero")
    else:  # the zero point's type is the quantized type: FLOAT8E4M3FN
        zero = onnx.helper.make_tensor(f"{stem}_zero", TensorProto.FLOAT8E4M3FN, list(scale.shape),
                                       [0.0] * int(scale.size))
    graph.initializer.append(zero)
    attributes = {} if axis is None else {"axis": axis}
    quantize = onnx.helper.make_node("QuantizeLinear", [source, f"{stem}_scale", f"{stem}_zero"], [f"{stem}_q"],
                                     name=f"{stem}_quantize", **attributes)
    dequantize = onnx.helper.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_scale", f"{stem}_zero"],
                                       [f"{stem}_dq"], name=f"{stem}_dequantize", **attributes)
    node.input[input_index] = f"{stem}_dq"
    return [quantize, dequantize]
