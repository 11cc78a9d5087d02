"""assign_precision alone: decisions and their reasons, without compiling anything."""

import pytest
import torch
from torch import nn

from kiln.budget import Budget
from kiln.errors import OptionsError
from kiln.hardware_profiles import load
from kiln.options import CompileOptions
from kiln.passes.assign_precision import assign_precision, auto_candidates
from kiln.passes.context import PassContext
from kiln.ir import LAYER_META, Scheme
from kiln.types import Precision


class Head(nn.Module):
    """conv -> pool -> linear -> relu -> layer_norm -> linear -> softmax: every kind of node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)
        self.fc1 = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return torch.softmax(self.fc2(self.norm(torch.relu(self.fc1(y)))), -1)


def _run(run_pass, model=None, profile="cpu-x86", calibrate=False, shape=(2, 3, 8, 8), **options):
    torch.manual_seed(0)
    model = (model or Head()).eval()
    run = run_pass(model, (torch.randn(*shape),))
    samples = tuple((torch.randn(*shape),) for _ in range(6)) if calibrate else ()
    opts = CompileOptions(calibration=[s[0] for s in samples] or None, **options)
    run.ctx = PassContext(load(profile), opts, run.captured.input_spec, run.inputs, samples)
    result = run.apply(assign_precision)
    return run, result


def _plans(run):
    return {n.name: n.meta[LAYER_META] for n in run.gm.graph.nodes if LAYER_META in n.meta}


def test_every_op_node_gets_a_decision_with_a_reason_and_the_graph_is_unchanged(run_pass):
    run, result = _run(run_pass, precision="bf16")
    assert not result.changed
    for node in run.gm.graph.nodes:
        if node.op == "call_function":
            assert node.meta["kiln"].reasons and node.meta["kiln"].reasons[0]
    run.assert_same_numerics()


def test_fragile_ops_stay_fp32_by_rule(run_pass):
    run, _ = _run(run_pass, precision="bf16")
    decisions = {str(n.target): n.meta["kiln"] for n in run.gm.graph.nodes if n.op == "call_function"}
    for op in ("aten.softmax.int", "aten.layer_norm.default", "aten.mean.dim"):
        assert decisions[op].precision is Precision.FP32
        assert "fp32 by rule" in decisions[op].reasons[0]


def test_explicit_bf16_lowers_every_layer_and_records_each_error(run_pass):
    run, result = _run(run_pass, precision="bf16")
    plans = _plans(run)
    assert set(plans) == {"conv2d", "linear", "linear_1"}
    assert all(p.scheme == Scheme.BF16 and 0 < p.error < 1e-2 for p in plans.values())
    assert result.counts == {"lowered": 3, "layers": 3}
    assert plans["linear"].weight.endswith("fc1.weight")


def test_auto_without_calibration_never_picks_an_integer_type(run_pass):
    run, _ = _run(run_pass)  # default: precision="auto", Budget()
    schemes = {p.scheme for p in _plans(run).values()}
    assert schemes <= {Scheme.FP32, Scheme.BF16}
    assert Scheme.BF16 in schemes  # cpu-x86 runs bf16 (AVX512_BF16) through Inductor


def test_auto_with_only_onnxruntime_and_no_calibration_keeps_fp32(run_pass):
    # ONNX Runtime has no fast bf16 on CPU, and integer types need calibration data
    run, result = _run(run_pass, backend="onnxruntime")
    assert all(p.scheme == Scheme.FP32 for p in _plans(run).values())
    assert result.counts["lowered"] == 0


def test_auto_with_calibration_picks_static_int8_with_calibrated_ranges(run_pass):
    run, _ = _run(run_pass, calibrate=True, backend="onnxruntime")
    plans = _plans(run)
    assert plans["linear"].scheme == plans["linear_1"].scheme == Scheme.INT8_STATIC
    assert plans["conv2d"].scheme == Scheme.FP32 and "too small" in plans["conv2d"].reason  # 864 weights
    lo, hi = plans["linear_1"].input_range
    assert lo <= 0 <= hi and hi > 0  # the input of fc2 is a layer-normed activation


def test_a_dynamic_batch_stays_dynamic_after_precision_is_decided(run_pass):
    # Layer sizes feed the plan (multiply-adds); reading a symbolic size must not pin the batch.
    torch.manual_seed(0)
    run = run_pass(Head().eval(), (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: "batch"}})
    samples = tuple((torch.randn(2, 3, 8, 8),) for _ in range(6))
    opts = CompileOptions(calibration=[s[0] for s in samples])
    run.ctx = PassContext(load("cpu-x86"), opts, run.captured.input_spec, run.inputs, samples)
    run.apply(assign_precision)
    assert any(p.scheme != Scheme.FP32 for p in _plans(run).values())
    wider = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(run.gm(wider)[0], run.reference(wider)[0])


def test_auto_leaves_tiny_layers_at_fp32(run_pass):
    run, _ = _run(run_pass, model=nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), calibrate=True)
    (plan,) = _plans(run).values()
    assert plan.scheme == Scheme.FP32 and "too small" in plan.reason


def test_auto_keeps_a_small_kernel_over_a_large_image_a_candidate(run_pass):
    # 3x3 kernels from 3 to 8 channels: 216 weights, but 27 multiply-adds for each of the 127k
    # outputs over a 128x128 image (3.4M): an image model's first convolutions do much work
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    # (on ONNX Runtime, which builds no int8 and bf16 mix: a mix would take the small layer at bf16)
    run, _ = _run(run_pass, model=model, calibrate=True, shape=(1, 3, 128, 128), accuracy_budget=Budget(min_cosine=0.99),
                  backend="onnxruntime")
    plans = _plans(run)
    assert plans["conv2d"].scheme == Scheme.INT8_STATIC, plans["conv2d"].reason
    assert plans["conv2d_1"].scheme == Scheme.FP32  # 32 weights, 0.5M multiply-adds
    assert "too small" in plans["conv2d_1"].reason and "multiply-adds" in plans["conv2d_1"].reason


class Outlier(nn.Module):
    """The middle layer's input has one huge feature that its weights ignore: a per-tensor int8
    scale sized for that feature rounds every other input to zero, so that layer is far more
    sensitive than its neighbours."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(48, 64), nn.Linear(64, 64), nn.Linear(64, 48)
        with torch.no_grad():
            self.a.bias[0] = 1000.0
            self.b.weight[:, 0] = 0.0

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x.flatten(1)[:, :48])))))


