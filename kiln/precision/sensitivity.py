"""Per-layer sensitivity and the greedy lowering that spends an accuracy budget.

1. Calibrate: run the fp32 graph on the calibration samples once, observing each weighted
   layer's input range and keeping the fp32 outputs as the reference.
2. Measure: for each layer and each candidate scheme, simulate only that layer lowered
   (schemes.py) and record the relative L2 error of the outputs on the first sample. A static
   int8 layer carries its bias correction: the mean shift, per output channel, that its
   rounding puts on its output over the calibration samples (fp32 inputs), which the lowering
   takes off its bias. Rounding noise averages out over a layer's many inputs; its mean does not:
   on EfficientNet-Lite0 with every layer int8, the correction halved the changed top-1 classes.
   A static int8 linear layer whose input has outlier features may also be smoothed
   (SmoothQuant): each input feature divided by s_j = max|x_j|^a / max|W_:,j|^(1-a) and the
   weight's column multiplied by it, which moves the outliers' range into the per-channel
   weight scales. Of no smoothing and a in SMOOTHING_ALPHAS, the layer takes whichever rounds
   its own output closest on the first sample; the calibrated range is then x/s's (minmax
   observer only: the percentile and MSE searches see no feature axis). Layers reading one input
   share one smoothing. On all-MiniLM-L6-v2 (batch 1, cosine 0.99) it halved the query, key and
   value layers' own int8 error and let int8 take 36 of 37 layers where 31 fit before.
3. Spend: for a candidate scheme, sort the layers by their error and lower the longest prefix
   of that order whose combined simulation stays inside the budget (a binary search over the
   prefix length: errors grow with the prefix). Then each layer past the prefix, those with the
   most work first, is tried on top of what is lowered so far and kept if the budget still
   holds: one sensitive layer early in the order must not keep every layer after it at fp32
   (on EfficientNet-Lite0 the prefix stopped at the stem, leaving four wide late convolutions at
   fp32 that cost 0.4 ms and under 0.001 of cosine). Layers still left stay at fp32, with the
   figure that kept them there.
4. Hold out (`held_out`): a static int8 plan's ranges, smoothing and bias correction derived
   again from every other calibration sample, measured on the rest, which those ranges never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch.fx import GraphModule, Interpreter

from kiln.budget import Budget
from kiln.frontend.moe_op import EXPERT_TYPES, WEIGHT_ARGS as EXPERT_WEIGHTS
from kiln.ir import LayerPlan, Scheme
from kiln.precision.schemes import Observer, fake_bias, fake_input, fake_output, fake_weight, per_channel_int8
from kiln.progress import Progress
from kiln.verify import output_error, worst_per_example

Samples = Sequence[tuple[torch.Tensor, ...]]
MetricDrop = Callable[[dict[str, LayerPlan]], float]  # layers lowered -> metric lost vs fp32


# Layers past the sorted prefix tried one by one on top of it: each try is one measurement.
SECOND_PASS_TRIES = 12
# Migration strengths tried when smoothing a static int8 linear layer's input (see step 2).
SMOOTHING_ALPHAS = (0.5, 0.75)
# Smoothing is kept only where it cuts the layer's own int8 error to this share or less. Its
# range fits every feature to the calibration samples, so a held-out input whose feature passes
# its calibrated maximum is clipped, where the plain range's headroom (set by the largest feature)
# would have held it: on a small random net, smoothing two layers for a 2-8% smaller own error
# missed the default budget on one held-out input of five (relative error 0.011 against 0.01).
SMOOTHING_GAIN = 0.75


class _Simulator(Interpreter):
    """Runs the graph with the given layers computed in their schemes (fake-quantised)."""

    def __init__(self, gm: GraphModule, layers: dict[str, LayerPlan], weights: dict):
        super().__init__(gm)
        self.layers = layers
        self.weights = weights  # (node, scheme) -> rounded weight, shared across runs

    def run_node(self, n):
        plan = self.layers.get(n.name)
        if plan is None or plan.scheme == Scheme.FP32:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if plan.op == "experts":
            return self._experts(n, plan, args, kwargs)
        key = (n.name, plan.scheme, plan.group_size, plan.smooth)
        x = args[0]
        if plan.smooth is not None:  # the lowering's division, and the weight's columns scaled
            divisor = torch.tensor(plan.smooth, dtype=x.dtype)
            x = x * (1 / divisor)
        if key not in self.weights:
            weight = args[1] if plan.smooth is None else args[1] * divisor.to(args[1].dtype)
            self.weights[key] = fake_weight(weight, plan.scheme, plan.group_size or 128)
        x = fake_input(x, plan.scheme, plan.input_range)
        rest = (fake_bias(args[2], plan.scheme), *args[3:]) if len(args) > 2 else ()
        y = fake_output(n.target(x, self.weights[key], *rest, **kwargs), plan.scheme)
        return y if plan.bias_shift is None else y - _per_channel(torch.tensor(plan.bias_shift), y, plan.op)

    def _experts(self, n, plan: LayerPlan, args, kwargs):
        """A kiln::moe_experts node as its lowering runs it: not simulated but run, with its
        expert weights (and biases) cast to the scheme's type, in which the op computes."""
        key = (n.name, plan.scheme, None)
        if key not in self.weights:
            dtype = EXPERT_TYPES[plan.scheme]
            self.weights[key] = tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args[EXPERT_WEIGHTS])
        return n.target(*args[:EXPERT_WEIGHTS.start], *self.weights[key], *args[EXPERT_WEIGHTS.stop:], **kwargs)


