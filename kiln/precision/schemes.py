"""Numeric schemes simulated in fp32 ("fake quantisation"), and calibration observers.

Each scheme rounds a layer's weight and input activation the way its lowering does, then the
layer runs in fp32, which is what fp32 accumulation computes:

    bf16 / fp16   W rounded to the type keeping each output channel's sum (`float_grid`); x and the bias
                  rounded to the type; output rounded to the type (activations are stored in it)
    fp8 e4m3      x, W scaled per tensor to the e4m3 range (amax / 448), cast, scaled back
    int8 static   W per output channel, symmetric int8 keeping each channel's sum (`int8_grid`);
                  x per tensor, affine uint8 over a calibrated range
    int8 dynamic  as static, but x's range is taken from each call's own min/max
    int4 weight   W group-wise along the input axis (32/64/128), affine uint4 with a zero point per group

Sensitivity analysis runs these to measure each layer's error before any backend builds; the
backends' own kernels then realise the same rounding (ONNX Runtime QDQ and MatMulNBits, PT2E).
"""

from __future__ import annotations

import torch

from kiln.ir import Scheme

FP8_MAX = 448.0  # largest finite float8_e4m3fn
RESERVOIR = 65536  # values an observer keeps for percentile and MSE searches
FLOAT_GRID_FIRST_K = 64  # float_grid's first top-k per row, widened 4x while a row needs more


def fake_weight(weight: torch.Tensor, scheme: str, group_size: int = 128) -> torch.Tensor:
    if scheme in (Scheme.BF16, Scheme.FP16):
        return float_grid(weight, _float_type(scheme))
    if scheme == Scheme.FP8:
        return _fp8(weight)
    if scheme in (Scheme.INT8_STATIC, Scheme.INT8_DYNAMIC):
        return per_channel_int8(weight)
    if scheme == Scheme.INT4_WEIGHT:
        return groupwise_int4(weight, group_size)
    return weight


def fake_input(x: torch.Tensor, scheme: str, input_range: tuple[float, float] | None = None) -> torch.Tensor:
    if scheme in (Scheme.BF16, Scheme.FP16):
        return x.to(_float_type(scheme)).float()
    if scheme == Scheme.FP8:
        return _fp8(x)
    if scheme == Scheme.INT8_STATIC:
        lo, hi = input_range if input_range is not None else (float(x.min()), float(x.max()))
        return affine_uint8(x, lo, hi)
    if scheme == Scheme.INT8_DYNAMIC:
        return affine_uint8(x, float(x.min()), float(x.max()))
    return x  # int4 is weight-only


def fake_bias(bias, scheme: str):
    """A float layer's bias is stored in its type too (its kernel takes one dtype): a
    batch-norm-folded bias can be large beside the output it shifts, and rounding it cost
    EfficientNet-Lite0's bf16 plans a third of their error. Integer schemes keep an fp32 bias."""
    if isinstance(bias, torch.Tensor) and scheme in (Scheme.BF16, Scheme.FP16):
        return bias.to(_float_type(scheme)).float()
    return bias