def test_the_most_sensitive_layer_stays_fp32_when_the_budget_cannot_afford_it(run_pass):
    run, result = _run(run_pass, model=Outlier(), precision="int8")
    plans = _plans(run)
    assert plans["linear_1"].scheme == Scheme.FP32
    assert "exceed the budget" in plans["linear_1"].reason
    assert plans["linear"].scheme == Scheme.INT8_DYNAMIC  # no calibration: activations quantised per call
    assert plans["linear_1"].error > plans["linear"].error
    assert any(s.node == "linear_1" for s in result.skipped)


def test_auto_tries_int8_on_top_of_every_layer_at_bf16_where_a_backend_builds_the_mix(run_pass):
    run, result = _run(run_pass, model=Outlier(), calibrate=True, shape=(2, 48), backend="openvino")
    plans = _plans(run)
    assert plans["linear_2"].scheme == Scheme.INT8_STATIC
    assert plans["linear"].scheme == plans["linear_1"].scheme == Scheme.BF16  # every layer lowered: the mix is built so
    assert "bf16 keeps the budget" in plans["linear_1"].reason and "int8-static on top would exceed the budget" in plans["linear_1"].reason
    # the single-scheme plans stay behind it, for the precision search to build if the mix fails
    alternatives = dict(result.decided["alternatives"])
    assert alternatives[Scheme.INT8_STATIC]["linear_1"].scheme == Scheme.FP32
    # all bf16 was estimated to save nearly as much: the precision search times the two
    assert result.decided["alternatives"][0][0] == Scheme.BF16 and result.decided["race_runner_up"]


def test_no_mix_is_proposed_where_no_tried_backend_builds_one(run_pass):
    run, result = _run(run_pass, model=Outlier(), calibrate=True, shape=(2, 48), backend="onnxruntime")
    plans = _plans(run)
    assert plans["linear_1"].scheme == Scheme.FP32 and {p.scheme for p in plans.values()} == {Scheme.FP32, Scheme.INT8_STATIC}
    assert all("+" not in str(scheme) for scheme, _ in result.decided["alternatives"])


def test_no_mix_is_proposed_when_the_user_keeps_a_layer_at_fp32(run_pass):
    run, result = _run(run_pass, model=Outlier(), calibrate=True, shape=(2, 48), backend="openvino", keep_fp32=("c",))
    for plans in (_plans(run), *(other for _, other in result.decided["alternatives"])):
        assert plans["linear_2"].scheme == Scheme.FP32
        assert not {Scheme.INT8_STATIC, Scheme.BF16} <= {p.scheme for p in plans.values()}


def test_a_looser_budget_lowers_more_layers(run_pass):
    tight, _ = _run(run_pass, model=Outlier(), precision="int8")
    loose, _ = _run(run_pass, model=Outlier(), precision="int8", accuracy_budget=Budget(min_cosine=0.0))
    count = lambda run: sum(p.scheme != Scheme.FP32 for p in _plans(run).values())  # noqa: E731
    assert count(loose) > count(tight)


