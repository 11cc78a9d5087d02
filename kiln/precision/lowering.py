"""The weights a partition's precision plan is lowered from, prepared once for every backend.

For each int8 layer of the plan (static or dynamic), the weight is put on kiln's int8 grid
(`schemes.per_channel_int8`: symmetric per output channel, sum-keeping rounding). A runtime's
quantiser that rounds to nearest on the same grid (ONNX Runtime's QDQ and dynamic tools, PT2E
with a [-127, 127] range, TensorRT's per-channel scales) then keeps kiln's integers: the
rounding the sensitivity analysis measured. A static int8 layer's bias also loses its
`bias_shift` (bias correction); a layer without a bias gets one.

The result is a new GraphModule. The partition's own tensors are the captured graph's, which
are the user's model's parameters: they are never written.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.fx import GraphModule, Node

from kiln.backends.base import PartitionGraph
from kiln.precision.plan import LayerPlan, Scheme
from kiln.passes._graph import add_constant, attr_value
from kiln.precision.schemes import per_channel_int8

INT8 = (Scheme.INT8_STATIC, Scheme.INT8_DYNAMIC)
FLOAT_TYPES = {Scheme.BF16: torch.bfloat16, Scheme.FP16: torch.float16}
BIAS_ARG = 2  # linear(x, w, b), conv2d(x, w, b, ...), convolution(x, w, b, ...)


def with_lowered_weights(graph: PartitionGraph) -> PartitionGraph:
    """`graph` with its int8 layers' weights rounded and biases corrected, in a new GraphModule;
    `graph` itself when the plan has no int8 layer."""
    layers = {layer.weight: layer for layer in graph.precision.lowered if layer.scheme in INT8}
    if not layers:
        return graph
    gm = GraphModule(graph.gm, copy.deepcopy(graph.gm.graph))
    readers: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target] = list(node.users)
    for node in gm.graph.nodes:
        weight = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
        layer = layers.get(getattr(weight, "target", None)) if isinstance(weight, Node) and weight.op == "get_attr" else None
        if layer is None or readers[weight.target] != [node] or _shared_owner(gm, graph.gm, weight.target):
            continue  # a weight other nodes read too (tied embeddings) keeps its values for them
        _set(gm, weight.target, per_channel_int8(_get(gm, weight.target)))
        if layer.bias_shift is not None:
            _correct_bias(gm, node, layer, readers)
    gm.recompile()
    return dataclasses.replace(graph, gm=gm)


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
    is cast down, its weight and bias become `dtype` constants, its output is cast back. How
    Inductor and OpenVINO run a float plan layer by layer."""
    gm = copy.deepcopy(source)
    for node in list(gm.graph.nodes):
        if node.name not in names:
            continue
        args = list(node.args)
        with gm.graph.inserting_before(node):
            cast_in = gm.graph.call_function(torch.ops.aten._to_copy.default, (args[0],), {"dtype": dtype})
            cast_in.meta["val"] = args[0].meta["val"].to(dtype)
        args[0] = cast_in
        for index in (1, 2):  # weight and bias become constants of the low type
            if index < len(args) and (value := attr_value(gm, args[index])) is not None:
                args[index] = add_constant(gm, node, value.to(dtype), f"{dtype}".split(".")[-1])
        node.args = tuple(args)
        with gm.graph.inserting_after(node):
            cast_out = gm.graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": torch.float32})
        node.replace_all_uses_with(cast_out, delete_user_cb=lambda user: user is not cast_out)
        cast_out.meta["val"] = node.meta["val"]
        node.meta["val"] = node.meta["val"].to(dtype)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
