"""2:4 structured sparsity: the mask, the pruning, and the measurement that spends a budget on it.

NVIDIA's sparse tensor cores (Ampere and later) multiply a weight in which every group of 4
consecutive weights along the reduction axis holds at most 2 non-zeros at twice the dense math
rate: they store the 2 values and a 2-bit index each, and skip the rest.

    w[o, i0:i0+4] = [0.9, -0.1, 0.05, -1.2]  ->  mask [1, 0, 0, 1]  ->  [0.9, 0, 0, -1.2]

Magnitude pruning keeps the 2 weights of each group with the largest |w|. The groups run along
weight axis 1: a linear's input features, a convolution's input channels at each output channel
and kernel position. That is how TensorRT reads a sparse convolution or matrix weight and how
torch's semi-structured tensors read a row-major [out, in] linear weight (2:4 along each row),
and what `backends.tensorrt_config.is_2_4_sparse` checks.

The measurement mirrors precision/sensitivity.py: each candidate layer pruned alone (at its
planned scheme, every other layer fp32) ranks the layers by the model output error it causes;
then the longest prefix of that order whose combined simulation, on top of the whole precision
plan, keeps the budget on every sample is pruned (a binary search over the prefix length), so
the most harmful layers are the ones backed off.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.fx import GraphModule, Interpreter

from kiln.budget import Budget
from kiln.ir import LayerPlan
from kiln.precision.sensitivity import Measurement, _Simulator
from kiln.progress import Progress
from kiln.verify import output_error, worst_per_example

GROUP, KEEP = 4, 2  # 2:4
Samples = Sequence[tuple[torch.Tensor, ...]]
MetricScore = Callable[[Callable[..., tuple]], float]  # scores a function over flat tensors on the budget's dataset


def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """The boolean mask that keeps the 2 largest |w| of every 4 consecutive weights along axis 1."""
    if weight.dim() < 2 or weight.shape[1] % GROUP:
        raise ValueError(f"2:4 groups run along weight axis 1, which needs a multiple of {GROUP} entries; "
                         f"the weight has shape {tuple(weight.shape)}")
    moved = weight.detach().movedim(1, -1)
    groups = moved.abs().reshape(-1, GROUP)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(KEEP, dim=1).indices, True)
    return keep.reshape(moved.shape).movedim(-1, 1)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` with the 2 smallest |w| of every group of 4 along axis 1 set to zero (a new tensor)."""
    return torch.where(mask_2_4(weight), weight.detach(), torch.zeros((), dtype=weight.dtype))


def prune(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    """`weight` pruned to `pattern` (a CompileOptions.sparsity value)."""
    if pattern != "2:4":
        raise ValueError(f"kiln prunes to 2:4 only, not {pattern!r}")
    return prune_2_4(weight)


class _SparseSimulator(_Simulator):
    """The precision simulator with the weights of `pruned` layers pruned to 2:4 first (their
    rounding then applies to the pruned weight, as the lowering does it)."""

    def __init__(self, gm: GraphModule, layers: dict[str, LayerPlan], pruned: frozenset[str], caches: tuple[dict, dict]):
        super().__init__(gm, layers, caches[0])
        self.pruned, self.caches = pruned, caches

    def run_node(self, n):
        # a layer's rounded weight is cached per layer and scheme: the pruned one apart from the dense one
        self.weights = self.caches[1] if n.name in self.pruned else self.caches[0]
        return super().run_node(n)

    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if n.name in self.pruned:
            args = (args[0], prune_2_4(args[1]), *args[2:])
        return args, kwargs


class SparsityAnalysis:
    """The cost of pruning layers to 2:4, on top of a precision plan, on a fixed set of samples."""

    def __init__(self, gm: GraphModule, plans: dict[str, LayerPlan], samples: Samples, metric_score: MetricScore | None = None):
        """`plans`: every weighted layer's precision plan; `metric_score`: the budget's metric on its dataset."""
        self.gm, self.plans, self.samples, self.metric_score = gm, plans, list(samples), metric_score
        self.caches: tuple[dict, dict] = ({}, {})
        with torch.no_grad():
            self.references = [self._run(Interpreter(gm), sample) for sample in self.samples]
        self.baseline = metric_score(lambda *flat: tuple(gm(*flat))) if metric_score is not None else None

    @staticmethod
    def _run(interpreter: Interpreter, sample) -> list[torch.Tensor]:
        out = interpreter.run(*sample)
        return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]

    def measure(self, pruned: frozenset[str]) -> Measurement:
        """The worst output of the whole precision plan with `pruned` layers at 2:4, over every
        sample, per example within a batch (as verification measures it)."""
        cosine, rel = 1.0, 0.0
        with torch.no_grad():
            for sample, want in zip(self.samples, self.references):
                for got, ref in zip(self._run(_SparseSimulator(self.gm, self.plans, pruned, self.caches), sample), want):
                    if ref.is_floating_point():
                        c, r = worst_per_example(got, ref)
                        cosine, rel = min(cosine, c), max(rel, r)
        drop = None
        if self.metric_score is not None:
            def simulated(*flat):
                return tuple(_SparseSimulator(self.gm, self.plans, pruned, self.caches).run(*flat))
            drop = self.baseline - self.metric_score(simulated)
        return Measurement(cosine, rel, drop)

    def solo_error(self, name: str) -> float:
        """Relative L2 error of the model output, first sample, with only `name` pruned (at its
        planned scheme; every other layer fp32): it ranks the layers."""
        if not self.samples:
            return 0.0
        with torch.no_grad():
            got = self._run(_SparseSimulator(self.gm, {name: self.plans[name]}, frozenset({name}), self.caches),
                            self.samples[0])
        errors = [output_error(g, r)[1] for g, r in zip(got, self.references[0]) if r.is_floating_point()]
        return max(errors, default=0.0)

    def spend(self, budget: Budget, eligible: list[str]) -> tuple[frozenset[str], dict[str, float], Measurement]:
        """(the layers pruned, each eligible layer's solo error, the measurement of the result):
        the longest prefix of `eligible`, least harmful first, whose combined plan keeps `budget`."""
        progress = Progress("sparsity: 2:4 per-layer error", len(eligible), " layers")
        errors = {}
        for name in eligible:
            errors[name] = self.solo_error(name)
            progress.advance()
        progress.finish()
        order = sorted(eligible, key=lambda name: errors[name])
        measured: dict[int, Measurement] = {}

        def fits(count: int) -> bool:
            measured[count] = self.measure(frozenset(order[:count]))
            m = measured[count]
            return budget.allows(m.cosine, m.rel_error, m.metric_drop)

        if not order or fits(len(order)):
            count = len(order)
        else:
            lo, hi = 0, len(order)  # invariant: prefix lo fits (none pruned is the precision plan alone), hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            count = lo
        final = measured.get(count) or self.measure(frozenset(order[:count]))
        return frozenset(order[:count]), errors, final