def test_a_sensitive_final_layer_stays_fp32(run_pass):
    model = Outlier()
    with torch.no_grad():  # move the outlier to the input of the last layer
        model.a.bias[0], model.b.weight[:, 0] = 0.0, 0.1
        model.b.bias[0], model.c.weight[:, 0] = 1000.0, 0.0
    run, _ = _run(run_pass, model=model, precision="int8")
    final = _plans(run)["linear_2"]
    assert final.scheme == Scheme.FP32 and "final layer, sensitive" in final.reason


def test_int4_weight_only_takes_linear_layers_only(run_pass):
    run, _ = _run(run_pass, precision="int4-weight", int4_group_size=32, accuracy_budget=Budget(min_cosine=0.99))
    plans = _plans(run)
    assert plans["conv2d"].scheme == Scheme.FP32 and "linear layers only" in plans["conv2d"].reason
    assert plans["linear"].scheme == Scheme.INT4_WEIGHT and plans["linear"].group_size == 32


def test_the_default_budget_keeps_layers_whose_fp8_error_it_cannot_afford(run_pass):
    run, _ = _run(run_pass, profile="h100", precision="fp8")
    plans = _plans(run)
    assert all(p.scheme == Scheme.FP32 for p in plans.values())
    assert all(p.error > 1e-2 / 2 for p in plans.values())  # each figure that kept it there is recorded


def test_fp8_is_assigned_on_h100(run_pass):
    run, _ = _run(run_pass, profile="h100", precision="fp8", accuracy_budget=Budget(min_cosine=0.99))
    assert {p.scheme for p in _plans(run).values()} == {Scheme.FP8}


def test_keep_fp32_holds_the_named_module_at_fp32_and_lowers_the_rest(run_pass):
    run, result = _run(run_pass, precision="bf16", keep_fp32=("fc1",))
    plans = _plans(run)
    assert plans["linear"].scheme == Scheme.FP32 and plans["linear"].reason == "kept fp32 by keep_fp32='fc1'"
    assert plans["conv2d"].scheme == plans["linear_1"].scheme == Scheme.BF16
    assert result.counts == {"lowered": 2, "layers": 3}
    assert run.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)[0].meta["kiln"].precision \
        is Precision.FP32


def test_keep_fp32_under_auto_spends_the_budget_on_the_other_layers(run_pass):
    run, _ = _run(run_pass, calibrate=True, backend="onnxruntime", keep_fp32=("linear_1",))  # a node name works too
    plans = _plans(run)
    assert plans["linear_1"].scheme == Scheme.FP32 and "keep_fp32" in plans["linear_1"].reason
    assert plans["linear"].scheme == Scheme.INT8_STATIC


def test_keep_fp32_naming_nothing_is_an_error_listing_module_paths(run_pass):
    with pytest.raises(OptionsError, match="keep_fp32 'fc3' matches no node") as info:
        _run(run_pass, precision="bf16", keep_fp32=("fc3",))
    assert info.value.where == "options.keep_fp32"
    assert "top-level modules: conv, fc1, fc2, norm" in info.value.fix
    with pytest.raises(OptionsError, match="did you mean 'norm'"):
        _run(run_pass, precision="bf16", keep_fp32=("nrom",))


def test_explicit_fp32_lowers_nothing(run_pass):
    run, result = _run(run_pass, precision="fp32")
    assert all(p.scheme == Scheme.FP32 and "fp32" in p.reason for p in _plans(run).values())
    assert result.counts["lowered"] == 0


class FakeQuantized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 48)

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x.flatten(1)[:, :48], 0.05, 0, -128, 127)
        return self.fc(x)


def test_a_model_with_fake_quant_nodes_is_honoured_not_requantised(run_pass):
    run, result = _run(run_pass, model=FakeQuantized(), precision="int8", calibrate=True)
    assert all(p.scheme == Scheme.FP32 for p in _plans(run).values())
    assert result.counts["lowered"] == 0
    assert "already carries" in result.skipped[0].reason
    assert "kept as is" in next(n for n in run.gm.graph.nodes if n.name == "linear").meta["kiln"].reasons[0]


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_each_observer_gives_a_range_holding_zero(run_pass, observer):
    run, _ = _run(run_pass, calibrate=True, precision="int8", calibration_observer=observer,
                  accuracy_budget=Budget(min_cosine=0.99))
    lo, hi = _plans(run)["linear"].input_range
    assert lo <= 0 <= hi and hi - lo > 0


