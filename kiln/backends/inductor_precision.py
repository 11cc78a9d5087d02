"""Lower a partition's precision plan for Inductor, before AOTInductor compiles it.

    bf16 / fp16   each lowered layer computes on cast inputs and weights (the weights are cast
                  once, as constants) and casts its output back to fp32; oneDNN's bf16 GEMMs
                  and convolutions accumulate in fp32
    int8          PT2E with X86InductorQuantizer (static: calibrated on the plan's samples;
                  dynamic: per-call activation scales); its annotations are kept only on the
                  plan's layers, so the rest of the graph stays fp32; freezing then turns the
                  Q/DQ pairs into oneDNN int8 kernels
    int4-weight   each lowered linear layer becomes PyTorch's CPU int4 weight-only matmul
                  (`_weight_int4pack_mm_for_cpu`, the kernel torchao's Int4CPULayout calls), its
                  weight packed once from kiln's group-wise uint4 rounding; activations stay fp32

Both return an ExportedProgram ready for aoti_compile_and_package.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.fx import GraphModule

from kiln.backends.base import export_partition
from kiln.ir import PartitionGraph
from kiln.progress import quiet_loggers
from kiln.errors import BackendError, BackendUnavailable
from kiln.frontend.capture import export_program
from kiln.fx_helpers import add_constant, attr_value
from kiln.ir import Scheme
from kiln.precision.lowering import FLOAT_TYPES, cast_layers
from kiln.precision.schemes import groupwise_uint4

def lowered_program(partition: PartitionGraph) -> tuple[torch.export.ExportedProgram, str]:
    """The program to compile and a one-line summary of what was lowered."""
    plan = partition.precision
    schemes = plan.schemes()
    if not schemes:
        return export_partition(partition), ""
    if len(schemes) > 1:
        raise BackendError(f"the precision plan mixes {', '.join(sorted(schemes))}; kiln's Inductor lowering takes one "
                           "scheme per partition", where=f"partition {partition.name}", fix="request one precision")
    (scheme,) = schemes
    names = {layer.node for layer in plan.lowered}
    if scheme in FLOAT_TYPES:
        gm = cast_layers(partition.gm, names, FLOAT_TYPES[scheme])
        program = export_program(gm, partition.example_inputs, partition.dynamic_shapes)
    elif scheme in (Scheme.INT8_STATIC, Scheme.INT8_DYNAMIC):
        program = _pt2e_int8(partition, dynamic=scheme == Scheme.INT8_DYNAMIC)
    elif scheme == Scheme.INT4_WEIGHT:
        gm = _int4_layers(partition, {layer.node: layer.group_size or 128 for layer in plan.lowered})
        program = export_program(gm, partition.example_inputs, partition.dynamic_shapes)
    else:
        raise BackendError(f"kiln's Inductor lowering has no {scheme} scheme", where=f"partition {partition.name}",
                           fix="use backend='onnxruntime' or 'openvino', or another precision")
    return program, f"{scheme}: {len(names)} layers"


def int4_tinygemm(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln's group-wise uint4 rounding (`schemes.groupwise_int4`) in the form PyTorch's CPU int4
    kernel reads: q in 0..15 as int32 [N, K], and per group (scale, zero) as [K / group, N, 2]
    with w = (q - 8) * scale + zero, i.e. zero = (8 - zero_point) * scale."""
    rows, cols = weight.shape
    q, scale, zero_point = groupwise_uint4(weight.detach(), group_size)
    q = q.reshape(rows, cols).to(torch.int32)
    zero = (8 - zero_point) * scale
    scale_and_zero = torch.cat([scale, zero], dim=2).permute(1, 0, 2).contiguous()  # [K / group, N, 2]
    return q, scale_and_zero


def _int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int) -> torch.Tensor:
    """linear(x, W, bias) with W in PyTorch's packed int4 form; traced by torch.export into the program."""
    out_features = scale_and_zero.shape[1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), packed, group_size, scale_and_zero)
    y = y.reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


