"""What backends build lowered layers from: int8 weights on kiln's grid and corrected biases,
bf16/fp16 weights on their type's values with each channel's sum kept, in a copy of the
partition's graph. The user's model, whose parameters the captured graph shares, keeps
its own values."""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import kiln
from kiln.precision.lowering import with_lowered_weights
from kiln.ir import LayerPlan, PrecisionPlan, Scheme
from kiln.precision.schemes import float_grid, per_channel_int8

from backends.conftest import make_partition


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _partition_with_plan(shift_conv=(0.5,) * 8, shift_fc=(0.25, -0.25, 0.0, 1.0)):
    torch.manual_seed(0)
    partition, _ = make_partition(ConvThenLinear().eval(), (torch.randn(2, 3, 8, 8),))
    conv, fc = [n for n in partition.gm.graph.nodes if n.op == "call_function" and str(n.target).startswith(("aten.conv", "aten.linear"))]
    plan = PrecisionPlan([
        LayerPlan(conv.name, "conv", str(conv.args[1].target), Scheme.INT8_STATIC, input_range=(-3.0, 3.0), bias_shift=shift_conv),
        LayerPlan(fc.name, "linear", str(fc.args[1].target), Scheme.INT8_STATIC, input_range=(0.0, 2.0), bias_shift=shift_fc)])
    return dataclasses.replace(partition, precision=plan), conv, fc


def test_int8_layers_get_rounded_weights_and_corrected_biases_in_a_new_graph_module():
    partition, conv, fc = _partition_with_plan()
    params = dict(partition.gm.named_parameters())
    before = {name: value.clone() for name, value in params.items()}
    built = with_lowered_weights(partition)
    assert built.gm is not partition.gm
    got = {name: value for name, value in [*built.gm.named_parameters(), *built.gm.named_buffers()]}
    for layer in (conv, fc):
        weight = str(layer.args[1].target)
        assert torch.equal(got[weight], per_channel_int8(before[weight]))
    fc_bias = str(fc.args[2].target)
    torch.testing.assert_close(got[fc_bias], before[fc_bias] - torch.tensor([0.25, -0.25, 0.0, 1.0]))
    # the conv had no bias: it gets one that takes the shift off
    new_conv = next(n for n in built.gm.graph.nodes if n.name == conv.name)
    torch.testing.assert_close(got[str(new_conv.args[2].target)], torch.full((8,), -0.5))
    x = partition.example_inputs[0]
    conv_w, fc_w = (per_channel_int8(before[str(n.args[1].target)]) for n in (conv, fc))
    hidden = torch.relu(torch.nn.functional.conv2d(x, conv_w) - 0.5).mean((2, 3))
    want = torch.nn.functional.linear(hidden, fc_w, got[fc_bias])
    with torch.no_grad():
        torch.testing.assert_close(built.gm(x)[0], want)
    for name, value in dict(partition.gm.named_parameters()).items():
        assert torch.equal(value, before[name]), f"{name} of the partition was written"


class TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_smoothed_layers_reading_one_input_share_one_division_and_take_their_weights_columns_scaled():
    torch.manual_seed(0)
    partition, _ = make_partition(TwoReaders().eval(), (torch.randn(3, 8),))
    a, b = [n for n in partition.gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.linear")]
    smooth = tuple(float(v) for v in torch.linspace(0.5, 4.0, 8))
    plan = PrecisionPlan([LayerPlan(n.name, "linear", str(n.args[1].target), Scheme.INT8_STATIC, input_range=(-2.0, 2.0),
                                    smooth=smooth) for n in (a, b)])
    before = {name: value.clone() for name, value in partition.gm.named_parameters()}
    built = with_lowered_weights(dataclasses.replace(partition, precision=plan))
    muls = [n for n in built.gm.graph.nodes if n.op == "call_function" and "mul" in str(n.target)]
    assert len(muls) == 1  # one division, which both layers read: the input is quantised once
    readers = [n for n in built.gm.graph.nodes if n.name in (a.name, b.name)]
    assert all(n.args[0] is muls[0] for n in readers)
    divisor = torch.tensor(smooth)
    got = dict(built.gm.named_parameters())
    x = partition.example_inputs[0]
    want = sum(torch.nn.functional.linear(x * (1 / divisor), per_channel_int8(before[str(n.args[1].target)] * divisor),
                                          before[str(n.args[2].target)]) for n in (a, b))
    for n in (a, b):
        assert torch.equal(got[str(n.args[1].target)], per_channel_int8(before[str(n.args[1].target)] * divisor))
    with torch.no_grad():
        torch.testing.assert_close(built.gm(x)[0], want)
    for name, value in partition.gm.named_parameters():
        assert torch.equal(value, before[name]), f"{name} of the partition was written"


def test_a_plan_without_lowered_layers_builds_from_the_partition_as_it_is():
    partition, conv, fc = _partition_with_plan()
    fp32 = PrecisionPlan([dataclasses.replace(layer, scheme=Scheme.FP32, input_range=None, bias_shift=None)
                          for layer in partition.precision.layers])
    unchanged = dataclasses.replace(partition, precision=fp32)
    assert with_lowered_weights(unchanged) is unchanged


@pytest.mark.parametrize("scheme, dtype", [(Scheme.BF16, torch.bfloat16), (Scheme.FP16, torch.float16)])
def test_float_layers_get_weights_their_type_holds_exactly_with_each_channels_sum_kept(scheme, dtype):
    partition, conv, fc = _partition_with_plan()
    plan = PrecisionPlan([dataclasses.replace(layer, scheme=scheme, input_range=None, bias_shift=None)
                          for layer in partition.precision.layers])
    before = {name: value.clone() for name, value in partition.gm.named_parameters()}
    built = with_lowered_weights(dataclasses.replace(partition, precision=plan))
    got = dict(built.gm.named_parameters())
    for layer in (conv, fc):
        weight = str(layer.args[1].target)
        rounded, exact = got[weight], before[weight]
        assert torch.equal(rounded, float_grid(exact, dtype))
        assert torch.equal(rounded.to(dtype).float(), rounded)  # a backend's own cast changes nothing
        sums = lambda w: w.double().reshape(w.shape[0], -1).sum(1)
        plain = exact.to(dtype).float()
        assert bool(((sums(rounded) - sums(exact)).abs() <= (sums(plain) - sums(exact)).abs()).all())
    fc_bias = str(fc.args[2].target)
    assert torch.equal(got[fc_bias], before[fc_bias])  # a float layer's bias has no correction
    for name, value in dict(partition.gm.named_parameters()).items():
        assert torch.equal(value, before[name]), f"{name} of the partition was written"


def test_a_weight_other_nodes_also_read_keeps_its_values():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight  # the weight is read by the layer and by a matmul

    torch.manual_seed(0)
    partition, _ = make_partition(Tied().eval(), (torch.randn(2, 8),))
    fc = next(n for n in partition.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    plan = PrecisionPlan([LayerPlan(fc.name, "linear", str(fc.args[1].target), Scheme.INT8_DYNAMIC)])
    built = with_lowered_weights(dataclasses.replace(partition, precision=plan))
    weight = str(fc.args[1].target)
    assert torch.equal(dict(built.gm.named_parameters())[weight], dict(partition.gm.named_parameters())[weight])


@pytest.mark.parametrize("backend", ["onnxruntime", "inductor", "openvino"])
def test_an_int8_build_leaves_the_users_model_as_it_was(backend):
    if backend == "inductor":
        pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    calibration = [(torch.randn(8, 64),) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = kiln.optimize(model, "cpu-x86", (torch.randn(8, 64),), backend=backend, precision="int8",
                                 calibration=calibration, accuracy_budget=kiln.Budget(min_cosine=0.99), cache=False)
    assert "int8-static for 2 of 2 layers" in compiled.report.precision_summary
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{backend}'s int8 build wrote the user's {name}"


class ConvReluPadConv(nn.Module):
    def __init__(self, second_reader: bool = False):
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3)
        self.second_reader = second_reader

    def forward(self, x):
        y = nn.functional.relu6(self.first(x))
        z = self.second(nn.functional.pad(y, (1, 1, 1, 1)))
        return z + y.mean() if self.second_reader else z


def _casts(gm) -> list[str]:
    return [str(n.kwargs["dtype"]) for n in gm.graph.nodes if n.target is torch.ops.aten._to_copy.default]


@pytest.mark.parametrize("second_reader", [False, True])
def test_two_bf16_layers_share_their_activation_in_bf16_through_ops_exact_in_it(second_reader, monkeypatch):
    from kiln.frontend.capture import capture
    from kiln.precision import lowering

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = capture(ConvReluPadConv(second_reader).eval(), (x,)).gm
    layers = {n.name for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)}
    lowered = lowering.cast_layers(gm, layers, torch.bfloat16)
    if second_reader:  # relu6's output feeds the mean at fp32 too: it is cast up once, and down again
        assert _casts(lowered) == ["torch.bfloat16", "torch.float32", "torch.bfloat16", "torch.float32"]
    else:  # cast down once at the input, up once at the output
        assert _casts(lowered) == ["torch.bfloat16", "torch.float32"]
    monkeypatch.setattr(lowering, "_stay_low_between_layers", lambda gm, dtype: None)
    each_layer_cast = lowering.cast_layers(gm, layers, torch.bfloat16)
    assert _casts(each_layer_cast) == ["torch.bfloat16", "torch.float32", "torch.bfloat16", "torch.float32"]
    with torch.no_grad():  # relu6 and zero padding are exact in bf16: the same values either way
        assert torch.equal(lowered(x)[0], each_layer_cast(x)[0])
