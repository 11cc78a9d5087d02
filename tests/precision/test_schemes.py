"""The simulated schemes round like the kernels they stand for; observers bound ranges."""

import pytest
import torch

from kiln.ir import LayerPlan, PrecisionPlan, Scheme
from kiln.precision.schemes import (Observer, affine_uint8, fake_input, fake_weight, float_grid, groupwise_int4,
                                    per_channel_int8)
from kiln.types import Precision


def test_per_channel_int8_puts_each_row_on_its_grid_within_a_step_and_keeps_its_sum():
    torch.manual_seed(0)
    weight = torch.randn(16, 9) * torch.linspace(0.01, 10, 16).unsqueeze(1)  # 3x3 kernels of very different scale
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    q = per_channel_int8(weight) / step
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)  # integers on each row's own grid
    assert float(q.abs().max()) <= 127 + 1e-4
    assert bool(((q - weight / step).abs() < 1).all())  # no weight moves by a whole step
    sum_error = (q.sum(dim=1) - (weight / step).sum(dim=1)).abs()
    assert float(sum_error.max()) <= 0.5 + 1e-4  # the row's sum is kept to within half a step
    plain = ((weight / step).round().sum(dim=1) - (weight / step).sum(dim=1)).abs()
    assert float(plain.max()) > 1  # which plain rounding does not do
    torch.testing.assert_close(per_channel_int8(weight).abs().amax(dim=1), weight.abs().amax(dim=1))  # the grid is unchanged


def test_groupwise_int4_keeps_values_on_its_grid_and_pads_a_partial_group():
    grid = torch.arange(16, dtype=torch.float32).repeat(3, 2)[:, :40]  # 40 columns: one full group of 32 and a partial one
    torch.testing.assert_close(groupwise_int4(grid, 32), grid)
    noisy = grid + torch.rand_like(grid) * 0.3
    assert float((groupwise_int4(noisy, 32) - noisy).abs().max()) <= (15.3 / 15) / 2 + 1e-5


def test_affine_uint8_clips_outside_the_calibrated_range_and_keeps_zero_exact():
    x = torch.tensor([-2.0, 0.0, 0.5, 1.0, 5.0])
    q = affine_uint8(x, -1.0, 1.0)
    assert float(q[1]) == 0.0
    assert abs(float(q[0]) + 1.0) < 1e-2 and abs(float(q[4]) - 1.0) < 1e-2


def test_bf16_and_fp16_round_to_their_significant_bits():
    x = torch.tensor([1.0 + 2**-10, 3.0])
    assert float(fake_input(x, Scheme.BF16)[0]) == 1.0  # 8 significant bits lose 2^-10
    assert float(fake_input(x, Scheme.FP16)[0]) == 1.0 + 2**-10  # 11 keep it


@pytest.mark.parametrize("scheme, dtype", [(Scheme.BF16, torch.bfloat16), (Scheme.FP16, torch.float16)])
def test_bf16_and_fp16_weights_stay_within_a_step_of_their_values_and_keep_each_channels_sum(scheme, dtype):
    torch.manual_seed(0)
    weight = torch.randn(32, 1, 3, 3) * torch.logspace(-3, 1, 32).reshape(-1, 1, 1, 1)  # depthwise 3x3 kernels
    rounded = fake_weight(weight, scheme)
    assert torch.equal(rounded, float_grid(weight, dtype))
    assert torch.equal(rounded.to(dtype).float(), rounded)  # values of the type
    low = weight.to(dtype)
    steps = torch.maximum((torch.nextafter(low, torch.full_like(low, float("inf"))).float() - low.float()).abs(),
                          (torch.nextafter(low, torch.full_like(low, float("-inf"))).float() - low.float()).abs())
    assert bool(((rounded - weight).abs() < steps).all())  # no weight moves by a whole step
    sums = lambda w: w.reshape(32, -1).double().sum(1)
    kept, plain = (sums(rounded) - sums(weight)).abs(), (sums(low.float()) - sums(weight)).abs()
    assert bool((kept <= plain + 1e-12).all())  # never worse than rounding each weight to nearest
    assert float(kept.sum()) < 0.6 * float(plain.sum())
    assert torch.equal(float_grid(rounded, dtype), rounded)  # values already in the type stay


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float_grid_moves_as_many_weights_as_a_wide_row_lost_steps(dtype):
    # each weight of a 1024-wide row sits 0.4 of a step off a value of the type: rounding to
    # nearest loses about 410 steps, many more weights than the first top-k looks at
    low = torch.full((3, 1024), 1.5).to(dtype)  # 1.5: a step is the same size either side
    step = float(torch.nextafter(low[0, 0], torch.tensor(2.0, dtype=dtype)).float() - 1.5)
    weight = low.float() + 0.4 * step * torch.tensor([[1.0], [-1.0], [0.0]])  # above, below, exact
    rounded = float_grid(weight, dtype)
    moves = (rounded - 1.5) / step
    assert (moves == 1).sum(dim=1).tolist() == [410, 0, 0] and (moves == -1).sum(dim=1).tolist() == [0, 410, 0]
    assert bool((moves.abs() <= 1).all())
    lost = ((rounded - weight).double().sum(dim=1) / step).abs()
    assert bool((lost <= 0.5).all())  # each row's sum within half a step