def _per_channel(values: torch.Tensor, like: torch.Tensor, op: str) -> torch.Tensor:
    """`values` (one per output channel) shaped to broadcast over a layer output: a linear's
    channels are its last axis, a convolution's axis 1."""
    return values if op == "linear" else values.reshape(1, -1, *([1] * (like.dim() - 2)))


def _channel_means(t: torch.Tensor, op: str) -> torch.Tensor:
    """The mean of a layer output per output channel, over every other axis."""
    return (t.reshape(-1, t.shape[-1]) if op == "linear" else t.transpose(0, 1).reshape(t.shape[1], -1).T).mean(0)


class _Recorder(Interpreter):
    """Feeds each layer's input to its observer and keeps, for `features` (linear layers), the
    per-feature min and max of the input (over the last axis), which smoothing reads."""

    def __init__(self, gm: GraphModule, observers: dict[str, Observer], features: dict[str, tuple]):
        super().__init__(gm)
        self.observers, self.features = observers, features

    def run_node(self, n):
        if n.name in self.observers:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.observers[n.name].update(args[0])
            if n.name in self.features:
                rows = args[0].detach().float().reshape(-1, args[0].shape[-1])
                lo, hi = self.features[n.name] or (rows.amin(0), rows.amax(0))
                self.features[n.name] = (torch.minimum(lo, rows.amin(0)), torch.maximum(hi, rows.amax(0)))
        return super().run_node(n)


class _ShiftRecorder(Interpreter):
    """Runs the fp32 graph and sums, per layer of `plans`, the per-channel mean difference
    between the layer computed in its scheme and in fp32, on the same fp32 input."""

    def __init__(self, gm: GraphModule, plans: dict[str, LayerPlan], weights: dict, sums: dict):
        super().__init__(gm)
        self.plans, self.weights, self.sums = plans, weights, sums

    def run_node(self, n):
        out = super().run_node(n)
        plan = self.plans.get(n.name)
        if plan is not None:
            lowered = _Simulator(self.module, {n.name: plan}, self.weights)
            lowered.env = self.env
            self.sums[n.name] = self.sums.get(n.name, 0.0) + _channel_means(lowered.run_node(n) - out, plan.op)
        return out


