"""Lowering a precision plan onto kiln's ONNX export: each planned layer reaches the ONNX node
that computes with its weight, whatever names re-export gives the fx nodes, and everything
else stays float and reads float inputs, as the sensitivity analysis simulated it."""

import dataclasses

import numpy
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from kiln.backends.onnxruntime import export_onnx
from kiln.backends.onnxruntime_precision import lower
from kiln.ir import LayerPlan, PrecisionPlan, Scheme

from backends.conftest import make_partition


class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + self.b(x))


def _renumbered_partition():
    """A partition whose linear nodes are named out of graph order, as passes leave them; its
    re-export renumbers them linear, linear_1, linear_2 in order."""
    torch.manual_seed(0)
    partition, _ = make_partition(ThreeLayers().eval(), (torch.randn(4, 16),))
    linears = [n for n in partition.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    for node, name in zip(linears, ("linear_9", "linear", "linear_1")):
        node.name = name
    partition.gm.recompile()
    return partition, linears


def _weight_of(node) -> str:
    return str(node.args[1].target)


def _quantised_weights(model) -> set[str]:
    """Names of the int8 initializers a DequantizeLinear reads: the quantised weights."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].dtype == numpy.int8}


def test_static_int8_quantises_the_planned_layer_even_when_re_export_renumbers_its_fx_node(tmp_path):
    partition, (first, second, third) = _renumbered_partition()
    # only the second layer ("linear" in the partition, "linear_1" once re-exported) is planned,
    # with a range no other layer's input has
    plan = PrecisionPlan([LayerPlan(first.name, "linear", _weight_of(first)),
                          LayerPlan(second.name, "linear", _weight_of(second), Scheme.INT8_STATIC, input_range=(-7.0, 9.0)),
                          LayerPlan(third.name, "linear", _weight_of(third))])
    partition = dataclasses.replace(partition, precision=plan, calibration=(partition.example_inputs,))
    path = tmp_path / "p0.onnx"
    program = export_onnx(partition, path)
    summary = lower(path, partition, program)
    assert summary == "int8-static: 1 ONNX nodes from 1 layers"
    model = onnx.load(str(path))
    # the ONNX initializers keep the weights' attribute names: only the second layer's is int8
    assert _quantised_weights(model) == {_weight_of(second) + "_quantized"}
    # and its input is quantised over the planned range (-7, 9), not over another layer's
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    (activation_q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert float(inits[activation_q.input[1]]) == pytest.approx(16.0 / 255, rel=1e-3)


def test_matmuls_the_plan_does_not_name_stay_float_and_read_their_inputs_unrounded(tmp_path):
    class Attention(nn.Module):  # q @ kᵀ and the weights @ v carry no weight: never quantised
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            q = self.proj(x)
            return torch.softmax(q @ x.transpose(-1, -2), -1) @ x

    torch.manual_seed(0)
    partition, _ = make_partition(Attention().eval(), (torch.randn(2, 4, 8),))
    proj = next(n for n in partition.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    plan = PrecisionPlan([LayerPlan(proj.name, "linear", _weight_of(proj), Scheme.INT8_STATIC, input_range=(-3.0, 3.0))])
    partition = dataclasses.replace(partition, precision=plan, calibration=(partition.example_inputs,))
    path = tmp_path / "p0.onnx"
    lower(path, partition, export_onnx(partition, path))
    model = onnx.load(str(path))
    fed_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantised = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & fed_by_dq]
    plain = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and not set(n.input) & fed_by_dq]
    assert len(quantised) == 1 and len(plain) == 2
    # x is rounded for the projection only; the attention's own reads of x see the float input
    readers_of_x = [n for n in model.graph.node if "x" in n.input]
    assert {n.op_type for n in readers_of_x} >= {"QuantizeLinear", "MatMul"} and len(readers_of_x) >= 3


def test_onnx_runtime_keeps_the_integers_kiln_rounded_each_weight_to(tmp_path):
    from kiln.precision.lowering import with_lowered_weights
    from kiln.precision.schemes import per_channel_int8

    partition, linears = _renumbered_partition()
    plan = PrecisionPlan([LayerPlan(n.name, "linear", _weight_of(n), Scheme.INT8_STATIC, input_range=(-4.0, 4.0))
                          for n in linears])
    partition = dataclasses.replace(partition, precision=plan, calibration=(partition.example_inputs,))
    path = tmp_path / "p0.onnx"
    built = with_lowered_weights(partition)
    lower(path, built, export_onnx(built, path))
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = dict(partition.gm.named_parameters())
    for node in linears:
        name = _weight_of(node)
        q, scale = inits[name + "_quantized"].astype(numpy.float32), inits[name + "_scale"]
        dequantised = q * scale.reshape(-1, 1)  # Gemm with transposed B: per row, as torch stores it
        kiln_rounded = per_channel_int8(weights[name].detach()).numpy()
        numpy.testing.assert_allclose(dequantised, kiln_rounded, rtol=1e-6, atol=1e-7)


def test_static_int8_layers_on_rank_3_activations_run_onnx_runtimes_integer_kernel(settings):
    # a transformer's layers see (batch, tokens, hidden): left on, ORT's MatMulAddFusion turns
    # DequantizeLinear -> MatMul + Add into a float Reshape-Gemm-Reshape that no integer kernel takes
    from kiln.backends import registry
    from kiln.precision.lowering import with_lowered_weights

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model, x = FeedForward().eval(), torch.randn(1, 16, 32)
    partition, _ = make_partition(model, (x,))
    with torch.no_grad():
        ranges = [(float(x.min()), float(x.max())), (0.0, float(torch.relu(model.up(x)).max()))]
    linears = [n for n in partition.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    plan = PrecisionPlan([LayerPlan(n.name, "linear", _weight_of(n), Scheme.INT8_STATIC, input_range=r)
                          for n, r in zip(linears, ranges)])
    partition = with_lowered_weights(dataclasses.replace(partition, precision=plan, calibration=((x,),)))
    engine = registry.get("onnxruntime").compile(partition, settings)
    assert "MatMulIntegerToFloat 2" in engine.summary and "MatMulAddFusion" in engine.summary
    with torch.no_grad():
        want = partition.gm(x)[0]
    got = engine(x)[0]
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
