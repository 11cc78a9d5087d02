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


def test_under_a_budget_random_draws_are_held_to_the_precisions_relative_tolerance_not_the_budget():
    from kiln.budget import Budget
    from kiln.verify import worst_checks

    torch.manual_seed(0)
    want = torch.randn(4, 256)
    off = want + 0.02 * want.norm(dim=1, keepdim=True) / 16 * torch.randn(4, 256)  # relative L2 error ~0.02
    budget = Budget()  # relative error <= 1e-2
    example, draw = (list([want + 1e-4 * torch.randn(4, 256)]), [want]), ([off], [want])
    # the same 2% error passes on a random draw (bf16 allows 3e-2 there) and fails on the user's inputs
    (on_draw,) = worst_checks(["y"], [example, draw], Precision.BF16, budget, synthetic={1})
    assert on_draw.ok and on_draw.on_budget and on_draw.rel_error < 1e-3  # the budget's figures come from the example
    (on_example,) = worst_checks(["y"], [draw, example], Precision.BF16, budget, synthetic={1})
    assert not on_example.ok and on_example.on_budget
    assert "budget: cosine >= 0.9999" in failures_text([on_example], Precision.BF16, budget)


def test_a_random_draw_an_engine_gets_wrong_fails_under_any_budget():
    from kiln.budget import Budget
    from kiln.verify import worst_checks

    want = torch.randn(4, 256)
    broken = ([torch.zeros(4, 256)], [want])
    (check,) = worst_checks(["y"], [([want], [want]), broken], Precision.BF16, Budget(min_cosine=0.5), synthetic={1})
    assert not check.ok and not check.on_budget
    assert "on a random draw (allowed 0.03 at bf16)" in failures_text([check], Precision.BF16, Budget(min_cosine=0.5))


def test_under_a_budget_routing_choices_may_flip_where_near_tied_but_not_wholesale():
    from kiln.budget import Budget

    want = torch.arange(40).reshape(20, 2) % 8
    flipped_one = want.clone()
    flipped_one[3] = (want[3] + 1) % 8  # one token's two choices changed: 95% agree
    scrambled = (want + 3) % 8
    budget = Budget(min_cosine=0.999)
    ok, = compare(["topk_index"], [flipped_one], [want], Precision.BF16, budget, choices={"topk_index"})
    assert ok.ok and "agree on 95.0%" in ok.detail
    bad, = compare(["topk_index"], [scrambled], [want], Precision.BF16, budget, choices={"topk_index"})
    assert not bad.ok and "agree on 0.0%" in bad.detail
    # not a routing choice, or no budget (an fp32 plan): integers must be equal
    assert not compare(["argmax"], [flipped_one], [want], Precision.BF16, budget, choices={"topk_index"})[0].ok
    assert not compare(["topk_index"], [flipped_one], [want], Precision.FP32, None, choices={"topk_index"})[0].ok
