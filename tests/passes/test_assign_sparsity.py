"""assign_sparsity alone and in planning: which layers get 2:4 weights, and why, without compiling."""

import pytest
import torch
from torch import nn

import kiln
from kiln.budget import Budget
from kiln.errors import OptionsError
from kiln.hardware_profiles import load
from kiln.ir import LAYER_META
from kiln.options import CompileOptions
from kiln.passes.assign_precision import assign_precision
from kiln.passes.assign_sparsity import assign_sparsity
from kiln.passes.context import PassContext
from kiln.precision.sparsity import prune_2_4


class Mlp(nn.Module):
    """fc1 and fc2 large enough to pay; fc3's 254 inputs are no whole groups of 4; head too small."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, 254)
        self.fc3 = nn.Linear(254, 128)
        self.head = nn.Linear(128, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def _model(nearly_sparse_fc1: bool = False) -> Mlp:
    torch.manual_seed(0)
    model = Mlp().eval()
    if nearly_sparse_fc1:  # fc1 already 2:4 up to a tiny residue: pruning it costs almost nothing
        with torch.no_grad():
            model.fc1.weight.copy_(prune_2_4(model.fc1.weight) + 1e-5 * torch.randn_like(model.fc1.weight))
    return model


def _decide(run_pass, model, profile="a100", precision="fp16", **options):
    run = run_pass(model, (torch.randn(4, 256),))
    opts = CompileOptions(precision=precision, sparsity="2:4", **options)
    run.ctx = PassContext(load(profile), opts, run.captured.input_spec, run.inputs)
    run.apply(assign_precision)
    result = run.apply(assign_sparsity)
    plans = {n.meta[LAYER_META].weight.split(".")[-2]: n.meta[LAYER_META] for n in run.gm.graph.nodes if LAYER_META in n.meta}
    return run, result, plans


def test_a_lax_budget_prunes_every_eligible_layer_and_says_why_the_others_stay_dense(run_pass):
    run, result, plans = _decide(run_pass, _model(), accuracy_budget=Budget(min_cosine=0.5))
    assert not result.changed and result.counts == {"sparse": 2, "layers": 4}
    assert plans["fc1"].sparsity == plans["fc2"].sparsity == "2:4"
    assert all(plans[name].sparsity_error > 0 and "keeps the budget" in plans[name].sparsity_reason for name in ("fc1", "fc2"))
    assert plans["fc3"].sparsity is None and "no sparse lowering takes its shape" in plans["fc3"].sparsity_reason
    assert "254 input channels" in plans["fc3"].sparsity_reason  # TensorRT's refusal, named
    assert plans["head"].sparsity is None and "too small to pay" in plans["head"].sparsity_reason
    assert {s.node for s in result.skipped} == {n.name for n in run.gm.graph.nodes if LAYER_META in n.meta
                                                and n.meta[LAYER_META].sparsity is None}
    decision = next(n.meta["kiln"] for n in run.gm.graph.nodes if n.name == plans["fc1"].node)
    assert any(r.startswith("sparsity: 2:4 keeps the budget") for r in decision.reasons)
    run.assert_same_numerics()  # decide only: the graph's weights are untouched


def test_a_tight_budget_backs_off_the_layer_that_costs_most(run_pass):
    _, _, lax = _decide(run_pass, _model(nearly_sparse_fc1=True), accuracy_budget=Budget(min_cosine=0.5))
    assert lax["fc1"].sparsity_error < lax["fc2"].sparsity_error / 10
    between = (lax["fc1"].sparsity_error + lax["fc2"].sparsity_error) / 2
    _, result, plans = _decide(run_pass, _model(nearly_sparse_fc1=True), accuracy_budget=Budget(max_rel_error=between))
    assert result.counts["sparse"] == 1
    assert plans["fc1"].sparsity == "2:4" and plans["fc2"].sparsity is None
    assert "would exceed the budget" in plans["fc2"].sparsity_reason


def test_a_budget_too_tight_for_any_pruning_keeps_every_layer_dense(run_pass):
    _, result, plans = _decide(run_pass, _model(), accuracy_budget=Budget(min_cosine=0.99999))
    assert result.counts["sparse"] == 0
    assert all("would exceed the budget" in plans[name].sparsity_reason for name in ("fc1", "fc2"))


def test_layers_left_at_fp32_stay_dense_because_sparse_tensor_cores_need_a_lower_precision(run_pass):
    _, result, plans = _decide(run_pass, _model(), precision="fp32", accuracy_budget=Budget(min_cosine=0.5))
    assert result.counts["sparse"] == 0
    assert "computes at fp32" in plans["fc1"].sparsity_reason


@pytest.mark.parametrize("profile, device", [("t4", "NVIDIA T4"), ("cpu-x86", "cpu")])
def test_a_profile_without_sparse_tensor_cores_refuses_the_option_naming_profile_and_device(run_pass, profile, device):
    with pytest.raises(OptionsError) as in_the_pass:
        _decide(run_pass, _model(), profile=profile, precision="fp32")
    with pytest.raises(OptionsError) as before_any_work:  # optimize() refuses before capturing the model
        kiln.optimize(_model(), profile, torch.randn(4, 256), sparsity="2:4", cache=False)
    for caught in (in_the_pass, before_any_work):
        message = str(caught.value)
        assert f"profile {profile}" in message and device in message and "sparse tensor cores" in message
        assert "options.sparsity" in message and "a100" in message  # where, and the fix


def test_a_forced_backend_without_a_sparse_lowering_refuses_the_option(run_pass):
    with pytest.raises(OptionsError, match="none of the backends tried on device gpu"):
        _decide(run_pass, _model(), precision="fp32", backend="onnxruntime")


def test_planning_for_a100_shows_each_layers_sparsity_decision():
    planned = kiln.plan(_model(), "a100", torch.randn(4, 256),
                        options=CompileOptions(precision="fp16", sparsity="2:4", accuracy_budget=Budget(min_cosine=0.5)))
    text = planned.render()
    assert "Sparsity (2 of 4 weighted layers pruned to 2:4)" in text
    rows = {row["weight"].split(".")[-2]: row for row in planned.report.precision}
    assert rows["fc1"]["sparsity"] == "2:4" and rows["head"]["sparsity"] is None
    assert "too small to pay" in text


def test_sparsity_is_part_of_the_compile_cache_key():
    assert CompileOptions(sparsity="2:4").cache_fields() != CompileOptions().cache_fields()
    with pytest.raises(OptionsError, match="did you mean '2:4'"):
        CompileOptions(sparsity="2:8")