def fake_output(y: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme in (Scheme.BF16, Scheme.FP16, Scheme.FP8):  # fp8 GEMMs write bf16
        return y.to(torch.float16 if scheme == Scheme.FP16 else torch.bfloat16).float()
    return y


def _float_type(scheme: str) -> torch.dtype:
    return torch.bfloat16 if scheme == Scheme.BF16 else torch.float16


def _fp8(t: torch.Tensor) -> torch.Tensor:
    amax = float(t.abs().max())
    if amax == 0:
        return t
    scale = amax / FP8_MAX
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


def per_channel_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel (axis 0): the grid ONNX Runtime's per_channel=True
    uses, with the sum-keeping rounding of `int8_grid`, which the lowerings hand to it."""
    return int8_grid(weight.reshape(weight.shape[0], -1)).reshape(weight.shape)


def int8_grid(rows: torch.Tensor) -> torch.Tensor:
    """Each row rounded onto its own symmetric int8 grid (scale = absmax / 127), keeping the
    row's sum as close as whole steps allow. Plain rounding moves a small kernel's sum (its
    response to a flat region) by up to half a step per weight: on EfficientNet-Lite0's first
    depthwise 3x3 layer that alone cost 0.2 relative output error, 0.025 with the sum kept.
    The steps the sum lost go to the weights closest to rounding the other way; weights on
    ±127 never move, so a runtime that derives the scale from the rounded weights (ONNX
    Runtime, PT2E with a [-127, 127] range) lands on the same grid and the same integers."""
    scale = (rows.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    exact = rows / scale
    q = torch.clamp(torch.round(exact), -127, 127)
    lost = torch.round(exact.sum(dim=1, keepdim=True) - q.sum(dim=1, keepdim=True))
    direction = lost.sign()
    closeness = ((exact - q) * direction).masked_fill(q.abs() >= 127, float("-inf"))
    rank = closeness.argsort(dim=1, descending=True).argsort(dim=1)
    moved = (rank < lost.abs()) & torch.isfinite(closeness)
    return (q + moved * direction) * scale


def float_grid(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` rounded to values of `dtype` (bf16 or fp16), returned in fp32, keeping each
    output channel's sum (axis 0) as close as the type's steps allow: `int8_grid`'s rounding on
    a float grid. Rounding each weight to nearest moves a small kernel's sum, its response to a
    flat region, by up to half a step per weight; on EfficientNet-Lite0 with every layer bf16
    that was a quarter of the output error (relative L2 error 0.024, 0.018 with the sums kept).
    The sum's lost steps go to the weights closest to rounding the other way, each at most one
    step from its value. The result is exact in `dtype`, so a backend's own cast keeps it."""
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    low = rows.to(dtype)
    near = low.float()
    residual = rows - near  # exact in fp32: `near` is `rows` rounded to fewer significand bits
    lost = residual.sum(dim=1, keepdim=True, dtype=torch.float64)
    direction = lost.sign()
    towards = torch.where(direction > 0, float("inf"), float("-inf")).to(dtype).expand_as(low)
    step = torch.nextafter(low, towards).float() - near  # one step of the type, towards the lost sum
    closeness = residual * direction.float() / step.abs()
    closeness = closeness.masked_fill((closeness <= 0) | ~torch.isfinite(step), float("-inf"))
    # Only the closest few weights of a row ever move (its lost sum is a few steps), so the
    # ordering is a top-k, widened until every row's k steps cover its lost sum or run out of
    # weights that may move: a full sort of each row cost BERT-base's analysis 4 s.
    width, k = rows.shape[1], min(rows.shape[1], FLOAT_GRID_FIRST_K)
    while True:
        top, order = closeness.topk(k, dim=1)
        steps = step.gather(1, order).double().masked_fill(~torch.isfinite(top), 0.0)
        reached = steps.cumsum(dim=1)
        covered = (reached[:, -1:].abs() >= lost.abs()) | ~torch.isfinite(top[:, -1:])
        if k == width or bool(covered.all()):
            break
        k = min(width, 4 * k)
    left = (lost - torch.cat([torch.zeros_like(lost), reached], dim=1)).abs()  # |lost| after j moves
    count = left.argmin(dim=1, keepdim=True)
    moved = torch.zeros_like(rows, dtype=torch.bool).scatter(1, order, torch.arange(k).expand(rows.shape[0], k) < count)
    return torch.where(moved, near + step, near).reshape(weight.shape)


def affine_uint8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-tensor affine uint8 over [lo, hi] widened to hold 0 (so zero padding stays exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        return x
    scale = (hi - lo) / 255.0
    zero_point = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return (q - zero_point) * scale


def groupwise_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Affine uint4 per group of `group_size` input features; a partial last group is padded."""
    rows, cols = weight.shape[0], weight[0].numel()
    q, scale, zero_point = groupwise_uint4(weight.reshape(rows, cols), group_size)
    deq = ((q - zero_point) * scale).reshape(rows, -1)[:, :cols]
    return deq.reshape(weight.shape)


def groupwise_uint4(rows: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rounding of `groupwise_int4` for a 2-d weight: (q in 0..15 as [N, groups, group_size],
    scale and zero point as [N, groups, 1]); a partial last group is zero-padded."""
    padded = torch.nn.functional.pad(rows.float(), (0, (-rows.shape[1]) % group_size))
    groups = padded.reshape(rows.shape[0], -1, group_size)
    lo = groups.amin(dim=2, keepdim=True).clamp(max=0)
    hi = groups.amax(dim=2, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    zero_point = torch.round(-lo / scale)
    q = torch.clamp(torch.round(groups / scale) + zero_point, 0, 15)
    return q, scale, zero_point


class Observer:
    """Collects an activation's range over calibration samples: exact min/max plus a random
    reservoir of values for the percentile and MSE searches."""

    def __init__(self, kind: str = "minmax", seed: int = 0):
        self.kind = kind
        self.lo, self.hi = float("inf"), float("-inf")
        self.values: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if self.kind != "minmax":
            take = min(x.numel(), RESERVOIR // 8)
            self.values.append(x[torch.randint(0, x.numel(), (take,), generator=self.generator)])

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            return 0.0, 0.0
        if self.kind == "minmax" or not self.values:
            return self.lo, self.hi
        sample = torch.cat(self.values)
        if sample.numel() > RESERVOIR:  # an equal share of every calibration sample, not the first few samples' values
            sample = sample[torch.randperm(sample.numel(), generator=self.generator)[:RESERVOIR]]
        if self.kind == "percentile":
            lo, hi = torch.quantile(sample, torch.tensor([1e-4, 1 - 1e-4])).tolist()
            return min(lo, 0.0), max(hi, 0.0)
        return _mse_range(sample, self.lo, self.hi)


# Clipping factors the MSE search tries for each end of the range: 1.0 down to ~0.2, finer near 1
MSE_FACTORS = tuple(0.96 ** k for k in range(40))


def _mse_range(sample: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """The clipping of [lo, hi] whose uint8 rounding of the sample has the least squared error:
    clipping a few outliers buys resolution for the rest. Each end is clipped on its own (a
    post-ReLU6 activation has one tail, a residual stream two of different lengths), by
    coordinate descent: the top with the bottom held, the bottom with the top held, the top again."""

    def error(candidate: tuple[float, float]) -> float:
        return float(((affine_uint8(sample, *candidate) - sample) ** 2).mean())

    best = (lo, hi)
    for end in (1, 0, 1):
        extreme = (lo, hi)[end]
        if extreme == 0.0:
            continue
        tries = [tuple(extreme * f if i == end else best[i] for i in (0, 1)) for f in MSE_FACTORS]
        best = min(tries, key=error)
    return best
