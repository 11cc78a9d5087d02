"""Lower a partition's precision plan onto an exported ONNX model with ONNX Runtime's own tools.

    int8-static   quantize_static: QDQ format, per-channel symmetric int8 weights, uint8
                  input activations over kiln's calibrated ranges (TensorQuantOverrides);
                  layer outputs stay float, as the sensitivity analysis measured them
    int8-dynamic  quantize_dynamic: per-channel int8 weights, activations quantised per call
    int4-weight   MatMulNBitsQuantizer: block-wise uint4 weights along K with zero points
    fp16          float16 conversion keeping fp32 I/O, every node not in the plan blocked

Each tool is told which ONNX nodes to touch. The exporter records the fx node each ONNX node
came from (metadata `pkg.torch.onnx.fx_node`), but those are the nodes of the re-exported
program, whose names are renumbered from the partition's. A layer is therefore found by its
weight: the program's signature names the attribute each lifted weight came from, which is
the name the plan records (`LayerPlan.weight`). Layers with no ONNX node found are named in
the summary.

int8 weights arrive on kiln's grid with corrected biases (`precision.lowering`), so the
quantisers' round-to-nearest keeps the integers kiln's analysis measured.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import numpy

from kiln.ir import PartitionGraph
from kiln.errors import BackendError
from kiln.ir import LayerPlan, Scheme

FX_NODE_KEY = "pkg.torch.onnx.fx_node"
LAYER_OP_TYPES = ("MatMul", "Gemm", "Conv")
_FX_NAME = re.compile(r"%([\w.]+)\s*:")


def lower(path: Path, partition: PartitionGraph, program) -> str:
    """Rewrite the ONNX model at `path` (exported as `program`, an ONNXProgram) in place per
    `partition.precision`; returns a summary."""
    import onnx

    plan = partition.precision
    schemes = plan.schemes()
    if not schemes:
        return ""
    if len(schemes) > 1:
        raise BackendError(f"the precision plan mixes {', '.join(sorted(schemes))}; kiln's ONNX Runtime lowering takes one scheme "
                           "per partition", where=f"partition {partition.name}", fix="request one precision, e.g. precision='int8'")
    (scheme,) = schemes
    model = onnx.load(str(path))
    by_weight = _layer_nodes(model, program.exported_program)
    wanted = {layer.weight: layer for layer in plan.lowered}
    targets = [name for weight in wanted for name in by_weight.get(weight, [])]
    # every other MatMul/Gemm/Conv stays float, including those no planned layer exported (the
    # activation-by-activation MatMuls of a decomposed attention carry no weight to quantise)
    others = [n.name for n in model.graph.node if n.op_type in LAYER_OP_TYPES and n.name not in set(targets)]
    missing = sorted(layer.node for weight, layer in wanted.items() if weight not in by_weight)
    out = path.with_name(path.stem + f".{scheme}.onnx")
    with _quiet():
        if scheme == Scheme.INT8_STATIC:
            _static_int8(path, out, partition, model, {name: wanted[w] for w, names in by_weight.items() if w in wanted
                                                       for name in names}, others)
        elif scheme == Scheme.INT8_DYNAMIC:
            _dynamic_int8(path, out, others)
        elif scheme == Scheme.INT4_WEIGHT:
            _int4_weight(model, out, targets, others, plan.lowered[0].group_size or 128)
        elif scheme == Scheme.FP16:
            _fp16(model, out, targets)
        else:
            raise BackendError(f"kiln's ONNX Runtime lowering has no {scheme} scheme", where=f"partition {partition.name}",
                               fix="use backend='inductor' or another precision")
    out.replace(path)
    text = f"{scheme}: {len(targets)} ONNX nodes from {len(wanted)} layers"
    return text + (f"; not found in the ONNX graph (left fp32): {', '.join(missing)}" if missing else "")


def _layer_nodes(model, exported) -> dict[str, list[str]]:
    """Weight attribute name -> names of the MatMul/Gemm/Conv ONNX nodes computing with it."""
    signature = exported.graph_signature
    owners = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
              **signature.inputs_to_lifted_tensor_constants}
    weight_of = {node.name: owners[node.args[1].name] for node in exported.graph.nodes
                 if node.op == "call_function" and len(node.args) > 1 and getattr(node.args[1], "name", None) in owners}
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in LAYER_OP_TYPES:
            continue
        for prop in node.metadata_props:
            if prop.key == FX_NODE_KEY and (match := _FX_NAME.match(prop.value)) and match.group(1) in weight_of:
                found.setdefault(weight_of[match.group(1)], []).append(node.name)
    return found


def _static_int8(path: Path, out: Path, partition: PartitionGraph, model, wanted: dict[str, LayerPlan], others: list[str]) -> None:
    """`wanted`: ONNX node name -> the layer it computes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    samples = partition.calibration or (partition.example_inputs,)
    reader = _Reader(partition.input_names, samples)
    overrides = {}
    for node in model.graph.node:  # kiln's observer ranges for the lowered layers' inputs
        layer = wanted.get(node.name)
        if layer is not None and layer.input_range is not None:
            lo, hi = layer.input_range
            overrides[node.input[0]] = [{"rmin": numpy.float32(min(lo, 0.0)), "rmax": numpy.float32(max(hi, 0.0))}]
    quantize_static(str(path), str(out), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(LAYER_OP_TYPES),
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=others, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"TensorQuantOverrides": overrides, "WeightSymmetric": True,
                                   # outputs stay float (dequantised fp32 accumulators), as kiln's
                                   # sensitivity analysis measured them; a second rounding per layer
                                   # would spend budget the analysis did not see
                                   "OpTypesToExcludeOutputQuantization": list(LAYER_OP_TYPES)})
    _float_for_the_rest(out, set(wanted))


