"""Verification against eager PyTorch: one tolerance table per precision, one comparison.

An output passes when every element satisfies |got - want| <= atol + rtol * |want| (the
allclose rule) for its precision. A model with layers lowered below fp32 answers instead to
its accuracy Budget: every output's cosine and relative L2 error against eager, per input. The report also carries the max absolute error and the
cosine similarity per output, so a user sees how close a pass was, not only that it passed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Collection, Iterable

import torch

from kiln.budget import Budget
from kiln.types import Precision


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# fp32 engines reorder sums and pick other conv/GEMM algorithms; 1e-4 relative covers that on
# deep models while still catching a wrong op (those miss by 1e-1 and more).
TOLERANCE: dict[Precision, Tolerance] = {
    Precision.FP32: Tolerance(rtol=1e-4, atol=1e-4),
    Precision.TF32: Tolerance(rtol=5e-3, atol=5e-3),
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per value), fp16 11 bits (2^-12);
    # a few roundings per layer with fp32 accumulation stay within a few units of the last place.
    Precision.BF16: Tolerance(rtol=3e-2, atol=3e-2),
    Precision.FP16: Tolerance(rtol=5e-3, atol=5e-3),
    # e4m3 keeps 4 significant bits; int8 rounds to 1/255 of the range, int4 to 1/15 of a group's.
    Precision.FP8: Tolerance(rtol=1e-1, atol=1e-1),
    Precision.INT8: Tolerance(rtol=1e-1, atol=1e-1),
    Precision.INT4: Tolerance(rtol=2e-1, atol=2e-1),
}


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs_error: float
    worst_excess: float  # max of |d| - (atol + rtol|want|); <= 0 means inside tolerance
    cosine: float
    ok: bool
    detail: str = ""
    rel_error: float = 0.0  # ||got - want|| / ||want||
    on_budget: bool = False  # judged against the accuracy budget, not the precision's elementwise tolerance

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def output_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L2 error) of `got` against `want`, over finite values."""
    g64, w64 = got.detach().double().flatten(), want.detach().double().flatten()
    finite = torch.isfinite(w64) & torch.isfinite(g64)
    gf, wf = g64[finite], w64[finite]
    denom = float(gf.norm() * wf.norm())
    # two all-zero (or empty) outputs agree perfectly; one zero and one not, not at all
    cosine = float(gf @ wf) / denom if denom > 0 else (1.0 if not gf.any() and not wf.any() else 0.0)
    ref = float(wf.norm())
    diff = float((gf - wf).norm())
    rel = diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))
    if bool((~finite).any()) and not torch.equal(torch.isfinite(g64), torch.isfinite(w64)):
        rel, cosine = float("inf"), min(cosine, 0.0)
    return cosine, rel


