"""The weights a partition's precision plan is lowered from, prepared once for every backend.

For each int8 layer of the plan (static or dynamic), the weight is put on kiln's int8 grid
(`schemes.per_channel_int8`: symmetric per output channel, sum-keeping rounding). A runtime's
quantiser that rounds to nearest on the same grid (ONNX Runtime's QDQ and dynamic tools, PT2E
with a [-127, 127] range, TensorRT's per-channel scales) then keeps kiln's integers: the
rounding the sensitivity analysis measured. A static int8 layer's bias also loses its
`bias_shift` (bias correction); a layer without a bias gets one. Each bf16 or fp16 layer's
weight is put on its type's values the same way (`schemes.float_grid`), so that the backend's
own cast to the type (`cast_layers`, ONNX Runtime's fp16 converter, TensorRT) is exact.
A smoothed static int8 layer (`LayerPlan.smooth`) reads its input times 1/s, a new mul node,
and its weight's columns are multiplied by s before the rounding, as the analysis simulated.

The result is a new GraphModule. The partition's own tensors are the captured graph's, which
are the user's model's parameters: they are never written.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.fx import GraphModule, Node

from kiln.ir import PartitionGraph
from kiln.ir import LayerPlan, Scheme
from kiln.fx_helpers import add_constant, attr_value
from kiln.precision.schemes import float_grid, per_channel_int8
from kiln.precision.sparsity import prune

INT8 = (Scheme.INT8_STATIC, Scheme.INT8_DYNAMIC)
FLOAT_TYPES = {Scheme.BF16: torch.bfloat16, Scheme.FP16: torch.float16}
BIAS_ARG = 2  # linear(x, w, b), conv2d(x, w, b, ...), convolution(x, w, b, ...)


def with_lowered_weights(graph: PartitionGraph) -> PartitionGraph:
    """`graph` with its sparse layers' weights pruned to their pattern (`sparsity.prune_2_4`, as
    assign_sparsity simulated: before the rounding), its int8, bf16 and fp16 layers' weights
    rounded (and int8 biases corrected), in a new GraphModule; `graph` itself when the plan has
    none of them. Rounding keeps a zero a zero, so a pruned weight stays 2:4 in every type."""
    layers = {layer.weight: layer for layer in graph.precision.layers
              if layer.scheme in (*INT8, *FLOAT_TYPES) or layer.sparsity}
    if not layers:
        return graph
    gm = GraphModule(graph.gm, copy.deepcopy(graph.gm.graph))
    readers: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target] = list(node.users)
    divided: dict[tuple, Node] = {}  # (input, divisors) -> the mul node smoothed layers share
    for node in gm.graph.nodes:
        weight = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
        layer = layers.get(getattr(weight, "target", None)) if isinstance(weight, Node) and weight.op == "get_attr" else None
        if layer is None or readers[weight.target] != [node] or _shared_owner(gm, graph.gm, weight.target):
            continue  # a weight other nodes read too (tied embeddings) keeps its values for them
        value = _get(gm, weight.target)
        if layer.sparsity:
            value = prune(value, layer.sparsity)
        if layer.scheme in INT8:
            if layer.smooth is not None:
                value = value * torch.tensor(layer.smooth, dtype=value.dtype)
                _divide_input(gm, node, layer.smooth, divided)
            value = per_channel_int8(value)
        elif layer.scheme in FLOAT_TYPES:
            value = float_grid(value, FLOAT_TYPES[layer.scheme]).to(value.dtype)
        _set(gm, weight.target, value)
        if layer.bias_shift is not None:
            _correct_bias(gm, node, layer, readers)
    gm.recompile()
    return dataclasses.replace(graph, gm=gm)


def _divide_input(gm: GraphModule, node: Node, smooth: tuple[float, ...], divided: dict[tuple, Node]) -> None:
    """`node` (a linear layer) reads its input times 1/smooth, per input feature; layers reading
    one input with the same divisors share one mul node (`divided`), so it is quantised once."""
    source = node.args[0]
    scaled = divided.get((source, smooth))
    if scaled is None:  # before the first such layer in graph order, so before every later one
        inverse = add_constant(gm, node, 1 / torch.tensor(smooth, dtype=torch.float32), "smooth")
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (source, inverse))
        if isinstance(source, Node) and "val" in source.meta:
            scaled.meta["val"] = source.meta["val"]  # same shape and dtype
        divided[(source, smooth)] = scaled
    node.update_arg(0, scaled)


def _correct_bias(gm: GraphModule, node: Node, layer: LayerPlan, readers: dict[str, list[Node]]) -> None:
    bias = node.args[BIAS_ARG] if len(node.args) > BIAS_ARG else node.kwargs.get("bias")
    shift = torch.tensor(layer.bias_shift, dtype=torch.float32)
    if isinstance(bias, Node) and bias.op == "get_attr" and readers[bias.target] == [node]:
        _set(gm, bias.target, _get(gm, bias.target) - shift.to(_get(gm, bias.target).dtype))
        return
    if bias is not None:
        return  # a computed or shared bias: left as it is (the verification measures the layer as built)
    target = layer.weight.rsplit(".", 1)[0] + ".kiln_corrected_bias" if "." in layer.weight else "kiln_corrected_bias_" + layer.weight
    _set(gm, target, -shift)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(target)
    if len(node.args) > BIAS_ARG:
        node.update_arg(BIAS_ARG, attr)
    elif "bias" in node.kwargs:
        node.update_kwarg("bias", attr)
    else:
        node.args = (*node.args, attr)


def _shared_owner(gm: GraphModule, original: GraphModule, target: str) -> bool:
    """Whether `target`'s owning module is the original graph's own object (a called submodule
    is copied by reference), so that binding a tensor there would write the user's model."""
    owner = target.rpartition(".")[0]
    return bool(owner) and gm.get_submodule(owner) is original.get_submodule(owner)