def _int4_layers(partition: PartitionGraph, group_sizes: dict[str, int]) -> GraphModule:
    """A copy of the partition where each planned linear layer computes with packed int4 weights."""
    gm = copy.deepcopy(partition.gm)
    for node in list(gm.graph.nodes):
        if node.name not in group_sizes:
            continue
        group_size = group_sizes[node.name]
        weight = attr_value(gm, node.args[1])
        if node.target is not torch.ops.aten.linear.default or weight is None or weight.shape[1] % group_size:
            raise BackendError(f"layer {node.name} cannot take int4 weights in groups of {group_size} "
                               f"(weight {tuple(weight.shape) if weight is not None else '?'})", where=f"partition {partition.name}",
                               fix="use int4_group_size=32, or backend='onnxruntime' (MatMulNBits pads the last group)")
        q, scale_and_zero = int4_tinygemm(weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        bias = node.args[2] if len(node.args) > 2 else None
        with gm.graph.inserting_before(node):
            packed_attr = add_constant(gm, node, packed, "int4_packed")
            scales_attr = add_constant(gm, node, scale_and_zero, "int4_scale_and_zero")
            replacement = gm.graph.call_function(_int4_linear, (node.args[0], packed_attr, scales_attr, bias, group_size))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _pt2e_int8(partition: PartitionGraph, dynamic: bool) -> torch.export.ExportedProgram:
    try:
        with quiet_loggers("torchao", "torch.utils._pytree"):
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError as exc:  # PT2E quantisation moved from torch to torchao
        raise BackendUnavailable(f"int8 on Inductor needs torchao's PT2E quantizer: {exc}",
                                 where=f"partition {partition.name}",
                                 fix="pip install 'kiln[pt2e]' (torchao), or use backend='onnxruntime' for int8") from None

    model = export_partition(partition).module()
    # re-export renumbers node names: the plan's layers are found by their weights, which keep
    # their attribute names. Those weights arrive on kiln's int8 grid (precision.lowering), and
    # PT2E's per-channel observer, over the same [-127, 127] range, keeps kiln's integers
    planned = {layer.weight for layer in partition.precision.lowered}
    layers = {node.name for node in model.graph.nodes if node.op == "call_function" and len(node.args) > 1
              and getattr(node.args[1], "op", None) == "get_attr" and node.args[1].target in planned}

    config = get_default_x86_inductor_quantization_config(is_dynamic=dynamic)
    config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=-127))

    class _PlanQuantizer(X86InductorQuantizer):
        """X86InductorQuantizer's annotations, kept only on the plan's layers. It finds convs by
        the nn.Conv2d they were called from (the node's source_fn_stack); a re-exported
        partition holds only the aten op, so a planned conv it passed over is annotated here
        the way it annotates a conv on its own: input and weight quantised, output left float."""

        def annotate(self, model: GraphModule) -> GraphModule:
            model = super().annotate(model)
            for node in model.graph.nodes:
                if node.name not in layers:
                    node.meta.pop("quantization_annotation", None)
                elif "quantization_annotation" not in node.meta and node.target == torch.ops.aten.conv2d.default:
                    self._annotate_conv_node_helper(node, False, config)
            return model

    quantizer = _PlanQuantizer().set_global(config)
    prepared = prepare_pt2e(model, quantizer)
    with torch.no_grad():
        for sample in partition.calibration or (partition.example_inputs,):
            prepared(*sample)
    converted = convert_pt2e(prepared)
    if missed := sorted(layers - _quantised_layers(converted)):
        raise BackendError(f"PT2E left {len(missed)} of the plan's {len(layers)} int8 layers unquantised "
                           f"({', '.join(missed[:6])}{', ...' if len(missed) > 6 else ''}): they would run at fp32 "
                           f"while the report said int8", where=f"partition {partition.name}",
                           fix="use backend='onnxruntime' or backend='openvino' for int8, or report the model")
    return export_program(converted, partition.example_inputs, partition.dynamic_shapes)


def _quantised_layers(converted: GraphModule) -> set[str]:
    """The conv and linear nodes of a converted PT2E graph whose weight arrives dequantised from
    int8, i.e. the layers that really run on int8 weights."""
    dequantised = {node for node in converted.graph.nodes if node.op == "call_function"
                   and "dequantize_per_channel" in str(node.target)}
    return {node.name for node in converted.graph.nodes if node.op == "call_function" and len(node.args) > 1
            and node.args[1] in dequantised}