def _best_smoothing(x: torch.Tensor, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    plain_range: tuple[float, float]) -> tuple[tuple[float, ...], tuple[float, float]] | None:
    """(divisors, range of the smoothed input) of the SMOOTHING_ALPHAS strength whose int8
    rounding of the layer (x: its input on one sample, weight: [out, in]; lo, hi: each input
    feature's calibrated min and max) is closest to its fp32 output, or None unless it cuts the
    plain rounding's error (over `plain_range`) to SMOOTHING_GAIN of it."""
    want = torch.nn.functional.linear(x, weight)
    scale = float(want.norm()) or 1.0

    def error(divisor: torch.Tensor | None, input_range: tuple[float, float]) -> float:
        inputs, weights = (x, weight) if divisor is None else (x * (1 / divisor), weight * divisor)
        got = torch.nn.functional.linear(fake_input(inputs, Scheme.INT8_STATIC, input_range), per_channel_int8(weights))
        return float((got - want).norm()) / scale

    plain_error = error(None, plain_range)
    best, best_error = None, plain_error
    x_max = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-5)
    w_max = weight.abs().amax(0).clamp(min=1e-5)
    for alpha in SMOOTHING_ALPHAS:
        divisor = (x_max ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
        input_range = _smoothed_range(lo, hi, divisor)
        candidate = error(divisor, input_range)
        if candidate < best_error:
            best, best_error = (tuple(divisor.tolist()), input_range), candidate
    return best if best_error <= SMOOTHING_GAIN * plain_error else None


def _smoothed_range(lo: torch.Tensor, hi: torch.Tensor, divisor: torch.Tensor) -> tuple[float, float]:
    """The calibrated range of an input whose features (each within [lo_j, hi_j]) are divided by `divisor`."""
    return min(float((lo * (1 / divisor)).min()), 0.0), max(float((hi * (1 / divisor)).max()), 0.0)


@dataclass
class Measurement:
    """What one simulated configuration costs: the worst output over all samples."""

    cosine: float
    rel_error: float
    metric_drop: float | None = None

    def text(self) -> str:
        extra = f", metric drop {self.metric_drop:.3g}" if self.metric_drop is not None else ""
        return f"cosine {self.cosine:.6f}, rel. error {self.rel_error:.3g}{extra}"


class Analysis:
    """Sensitivity analysis of one graph on a fixed set of samples."""

    def __init__(self, gm: GraphModule, layers: list[LayerPlan], calibration: Samples, samples: Samples, observer: str,
                 metric_drop: MetricDrop | None = None):
        """`calibration` feeds the range observers; `samples` are what configurations are measured on."""
        self.gm, self.samples, self.metric_drop, self.observer = gm, list(samples), metric_drop, observer
        self.weights: dict = {}
        self._solo: dict[tuple, float] = {}
        self._fold: Analysis | None = None
        observers = {layer.node: Observer(observer) for layer in layers}
        # per-feature input ranges of the linear layers, for smoothing (minmax ranges only)
        self.features: dict[str, tuple] = {layer.node: None for layer in layers if layer.op == "linear"
                                           and observer == "minmax"}
        self.calibration = list(calibration)
        self._shifts: dict[str, tuple[float, ...]] | None = None
        self._smoothing: dict[str, tuple[tuple[float, ...], tuple[float, float]]] | None = None
        with torch.no_grad():
            progress = Progress("precision: activation ranges", len(self.calibration), " calibration samples")
            for sample in self.calibration:
                _Recorder(gm, observers, self.features).run(*sample)
                progress.advance()
            progress.finish()
            first = Interpreter(gm, garbage_collect_values=False)  # keeps every value of the first sample, for solo runs
            progress = Progress("precision: fp32 references", len(self.samples), " samples")
            self.references = []
            for index, sample in enumerate(self.samples):
                self.references.append(self._run(first if index == 0 else Interpreter(gm), sample))
                progress.advance()
            progress.finish()
            self.first_env = dict(first.env) if self.samples else {}
        self.measured = Progress(f"precision: plans measured on {len(self.samples)} samples", unit=" plans")
        self.ranges = {name: obs.range() for name, obs in observers.items()}
        self.layers = {layer.node: layer for layer in layers}

    @staticmethod
    def _run(interpreter: Interpreter, sample) -> list[torch.Tensor]:
        out = interpreter.run(*sample)
        return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]

    def lowered(self, layer: LayerPlan, scheme: str, group_size: int) -> LayerPlan:
        if scheme != Scheme.INT8_STATIC:
            return replace(layer, scheme=scheme, input_range=None, bias_shift=None, smooth=None,
                           group_size=group_size if scheme == Scheme.INT4_WEIGHT else None)
        return replace(self._static_int8(layer), bias_shift=self._bias_shifts().get(layer.node))

    def _static_int8(self, layer: LayerPlan) -> LayerPlan:
        """`layer` at static int8 over its calibrated range, smoothed where that pays (step 2)."""
        smooth, input_range = self._smoothings().get(layer.node, (None, self.ranges.get(layer.node)))
        return replace(layer, scheme=Scheme.INT8_STATIC, input_range=input_range, group_size=None, smooth=smooth)

    def _smoothings(self) -> dict[str, tuple[tuple[float, ...], tuple[float, float]]]:
        """Layer -> (divisors, the smoothed input's range) for the linear layers whose output on
        the first sample rounds closest with smoothing (module docstring, step 2). Layers reading
        one input (a transformer's query, key and value) share one smoothing, chosen on their
        outputs together, so that the lowering divides and quantises that input once."""
        if self._smoothing is None:
            self._smoothing = {}
            groups: dict[torch.fx.Node, list[str]] = {}
            nodes = {n.name: n for n in self.gm.graph.nodes}
            for name, features in self.features.items():
                source, weight = (self.first_env.get(a) if isinstance(a, torch.fx.Node) else None for a in nodes[name].args[:2])
                if features is not None and isinstance(source, torch.Tensor) and isinstance(weight, torch.Tensor) \
                        and weight.dim() == 2 and weight.shape[1] == features[0].numel():
                    groups.setdefault(nodes[name].args[0], []).append(name)
            with torch.no_grad():
                for source, names in groups.items():
                    lo = torch.stack([self.features[n][0] for n in names]).amin(0)  # the same input: equal, but exact
                    hi = torch.stack([self.features[n][1] for n in names]).amax(0)
                    weight = torch.cat([self.first_env[nodes[n].args[1]].float() for n in names])
                    plain = (min(self.ranges[n][0] for n in names), max(self.ranges[n][1] for n in names))
                    chosen = _best_smoothing(self.first_env[source].float(), weight, lo, hi, plain)
                    if chosen is not None:
                        self._smoothing.update({n: chosen for n in names})
        return self._smoothing

    def _bias_shifts(self) -> dict[str, tuple[float, ...]]:
        """Every layer's static int8 bias correction, from one pass over the calibration samples."""
        if self._shifts is None:
            plans = {name: self._static_int8(layer)
                     for name, layer in self.layers.items() if layer.op != "experts"}  # experts never run int8
            sums: dict = {}
            progress = Progress("precision: int8 bias correction", len(self.calibration), " calibration samples")
            with torch.no_grad():
                for sample in self.calibration:
                    _ShiftRecorder(self.gm, plans, self.weights, sums).run(*sample)
                    progress.advance()
            progress.finish()
            self._shifts = {name: tuple((total / len(self.calibration)).tolist()) for name, total in sums.items()}
        return self._shifts

    def measure(self, config: dict[str, LayerPlan], with_metric: bool = True, samples: int | None = None) -> Measurement:
        """The worst output error of `config` over the first `samples` samples (all by default),
        per example within a batch, as verification measures it."""
        cosine, rel = 1.0, 0.0
        with torch.no_grad():
            for sample, want in list(zip(self.samples, self.references))[:samples]:
                for got, ref in zip(self._run(_Simulator(self.gm, config, self.weights), sample), want):
                    if ref.is_floating_point():
                        c, r = worst_per_example(got, ref)
                        cosine, rel = min(cosine, c), max(rel, r)
        drop = self.metric_drop(config) if with_metric and self.metric_drop is not None else None
        self.measured.advance()
        return Measurement(cosine, rel, drop)

    def solo_error(self, plan: LayerPlan) -> float:
        """One layer lowered alone, on the first sample: it ranks layers; the combined
        configurations the budget decides on run on every sample. Only the layer and what
        depends on it run again; every other value comes from the fp32 reference run."""
        if not self.samples:
            return 0.0
        key = (plan.node, plan.scheme, plan.group_size)  # lowered() derives the rest from these
        if key not in self._solo:
            self._solo[key] = self._solo_error(plan)
        return self._solo[key]

    def _solo_error(self, plan: LayerPlan) -> float:
        node = next(n for n in self.gm.graph.nodes if n.name == plan.node)
        stale, frontier = set(), [node]
        while frontier:
            current = frontier.pop()
            if current not in stale:
                stale.add(current)
                frontier.extend(current.users)
        kept = {n: v for n, v in self.first_env.items() if n not in stale}
        with torch.no_grad():
            out = _Simulator(self.gm, {plan.node: plan}, self.weights).run(*self.samples[0], initial_env=kept)
        got = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        errors = [output_error(g, r)[1] for g, r in zip(got, self.references[0]) if r.is_floating_point()]
        return max(errors, default=0.0)

    def held_out(self, config: dict[str, LayerPlan]) -> Measurement | None:
        """`config` with its static int8 layers calibrated afresh on every other calibration sample
        (ranges, smoothing, bias correction) and measured on the rest, which their ranges never
        saw; None with fewer than two calibration samples. A plan's own measurement runs on the
        samples its ranges came from, which flatters it: values past a calibrated range clip only
        on inputs it did not see."""
        if len(self.calibration) < 2:
            return None
        if self._fold is None:
            fold = Analysis(self.gm, [replace(layer, scheme=Scheme.FP32) for layer in self.layers.values()],
                            self.calibration[0::2], self.calibration[1::2], self.observer, self.metric_drop)
            fold.weights = self.weights  # rounded weights depend on the layer, scheme and smoothing alone
            # the same smoothing divisors, over the fold's own feature ranges: choosing them again
            # would look at a held-out sample (the choice runs on the first measured one)
            fold._smoothing = {name: (divisors, _smoothed_range(*fold.features[name], torch.tensor(divisors)))
                               for name, (divisors, _) in self._smoothings().items()}
            self._fold = fold
        fold = self._fold
        refolded = {name: fold.lowered(fold.layers[name], Scheme.INT8_STATIC, 0)
                    if plan.scheme == Scheme.INT8_STATIC else plan for name, plan in config.items()}
        return fold.measure(refolded)

    def spend(self, budget: Budget, scheme: str, eligible: list[str], group_size: int,
              work: dict[str, float] | None = None,
              base: dict[str, LayerPlan] | None = None) -> tuple[dict[str, LayerPlan], Measurement]:
        """Lower the least sensitive of `eligible` to `scheme` while `budget` allows; returns every
        layer's plan (lowered or not, each with its solo error and reason) and the measurement.
        `work` (layer -> its share of the compute, e.g. multiply-adds) orders the second pass.
        `base` (layer -> plan) is lowered already: every configuration measured includes it, a
        layer of `eligible` lowered to `scheme` replacing its base plan, and the result keeps the
        base plan of every layer `scheme` does not take (a mix: int8 on top of every layer bf16)."""
        base = dict(base or {})
        trials = []
        self.measured = Progress(f"precision: {scheme} plans measured on {len(self.samples)} samples", unit=" plans")
        progress = Progress(f"precision: {scheme} sensitivity", len(eligible), " layers")
        for name in eligible:
            plan = self.lowered(self.layers[name], scheme, group_size)
            trials.append((self.solo_error(plan), plan))
            progress.advance()
        progress.finish()
        trials.sort(key=lambda t: t[0])
        count = self._longest_prefix(trials, budget, base)
        rank = {plan.node: index + 1 for index, (_, plan) in enumerate(trials)}
        chosen = {plan.node: plan for _, plan in trials[:count]}
        rest = sorted(trials[count:], key=lambda t: -(work or {}).get(t[1].node, 0.0))  # stable: ties stay by error
        second = set()
        for _, plan in rest[:SECOND_PASS_TRIES] if count else ():
            m = self.measure({**base, **chosen, plan.node: plan})
            if budget.allows(m.cosine, m.rel_error, m.metric_drop):
                chosen[plan.node] = plan
                second.add(plan.node)
        result = {name: base.get(name, layer) for name, layer in self.layers.items()}
        for error, plan in trials:
            where = f"sensitivity rank {rank[plan.node]} of {len(trials)}"
            if plan.node in chosen:
                corrected = ("; input smoothed into the weight" if plan.smooth is not None else "") + \
                    ("; bias corrected" if plan.bias_shift is not None else "")
                added = f"; added after the first {count}, the budget still holding" if plan.node in second else ""
                result[plan.node] = replace(plan, error=error, reason=f"{scheme} keeps the budget; {where}{added}{corrected}")
            elif plan.node in base:  # stays as the base has it, with why `scheme` did not take it
                kept = base[plan.node]
                result[plan.node] = replace(kept, reason=f"{kept.reason}; {scheme} on top would exceed the budget "
                                                         f"({where}, alone: rel. error {error:.3g})")
            else:
                result[plan.node] = replace(self.layers[plan.node], error=error,
                                            reason=f"{scheme} would exceed the budget ({where}, alone: rel. error {error:.3g})")
        final = self.measure({**base, **chosen}) if chosen or base else Measurement(1.0, 0.0)
        self.measured.finish()
        return result, final

    def _longest_prefix(self, trials: list, budget: Budget, base: dict[str, LayerPlan]) -> int:
        def fits(count: int) -> bool:
            m = self.measure({**base, **{plan.node: plan for _, plan in trials[:count]}})
            return budget.allows(m.cosine, m.rel_error, m.metric_drop)

        if not trials or fits(len(trials)):
            return len(trials)
        lo, hi = 0, len(trials)  # invariant: prefix lo fits (none lowered fits), prefix hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
