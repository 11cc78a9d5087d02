import math

import torch

from kiln.types import Precision
from kiln.verify import TOLERANCE, compare, failures_text


def test_fp32_tolerance_is_the_tightest_float_tolerance():
    fp32 = TOLERANCE[Precision.FP32]
    assert all(fp32.rtol <= t.rtol and fp32.atol <= t.atol for t in TOLERANCE.values())


def test_compare_accepts_differences_inside_the_precisions_tolerance():
    want = torch.randn(64)
    (check,) = compare(["y"], [want + 5e-5], [want], Precision.FP32)
    assert check.ok and check.max_abs_error < 6e-5 and check.cosine > 0.9999


def test_compare_rejects_and_names_an_output_beyond_tolerance():
    want = torch.randn(64)
    got = want.clone()
    got[3] += 0.01
    checks = compare(["a", "b"], [want, got], [want, want], Precision.FP32)
    assert [c.ok for c in checks] == [True, False]
    text = failures_text(checks, Precision.FP32)
    assert "'b'" in text and "0.01" in text


def test_compare_requires_nan_and_inf_in_the_same_places_as_eager():
    want = torch.tensor([1.0, math.nan, math.inf])
    assert compare(["y"], [want.clone()], [want])[0].ok
    assert not compare(["y"], [torch.tensor([1.0, 0.0, math.inf])], [want])[0].ok
    assert not compare(["y"], [torch.tensor([1.0, math.nan, -math.inf])], [want])[0].ok


def test_compare_rejects_shape_or_dtype_changes():
    assert not compare(["y"], [torch.zeros(2, 3)], [torch.zeros(3, 2)])[0].ok
    assert not compare(["y"], [torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)])[0].ok


def test_compare_requires_integer_outputs_to_be_equal():
    ids = torch.tensor([1, 2, 3])
    assert compare(["ids"], [ids.clone()], [ids])[0].ok
    assert not compare(["ids"], [ids + 1], [ids])[0].ok


def test_a_budget_holds_per_example_so_one_bad_row_of_a_batch_fails_it():
    from kiln.budget import Budget
    from kiln.verify import output_error, worst_per_example

    torch.manual_seed(0)
    want = torch.randn(8, 1000) * torch.tensor([10.0] * 7 + [1.0])[:, None]  # seven large rows, one small
    got = want.clone()
    got[7] += 0.3 * torch.randn(1000)  # only the small row is off
    whole, _ = output_error(got, want)
    worst, worst_rel = worst_per_example(got, want)
    assert whole > 0.999 > 0.99 > worst  # over the batch the error hides; per example it shows
    (check,) = compare(["logits"], [got], [want], budget=Budget(min_cosine=0.99))
    assert not check.ok and check.cosine == worst and check.rel_error == worst_rel
    (one,) = compare(["logits"], [got[:1]], [want[:1]], budget=Budget(min_cosine=0.99))  # a batch of one: the row itself
    assert one.ok