def test_a_plan_is_measured_on_every_calibration_sample_that_verification_will_check(run_pass):
    # 40 samples: 32 that int8 rounds finely, then 8 faint ones, whose values use a small part of
    # the range the others set; int8 costs them the budget. A plan measured on the first 32 alone
    # would lower the layer and then fail verification on the faint ones.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False)).eval()  # no bias to hide the faint outputs' error
    run = run_pass(model, (torch.randn(4, 64),))
    samples = tuple((torch.randn(4, 64),) for _ in range(32)) + tuple((0.05 * torch.randn(4, 64),) for _ in range(8))
    opts = CompileOptions(calibration=[s[0] for s in samples], precision="int8", accuracy_budget=Budget(min_cosine=0.99))
    run.ctx = PassContext(load("cpu-x86"), opts, run.captured.input_spec, run.inputs, samples)
    run.apply(assign_precision)
    (plan,) = _plans(run).values()
    assert plan.scheme == Scheme.FP32
    assert "would exceed the budget" in plan.reason

    loud_only = PassContext(load("cpu-x86"), CompileOptions(calibration=[s[0] for s in samples[:32]], precision="int8",
                                                            accuracy_budget=Budget(min_cosine=0.99)),
                            run.captured.input_spec, run.inputs, samples[:32])
    run_loud = run_pass(model, (torch.randn(4, 64),))
    run_loud.ctx = loud_only
    run_loud.apply(assign_precision)
    assert all(p.scheme == Scheme.INT8_STATIC for p in _plans(run_loud).values())  # the faint samples decide it


def test_auto_candidates_follow_the_profile_and_need_calibration_for_integers():
    cpu = load("cpu-x86").primary
    assert auto_candidates(cpu, cpu.backends, calibrated=False) == [Precision.BF16]
    assert auto_candidates(cpu, cpu.backends, calibrated=True) == [Precision.INT8, Precision.BF16]
    assert auto_candidates(cpu, ("onnxruntime",), calibrated=False) == []
    h100 = load("h100").primary
    assert Precision.FP8 in auto_candidates(h100, h100.backends, calibrated=False)


def test_static_int8_spends_half_of_a_cosine_allowance_and_other_schemes_most_of_it():
    from kiln.passes.assign_precision import INT8_STATIC_COSINE_FRACTION, SPEND_FRACTION, _spendable

    budget = Budget(min_cosine=0.99, max_rel_error=0.1)
    int8, bf16 = _spendable(budget, Scheme.INT8_STATIC), _spendable(budget, Scheme.BF16)
    assert int8.min_cosine == pytest.approx(1 - 0.01 * INT8_STATIC_COSINE_FRACTION)
    assert bf16.min_cosine == pytest.approx(1 - 0.01 * SPEND_FRACTION)
    assert int8.max_rel_error == bf16.max_rel_error == pytest.approx(0.1 * SPEND_FRACTION)


class Stack(nn.Module):
    """Six linear layers with ReLUs between: int8 errors add up as more are lowered."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())])

    def forward(self, x):
        return self.layers(x)


def _int8_stack(run_pass, samples, budget):
    torch.manual_seed(0)
    run = run_pass(Stack().eval(), (torch.randn(8, 64),))
    opts = CompileOptions(calibration=[s[0] for s in samples], precision="int8", accuracy_budget=budget)
    run.ctx = PassContext(load("cpu-x86"), opts, run.captured.input_spec, run.inputs, samples)
    run.apply(assign_precision)
    return _plans(run)


def test_static_int8_spends_most_of_a_cosine_allowance_where_the_plan_holds_on_held_out_samples(run_pass):
    torch.manual_seed(1)
    samples = tuple((torch.randn(8, 64),) for _ in range(6))
    budget = Budget(min_cosine=0.9999)
    plans = _int8_stack(run_pass, samples, budget)
    lowered = [p for p in plans.values() if p.scheme == Scheme.INT8_STATIC]
    assert lowered and all("holds on held-out calibration samples" in p.reason for p in lowered)
    # half the allowance, what a plan without held-out samples spends, lowers fewer layers
    halved = _int8_stack(run_pass, samples[:1], budget)
    assert sum(p.scheme == Scheme.INT8_STATIC for p in halved.values()) < len(lowered)


def test_static_int8_spends_half_of_a_cosine_allowance_where_held_out_samples_run_past_its_ranges(run_pass):
    torch.manual_seed(1)
    spike = torch.cat([torch.tensor([6.0]), torch.ones(63)])
    samples = tuple((torch.randn(8, 64) * (spike if k % 2 else 1),) for k in range(6))
    plans = _int8_stack(run_pass, samples, Budget(min_cosine=0.9999))
    lowered = [p for p in plans.values() if p.scheme == Scheme.INT8_STATIC]
    assert lowered and all("half the cosine allowance: the larger plan went past 90% of the budget" in p.reason
                           for p in lowered)