def _get(gm: GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _set(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Bind `target` in `gm`'s own module tree to a new tensor (a parameter stays a parameter)."""
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    value = value.detach()
    if isinstance(getattr(module, name, None), torch.nn.Parameter):
        module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers.pop(name, None)
        module.register_buffer(name, value)


def cast_layers(source: GraphModule, names: set[str], dtype: torch.dtype) -> GraphModule:
    """A copy of `source` where each named layer runs in `dtype` between fp32 casts: its input
    is cast down, its weight (on `float_grid`, as simulated) and bias become `dtype` constants,
    its output is cast back. How
    Inductor and OpenVINO run a float plan layer by layer. Between two lowered layers the
    value stays in `dtype` (`_stay_low_between_layers`)."""
    gm = copy.deepcopy(source)
    for node in list(gm.graph.nodes):
        if node.name not in names:
            continue
        args = list(node.args)
        with gm.graph.inserting_before(node):
            cast_in = gm.graph.call_function(torch.ops.aten._to_copy.default, (args[0],), {"dtype": dtype})
            cast_in.meta["val"] = args[0].meta["val"].to(dtype)
        args[0] = cast_in
        for index in (1, 2):  # weight and bias become constants of the low type, the weight rounded as simulated
            if index < len(args) and (value := attr_value(gm, args[index])) is not None:
                low = float_grid(value, dtype).to(dtype) if index == 1 else value.to(dtype)
                args[index] = add_constant(gm, node, low, f"{dtype}".split(".")[-1])
        node.args = tuple(args)
        with gm.graph.inserting_after(node):
            cast_out = gm.graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": torch.float32})
        node.replace_all_uses_with(cast_out, delete_user_cb=lambda user: user is not cast_out)
        cast_out.meta["val"] = node.meta["val"]
        node.meta["val"] = node.meta["val"].to(dtype)
    _stay_low_between_layers(gm, dtype)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


# Monotone ops that only select or clip values: on an input already in a low float type, running
# them there and casting down after them give the same values (rounding commutes with them).
# A padding's fill is checked on its own.
EXACT_IN_LOW_TYPES = (torch.ops.aten.relu.default, torch.ops.aten.relu6.default, torch.ops.aten.hardtanh.default,
                      torch.ops.aten.clamp.default, torch.ops.aten.max_pool2d.default)
PADS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)


def _stay_low_between_layers(gm: GraphModule, dtype: torch.dtype) -> None:
    """Drop the casts between two lowered layers: a lowered layer's output cast up to fp32,
    through ops exact in `dtype` (relu6, zero padding) with no other reader, then cast down to
    the next lowered layer. Each cast is a pass over the activation: on EfficientNet-Lite0 on
    OpenVINO, 49 of 50 layers at bf16 between casts ran slower than fp32 (5.8 vs 5.1 ms)."""
    def is_cast(node, to) -> bool:
        return node.op == "call_function" and node.target is torch.ops.aten._to_copy.default and node.kwargs.get("dtype") is to

    for cast_down in [n for n in gm.graph.nodes if is_cast(n, dtype)]:
        chain, value = [], cast_down.args[0]
        while isinstance(value, Node) and len(value.users) == 1 and _exact_in_low_types(value):
            chain.append(value)
            value = value.args[0]
        if not (isinstance(value, Node) and is_cast(value, torch.float32)):
            continue
        low = value.args[0]
        if not (isinstance(low, Node) and getattr(low.meta.get("val"), "dtype", None) is dtype):
            continue
        if chain:
            chain[-1].replace_input_with(value, low)
            for node in chain:
                node.meta["val"] = node.meta["val"].to(dtype)
        cast_down.replace_all_uses_with(chain[0] if chain else low)


def _exact_in_low_types(node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in EXACT_IN_LOW_TYPES:
        return True
    if node.target in PADS:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        fill = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return mode == "constant" and fill in (None, 0, 0.0)
    return False
