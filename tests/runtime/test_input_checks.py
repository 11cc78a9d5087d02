"""Call-time input checks of a CompiledModel, as two tables over one compiled model.

MISMATCHES: calls the compiled model must refuse with an InputMismatch whose first line
(`where: what`) names the culprit input, so a user reads which argument to fix without
decoding a structure dump. WORKING: calls that must run and equal eager PyTorch at the fp32
tolerance, including the awkward-but-valid ones (views with odd strides, NaN and Inf).

The model is compiled once per module: x positional with a dynamic batch (1..8), bias as a
keyword sharing that batch, and a bool setting baked in as a constant.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.errors import InputMismatch
from kiln.verify import TOLERANCE

TOL = TOLERANCE[kiln.Precision.FP32]
MAX_BATCH = 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, bias, squash: bool = False):
        y = self.lin(x) + bias
        return torch.tanh(y) if squash else y


@pytest.fixture(scope="module")
def model() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def compiled(model) -> kiln.CompiledModel:
    torch.manual_seed(1)
    return kiln.optimize(model, "cpu-x86", (torch.randn(2, 4),),
                         example_kwargs={"bias": torch.randn(2, 3), "squash": True},
                         dynamic={"x": {0: kiln.Dim("batch", 1, MAX_BATCH)}, "bias": {0: "batch"}},
                         backend="onnxruntime")


def test_compiled_spec_is_x_and_bias_sharing_the_batch_with_the_flag_baked_in(compiled):
    spec = compiled.input_spec

    assert spec.names == ("x", "bias")
    assert spec.dims() == {"batch": kiln.Dim("batch", 1, MAX_BATCH)}
    assert spec.constants == (True,)


def x_(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4)


def bias_(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3)


Call = Callable[[], tuple[tuple, dict]]


def call(*args: Any, **kwargs: Any) -> Call:
    """A call built lazily, so each test draws its own tensors."""
    def build() -> tuple[tuple, dict]:
        draw = lambda value: value() if callable(value) else value  # noqa: E731
        return tuple(draw(a) for a in args), {k: draw(v) for k, v in kwargs.items()}
    return build


MISMATCHES = [
    # count and keywords
    pytest.param(call(x_, squash=True), ["bias"], id="missing-tensor-input"),
    pytest.param(call(x_, bias_, bias=bias_, squash=True), [r"\b2 positional", r"\b1 compiled"], id="extra-positional-input"),
    pytest.param(call(x_, bias=bias_), ["squash"], id="missing-constant-setting"),
    pytest.param(call(x_, bias=bias_, squash=True, scale=2.0), ["scale"], id="unknown-keyword"),
    pytest.param(call(x_, bais=bias_, squash=True), ["bais"], id="misspelled-keyword"),
    # dtype, rank, static size, dynamic range
    pytest.param(call(lambda: x_().double(), bias=bias_, squash=True), ["x", "float64"], id="wrong-dtype-float64"),
    pytest.param(call(x_, bias=lambda: bias_().long(), squash=True), ["bias", "int64"], id="wrong-dtype-int64"),
    pytest.param(call(lambda: x_()[0], bias=bias_, squash=True), ["x", "rank"], id="rank-too-low"),
    pytest.param(call(lambda: x_()[None], bias=bias_, squash=True), ["x", "rank"], id="rank-too-high"),
    pytest.param(call(lambda: torch.randn(2, 5), bias=bias_, squash=True), ["x", "axis 1"], id="wrong-static-size"),
    pytest.param(call(x_, bias=lambda: torch.randn(2, 4), squash=True), ["bias", "axis 1"],
                 id="wrong-static-size-second-input"),
    pytest.param(call(lambda: x_(MAX_BATCH + 1), bias=lambda: bias_(MAX_BATCH + 1), squash=True), ["x", "batch"],
                 id="batch-above-range"),
    pytest.param(call(lambda: x_(0), bias=lambda: bias_(0), squash=True), ["x", "batch"], id="batch-below-range"),
    pytest.param(call(lambda: x_(3), bias=lambda: bias_(2), squash=True), ["bias", "x", "batch"],
                 id="shared-dim-disagrees"),
    # a non-tensor where a tensor belongs
    pytest.param(call(x_, bias=None, squash=True), ["bias", "NoneType"], id="none-for-tensor"),
    pytest.param(call(x_, bias=1.5, squash=True), ["bias", "float"], id="float-for-tensor"),
    pytest.param(call(lambda: x_().numpy(), bias=bias_, squash=True), ["x", "ndarray"], id="ndarray-for-tensor"),
    pytest.param(call(lambda: [x_()], bias=bias_, squash=True), ["x"], id="list-for-tensor"),
    pytest.param(call(x_, bias=lambda: (bias_(),), squash=True), ["bias"], id="tuple-for-tensor"),
    pytest.param(call(lambda: x_().to("meta"), bias=bias_, squash=True), ["x", "meta"], id="tensor-on-other-device"),
    # the baked-in constant
    pytest.param(call(x_, bias=bias_, squash=False), ["squash"], id="changed-constant"),
    pytest.param(call(x_, bias=bias_, squash=None), ["squash"], id="constant-replaced-by-none"),
    pytest.param(call(x_, bias=bias_, squash=lambda: torch.ones(3)), ["squash"], id="tensor-for-constant"),
]


@pytest.mark.parametrize("make_call, culprits", MISMATCHES)
def test_call_that_does_not_match_the_compiled_inputs_is_refused_naming_the_input(compiled, make_call, culprits):
    args, kwargs = make_call()

    with pytest.raises(InputMismatch) as info:
        compiled(*args, **kwargs)

    first_line = str(info.value).split("\n")[0]  # "where: what"; the fix follows on its own line
    for culprit in culprits:
        pattern = culprit if culprit.startswith("\\b") else rf"(?<!\w){re.escape(culprit)}(?!\w)"
        assert re.search(pattern, first_line), f"{culprit!r} not named in: {first_line}"
    assert info.value.fix, "an InputMismatch says what to do"


def strided(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """A tensor of `shape` that is a non-contiguous (or offset) view of a larger one."""
    rows, cols = shape
    if kind == "transposed":
        return torch.randn(cols, rows).t()
    if kind == "expanded":
        return torch.randn(1, cols).expand(rows, cols)
    if kind == "every-other-column":
        return torch.randn(rows, 2 * cols)[:, ::2]
    if kind == "offset-rows":
        return torch.randn(rows + 3, cols)[3:]
    raise ValueError(kind)


def with_nonfinite(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, bias = x_(batch), bias_(batch)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    x[2, 0] = -float("inf")
    bias[3, 2] = float("nan")
    bias[4, 0] = float("inf")
    bias[4, 1] = -float("inf")
    return x, bias


def nonfinite_call(squash: bool) -> Call:
    def make():
        x, bias = with_nonfinite(5)
        return (x,), {"bias": bias, "squash": squash}
    return make


WORKING = [
    pytest.param(call(x_, bias=bias_, squash=True), id="as-compiled"),
    pytest.param(call(lambda: x_(1), bias=lambda: bias_(1), squash=True), id="batch-at-range-min"),
    pytest.param(call(lambda: x_(MAX_BATCH), bias=lambda: bias_(MAX_BATCH), squash=True), id="batch-at-range-max"),
    pytest.param(call(lambda: strided((5, 4), "transposed"), bias=lambda: strided((5, 3), "transposed"), squash=True),
                 id="transposed-views"),
    pytest.param(call(lambda: strided((5, 4), "expanded"), bias=lambda: strided((5, 3), "expanded"), squash=True),
                 id="expanded-views"),
    pytest.param(call(lambda: strided((5, 4), "every-other-column"), bias=lambda: bias_(5), squash=True),
                 id="strided-view"),
    pytest.param(call(lambda: strided((4, 4), "offset-rows"), bias=lambda: strided((4, 3), "offset-rows"), squash=True),
                 id="views-with-storage-offset"),
    pytest.param(call(lambda: x_(3).requires_grad_(), bias=lambda: bias_(3), squash=True), id="input-requiring-grad"),
    pytest.param(nonfinite_call(squash=True), id="nan-and-inf-through-tanh"),
    pytest.param(call(x_, bias=bias_, squash=1), id="equal-constant-of-another-type"),
    pytest.param(call(x_, squash=True, bias=bias_), id="keywords-in-another-order"),
    # bound to forward()'s signature as Python binds the eager call
    pytest.param(call(x_, bias_, squash=True), id="keyword-input-passed-positionally"),
    pytest.param(call(x=x_, bias=bias_, squash=True), id="positional-input-passed-by-keyword"),
    pytest.param(call(x_, bias_, True), id="every-input-passed-positionally"),
]


@pytest.mark.parametrize("make_call", WORKING)
def test_valid_call_runs_and_equals_eager(compiled, model, make_call):
    args, kwargs = make_call()
    before = [t.clone() for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]

    got = compiled(*args, **kwargs)
    with torch.no_grad():
        want = model(*args, **kwargs)

    torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol, equal_nan=True)
    after = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)  # inputs are left as they were


def test_nan_and_inf_land_where_eager_puts_them(compiled, model):
    x, bias = with_nonfinite(5)

    got = compiled(x, bias=bias, squash=True)
    with torch.no_grad():
        want = model(x, bias=bias, squash=True)

    assert torch.isnan(want).any() and torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isinf(got)], want[torch.isinf(want)])


def test_nan_and_inf_propagate_through_the_linear_path_like_eager():
    """Without the squash, Inf survives to the output; compiled separately with squash=False."""
    torch.manual_seed(0)
    model = Net().eval()
    compiled = kiln.optimize(model, "cpu-x86", (torch.randn(5, 4),),
                             example_kwargs={"bias": torch.randn(5, 3), "squash": False}, backend="onnxruntime")
    x, bias = with_nonfinite(5)

    got = compiled(x, bias=bias, squash=False)
    with torch.no_grad():
        want = model(x, bias=bias, squash=False)

    assert torch.isinf(want).any() and torch.isnan(want).any()
    torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol, equal_nan=True)


def test_outputs_of_an_earlier_call_are_not_overwritten_by_a_later_one(compiled):
    first = compiled(x_(), bias=bias_(), squash=True)
    kept = first.clone()

    compiled(x_(), bias=bias_(), squash=True)

    assert torch.equal(first, kept)


def test_input_mismatch_is_a_kiln_error(compiled):
    with pytest.raises(kiln.KilnError):
        compiled(np.zeros((2, 4), dtype=np.float32), bias=bias_(), squash=True)


def test_a_positional_setting_is_checked_like_a_keyword_one():
    class Flagged(nn.Module):
        def forward(self, x, double):
            return x * 2 if double else x

    compiled = kiln.optimize(Flagged(), "cpu-x86", (torch.randn(2, 3), True), backend="onnxruntime", cache=False)
    x = torch.randn(2, 3)
    torch.testing.assert_close(compiled(x, True), x * 2)
    with pytest.raises(InputMismatch, match="double"):
        compiled(x, False)
    with pytest.raises(InputMismatch):
        compiled(x)
