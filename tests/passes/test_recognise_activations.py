import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kiln.passes.recognise_activations import recognise_activations

aten = torch.ops.aten

FORMS = {
    "gelu_erf": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_erf_halved_last": lambda x: x * (1.0 + torch.erf(x * 0.7071067811865476)) / 2,
    "gelu_tanh_gpt2": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_tanh_factored": lambda x: x * 0.5 * (1 + torch.tanh(x * 0.7978845608 * (1 + 0.044715 * x * x))),
    "silu": lambda x: x * torch.sigmoid(x),
    "hardswish_relu6": lambda x: x * F.relu6(x + 3) / 6,
    "hardswish_clamp": lambda x: x * torch.clamp(x + 3, 0, 6) / 6,
    "hardswish_nested_clamps": lambda x: x * (torch.clamp(x + 3, min=0).clamp(max=6) / 6),
    "hardsigmoid_relu6": lambda x: F.relu6(x + 3) / 6,
    "hardsigmoid_hardtanh": lambda x: F.hardtanh(x + 3, 0.0, 6.0) * (1 / 6),
}
EXPECTED = {
    "gelu_erf": ("gelu", aten.gelu.default, {}),
    "gelu_erf_halved_last": ("gelu", aten.gelu.default, {}),
    "gelu_tanh_gpt2": ("gelu_tanh", aten.gelu.default, {"approximate": "tanh"}),
    "gelu_tanh_factored": ("gelu_tanh", aten.gelu.default, {"approximate": "tanh"}),
    "silu": ("silu", aten.silu.default, {}),
    "hardswish_relu6": ("hardswish", aten.hardswish.default, {}),
    "hardswish_clamp": ("hardswish", aten.hardswish.default, {}),
    "hardswish_nested_clamps": ("hardswish", aten.hardswish.default, {}),
    "hardsigmoid_relu6": ("hardsigmoid", aten.hardsigmoid.default, {}),
    "hardsigmoid_hardtanh": ("hardsigmoid", aten.hardsigmoid.default, {}),
}


class Formula(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class AfterLinear(nn.Module):
    """The activation's input is a linear's output, used by every term of the formula."""

    def __init__(self, fn):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.fc(x))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_recognise_activations_turns_each_written_form_into_one_op(run_pass, form):
    run = run_pass(Formula(FORMS[form]), (torch.randn(4, 5, 8) * 3,))
    result = run.apply(recognise_activations)
    name, op, kwargs = EXPECTED[form]
    assert result.counts[name] == 1 and sum(result.counts.values()) == 1 and result.skipped == ()
    (node,) = [n for n in run.gm.graph.nodes if n.op == "call_function"]
    assert node.target is op and dict(node.kwargs) == kwargs
    assert node.args[0].op == "placeholder"
    run.assert_same_numerics()


@pytest.mark.parametrize("form", ["gelu_erf", "gelu_tanh_gpt2", "silu", "hardswish_relu6"])
def test_recognise_activations_applies_the_op_to_the_linear_output(run_pass, form):
    run = run_pass(AfterLinear(FORMS[form]), (torch.randn(3, 6),))
    run.apply(recognise_activations)
    assert run.ops() == [aten.linear.default, EXPECTED[form][1]]
    run.assert_same_numerics()


NEAR_MISSES = {
    "quick_gelu": (lambda x: x * torch.sigmoid(1.702 * x), "sigmoid(1.702·"),
    "gelu_wrong_half": (lambda x: 0.6 * x * (1 + torch.erf(x / math.sqrt(2))), "constants differ"),
    "gelu_wrong_sqrt2": (lambda x: 0.5 * x * (1 + torch.erf(x / 1.4)), "constants differ"),
    "gelu_tanh_wrong_cubic": (lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.05 * x ** 3))),
                              "constants differ"),
    "hardswish_divided_by_5": (lambda x: x * F.relu6(x + 3) / 5, "not 1/6"),
    "hardsigmoid_clamp_0_5": (lambda x: torch.clamp(x + 3, 0, 5) / 6, "not [0, 6]"),
    "hardsigmoid_offset_2": (lambda x: F.relu6(x + 2) / 6, "adds 2 before clamping"),
}


@pytest.mark.parametrize("form", sorted(NEAR_MISSES))
def test_recognise_activations_leaves_near_misses_unchanged_with_the_reason(run_pass, form):
    fn, reason = NEAR_MISSES[form]
    run = run_pass(Formula(fn), (torch.randn(4, 8),))
    before = run.ops()
    result = run.apply(recognise_activations)
    assert not result.changed and run.ops() == before
    assert len(result.skipped) == 1 and reason in result.skipped[0].reason


class Gates(nn.Module):
    def forward(self, a, b):
        return a * torch.sigmoid(b), a * (1 + torch.tanh(b)) * 0.5


def test_recognise_activations_ignores_gates_over_another_tensor(run_pass):
    run = run_pass(Gates(), (torch.randn(4, 8), torch.randn(4, 8)))
    result = run.apply(recognise_activations)
    assert not result.changed and result.skipped == ()