def test_fp8_scales_per_tensor_so_large_weights_survive():
    weight = torch.tensor([[1000.0, -500.0, 3.0]])
    rounded = fake_weight(weight, Scheme.FP8)
    assert torch.allclose(rounded, weight, rtol=0.07)


def test_observers_narrow_the_range_around_an_outlier():
    torch.manual_seed(0)
    data = torch.cat([torch.randn(100_000), torch.tensor([80.0])])
    ranges = {}
    for kind in ("minmax", "percentile", "mse"):
        observer = Observer(kind)
        for chunk in data.split(20_000):
            observer.update(chunk)
        ranges[kind] = observer.range()
    assert ranges["minmax"][1] == 80.0
    assert ranges["percentile"][1] < 10 and ranges["mse"][1] < 80.0
    assert all(lo <= 0 <= hi for lo, hi in ranges.values())


def test_percentile_and_mse_ranges_draw_on_every_calibration_sample_not_the_first_few():
    # 8 quiet samples, then 8 loud ones: a range from the first samples' values alone misses the loud half
    generator = torch.Generator().manual_seed(0)
    for kind in ("percentile", "mse"):
        observer = Observer(kind)
        for scale in [1.0] * 8 + [10.0] * 8:
            observer.update(torch.randn(20_000, generator=generator) * scale)
        lo, hi = observer.range()
        assert hi > 15 and lo < -15, (kind, lo, hi)


def test_mse_clips_each_end_of_the_range_on_its_own():
    # a dense [-1, 1] with one far outlier above: the top is clipped hard, the bottom not at all
    data = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.tensor([80.0])])
    observer = Observer("mse")
    observer.update(data)
    lo, hi = observer.range()
    assert lo == -1.0 or lo < -0.99
    assert hi < 20


def test_a_plan_round_trips_through_json_and_names_its_lowest_precision():
    plan = PrecisionPlan([LayerPlan("linear", "linear", "fc.weight", Scheme.INT8_STATIC, 1e-3, "why", (-1.0, 2.0)),
                          LayerPlan("conv2d", "conv", "conv.weight")])
    again = PrecisionPlan.from_dict(plan.to_dict())
    assert again.layers == plan.layers and again.lowest() is Precision.INT8
    assert [layer.node for layer in again.lowered] == ["linear"]


@pytest.mark.parametrize("group_size", [32, 128])
def test_the_int4_kernel_form_dequantises_to_kiln_group_wise_rounding(group_size):
    from kiln.backends.inductor_precision import int4_tinygemm

    torch.manual_seed(0)
    weight = torch.randn(48, 256) * torch.linspace(0.1, 3.0, 256)
    q, scale_and_zero = int4_tinygemm(weight, group_size)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    scale, zero = scale_and_zero[..., 0].T, scale_and_zero[..., 1].T  # [N, K / group]
    dequantised = (q.reshape(48, -1, group_size) - 8) * scale[..., None] + zero[..., None]
    torch.testing.assert_close(dequantised.reshape(48, 256), groupwise_int4(weight, group_size), rtol=0, atol=1e-5)
    # and PyTorch's packed CPU kernel computes with exactly those weights
    x = torch.randn(5, 256)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)
    torch.testing.assert_close(got, x @ groupwise_int4(weight, group_size).T, rtol=1e-4, atol=1e-4)