def worst_per_example(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(cosine, relative L2 error) of the worst example: an output of 2 or more dimensions with
    more than one row along its first (batch) axis is measured row by row. A budget holds per
    example, as its user reads it (every embedding, every image): over a whole batch, the large
    logits of seven good images hide the eighth one's error."""
    if got.dim() < 2 or got.shape[0] < 2:
        return output_error(got, want)
    rows = [output_error(g, w) for g, w in zip(got, want)]
    return min(c for c, _ in rows), max(r for _, r in rows)


# Under a budget, the share of routing choices (`compare`'s `choices`) a lowered partition must
# keep: rounding flips the near-tied ones, a broken lowering most of them.
CHOICE_AGREEMENT = 0.9


def compare(names: tuple[str, ...] | list[str], got: list[torch.Tensor], want: list[torch.Tensor],
            precision: Precision = Precision.FP32, budget: Budget | None = None,
            choices: Collection[str] = ()) -> list[OutputCheck]:
    """Check each output of `got` against `want` at `precision`'s tolerance or, given a
    `budget` (a model with lowered layers), against the budget's cosine and relative error.
    Integer outputs must be equal, except, under a budget, those named in `choices`: a
    partition's routing choices (the top-k experts a later partition reads), which a lowered plan
    may flip where two experts score alike; they must agree on CHOICE_AGREEMENT of their
    elements, and the model's own outputs, held to the budget, decide."""
    tol = TOLERANCE[precision]
    checks = []
    for name, g, w in zip(names, got, want):
        if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
            checks.append(OutputCheck(name, float("inf"), float("inf"), 0.0, False,
                                      f"got {g.dtype}{tuple(g.shape)}, eager gives {w.dtype}{tuple(w.shape)}"))
            continue
        if not w.dtype.is_floating_point and budget is not None and name in choices:
            agree = float((g == w).float().mean()) if w.numel() else 1.0
            checks.append(OutputCheck(name, 0.0, CHOICE_AGREEMENT - agree, agree, agree >= CHOICE_AGREEMENT,
                                      f"routing choices agree on {agree:.1%} (at least {CHOICE_AGREEMENT:.0%} needed; "
                                      "the model's outputs are held to the budget)"))
            continue
        if not w.dtype.is_floating_point:
            equal = bool(torch.equal(g, w))
            checks.append(OutputCheck(name, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"), 1.0 if equal else 0.0, equal,
                                      "" if equal else "integer output differs"))
            continue
        g64, w64 = g.detach().double(), w.detach().double()
        same_nonfinite = torch.equal(torch.isnan(g64), torch.isnan(w64)) and torch.equal(g64[torch.isinf(g64)], w64[torch.isinf(g64)]) \
            and torch.equal(torch.isinf(g64), torch.isinf(w64))
        finite = torch.isfinite(w64) & torch.isfinite(g64)
        diff = (g64 - w64).abs()[finite]
        bound = (tol.atol + tol.rtol * w64.abs())[finite]
        max_abs = float(diff.max()) if diff.numel() else 0.0
        excess = float((diff - bound).max()) if diff.numel() else 0.0
        cosine, rel = output_error(g64, w64) if budget is None else worst_per_example(g64, w64)
        if budget is not None:  # the excess, in budget terms, ranks draws worst-first
            excess = max(budget.min_cosine - cosine if budget.min_cosine is not None else -1.0,
                         rel - budget.max_rel_error if budget.max_rel_error is not None else -1.0)
            inside = budget.allows(cosine, rel)
        else:
            inside = excess <= 0
        ok = same_nonfinite and inside
        detail = "" if same_nonfinite else "NaN/Inf positions differ from eager"
        checks.append(OutputCheck(name, max_abs, excess, cosine, ok, detail, rel, budget is not None))
    return checks


def worst_checks(names: tuple[str, ...] | list[str], runs: Iterable[tuple[list, list]], precision: Precision = Precision.FP32,
                 budget: Budget | None = None, synthetic: Collection[int] = (), choices: Collection[str] = ()) -> list[OutputCheck]:
    """Each output's worst check over `runs`, one (got, want) pair per verification input.

    Under a budget, the inputs at the indexes in `synthetic` (random draws of the input spec) are
    held to `draw_budget(precision)`, not to the user's budget: a budget speaks of the user's
    inputs (the example inputs and calibration samples), which random draws need not resemble
    (random token ids are no sentence: bf16 errs up to three times as much on them), while an
    engine that computes the wrong thing fails either check. A failing check wins; then one on
    the user's inputs, which carries the budget's figures; then the larger excess."""
    worst: dict[str, tuple[tuple, OutputCheck]] = {}
    for index, (got, want) in enumerate(runs):
        on_budget = budget is not None and index not in synthetic
        held_to = budget if on_budget else draw_budget(precision) if budget is not None else None
        for check in compare(names, got, want, precision, held_to, choices):
            check = replace(check, on_budget=on_budget)
            rank = (not check.ok, on_budget, check.worst_excess)
            if check.name not in worst or rank > worst[check.name][0]:
                worst[check.name] = (rank, check)
    return [check for _, check in worst.values()]


def draw_budget(precision: Precision) -> Budget:
    """What a lowered model must keep on a random draw: a relative L2 error within the
    precision's relative tolerance, per example (an elementwise bound fails a deep bf16 network
    on its near-zero outputs alone)."""
    return Budget(max_rel_error=TOLERANCE[precision].rtol)


def failures_text(checks: list[OutputCheck], precision: Precision, budget: Budget | None = None) -> str:
    """What each failing check missed: the budget, the draws' (`draw_budget`), or `precision`'s
    elementwise tolerance."""
    tol = TOLERANCE[precision]

    def missed(c: OutputCheck) -> str:
        if c.on_budget and budget is not None:
            return f"cosine {c.cosine:.6f}, relative error {c.rel_error:.3g} (budget: {budget.describe()})"
        if budget is not None:
            return f"relative error {c.rel_error:.3g} on a random draw (allowed {tol.rtol:g} at {precision.value})"
        return f"max abs error {c.max_abs_error:.3g} (allowed {tol.atol:g} + {tol.rtol:g}*|eager|)"
    return "; ".join(f"output {c.name!r}: {missed(c)}" + (f", {c.detail}" if c.detail else "") for c in checks if not c.ok)