def _float_for_the_rest(path: Path, quantised: set[str]) -> None:
    """quantize_static rounds a tensor once and hands the rounded value to every reader of it;
    readers the plan keeps at fp32 (a residual add, an attention MatMul, an fp32 layer) read
    the float tensor again, as the sensitivity analysis simulated them."""
    import onnx

    model = onnx.load(str(path))
    quantised_from = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    float_of = {n.output[0]: quantised_from[n.input[0]] for n in model.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in quantised_from}
    for node in model.graph.node:
        if node.name in quantised or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            if name in float_of:
                node.input[index] = float_of[name]
    onnx.save(model, str(path))


def _dynamic_int8(path: Path, out: Path, others: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(out), op_types_to_quantize=list(LAYER_OP_TYPES), per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=others)


def _int4_weight(model, out: Path, targets: list[str], others: list[str], group_size: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    targets = _gemm_to_matmul(model, set(targets))
    quantizer = MatMulNBitsQuantizer(model, block_size=group_size, is_symmetric=False, nodes_to_exclude=others,
                                     nodes_to_include=targets, op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def _gemm_to_matmul(model, targets: set[str]) -> list[str]:
    """MatMulNBits takes MatMul only: a plain Gemm(A, W, C, transB=1) becomes MatMul(A, Wᵀ) + C."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    renamed = []
    for index, node in enumerate(list(model.graph.node)):
        if node.name not in targets:
            continue
        if node.op_type != "Gemm":
            renamed.append(node.name)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or node.input[1] not in inits:
            continue  # not a plain linear layer: left in fp32
        weight = numpy_helper.to_array(inits[node.input[1]])
        weight = weight.T.copy() if attrs.get("transB", 0) else weight
        name = node.input[1] + "_kiln_kn"
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
        matmul = onnx.helper.make_node("MatMul", [node.input[0], name], [node.output[0] + "_mm"], name=node.name + "_matmul")
        nodes = [matmul]
        if len(node.input) > 2 and node.input[2]:
            nodes.append(onnx.helper.make_node("Add", [matmul.output[0], node.input[2]], [node.output[0]], name=node.name + "_bias"))
        else:
            matmul.output[0] = node.output[0]
        model.graph.node.remove(node)
        for offset, new in enumerate(nodes):
            model.graph.node.insert(index + offset, new)
        renamed.append(matmul.name)
    return renamed


def _fp16(model, out: Path, targets: list[str]) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = [n.name for n in model.graph.node if n.name not in set(targets)]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    onnx.save(converted, str(out))


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over kiln's flat samples."""

    def __init__(self, names: tuple[str, ...], samples):
        self.feeds = iter([{n: t.detach().contiguous().numpy() for n, t in zip(names, s)} for s in samples])

    def get_next(self):
        return next(self.feeds, None)


@contextlib.contextmanager
def _quiet():
    """The quantisation tools log advice (pre-processing) at WARNING on the root logger and print progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)

