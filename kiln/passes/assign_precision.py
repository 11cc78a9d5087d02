"""Decide each node's precision (decide only: backends lower the plan, passes never cast).

Weighted layers (linear, convolution with a stored weight, and a mixture-of-experts block's
experts captured as one kiln::moe_experts node) are the candidates; every other node stays fp32. Numerically fragile ops (softmax, normalisations, reductions, exp/log,
attention) stay fp32 by rule, and so does the final layer when it is sensitive. The rest is
measured (precision/sensitivity.py): each layer lowered alone on calibration data, then the
least sensitive layers lowered together while the accuracy budget holds.

    precision="fp32"   nothing is lowered
    precision=X        every eligible layer at X, except those the budget cannot afford
    precision="auto"   per candidate the device and a tried backend run (integer types only
                       with calibration data), the layers that fit the budget; the candidate
                       that saves the most estimated time wins. One more candidate mixes two:
                       every layer at bf16 (or fp16), then int8 on top where the budget allows,
                       where a tried backend builds such a mix (OpenVINO, under its bf16 hint,
                       which runs every layer without int8 at bf16)

A model that already carries Q/DQ or fake-quant nodes (quantisation-aware training, PT2E)
is honoured as it is: nothing is re-quantised.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import GraphModule, Node

from kiln.backends import registry
from kiln.errors import OptionsError
from kiln.frontend.input_spec import random_inputs
from kiln.frontend.moe_op import DOWN_ARG, EXPERT_TYPES, MOE_EXPERTS, UP_ARG
from kiln.fx_helpers import attr_value, in_module, is_call, module_hint
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip
from kiln.placement.cost_model import shape_of
from kiln.precision.capability import FLOATS_BELOW_FP32, device_runs
from kiln.ir import DECISION_META, LAYER_META, SCHEME_PRECISION, LayerPlan, Scheme
from kiln.precision.sensitivity import Analysis
from kiln.types import NodeDecision, Precision

aten = torch.ops.aten
LINEARS = (aten.linear.default,)
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
FRAGILE = {
    "softmax": (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default),
    "normalisation": (aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default,
                      aten.native_group_norm.default, aten.batch_norm.default, aten.rms_norm.default,
                      aten._native_batch_norm_legit_no_training.default),
    "reduction": (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.var.correction,
                  aten.std.correction, aten.amax.default, aten.logsumexp.default, aten.cumsum.default,
                  aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default, aten.prod.default),
    "exp/log": (aten.exp.default, aten.log.default, aten.log1p.default, aten.expm1.default, aten.pow.Tensor_Scalar),
    "attention (softmax inside)": (aten.scaled_dot_product_attention.default,),
}
FRAGILE_KIND = {op: kind for kind, ops in FRAGILE.items() for op in ops}
# Samples each simulated configuration runs on: the example inputs and calibration samples, which
# verification checks in full. A plan measured on fewer can pass its measurement and miss the
# budget on the rest: a calibration set's few dark photos, say, whose activations use a small part
# of the calibrated ranges.
MEASURE_SAMPLES = 64
# Plans spend this share of the budget: verification also runs inputs the plan never saw
# (fresh draws), whose error differs from the measured ones by tens of percent on small models.
SPEND_FRACTION = 0.8
# Static int8's activation ranges are calibrated on the very samples its plan is measured on, so
# held-out inputs (values past a range, clipped) may cost more than measured: on all-MiniLM-L6-v2
# at batch 8 with 4 calibration batches, 1 - cosine on held-out sentences was 1.6x the measured
# figure for a tight plan with three int8 layers, 1.2x for the int8 plan (the relative error,
# about the square root of 1 - cosine, grew 1.1-1.3x, which SPEND_FRACTION covers). On GPT-2 and
# BERT-base it was 1.0-1.1x. So a static int8 plan spends SPEND_FRACTION of a cosine allowance
# where, calibrated again on half the calibration samples, it stays within HELD_OUT_FRACTION of
# the budget on the other half (Analysis.held_out), and INT8_STATIC_COSINE_FRACTION of it
# otherwise. The held-out figure already pays for the calibration's flattery, so it keeps half the
# headroom: BERT-base b1's tight plan, packed to 0.8 of the allowance (cosine 0.999922), measured
# 0.999917 held out, and 0.999914 on eight held-out batches of real sentences.
INT8_STATIC_COSINE_FRACTION = 0.5
HELD_OUT_FRACTION = 0.9
# "auto" leaves a layer at fp32 when it has few weights and does little work: its conversions
# would cost more than it saves. A small kernel over a large activation (an image model's
# first convolutions) does much work and stays a candidate.
AUTO_MIN_WEIGHTS = 1024
AUTO_MIN_MACS = 1_000_000
# A runner-up plan whose estimated saving is at least this share of the chosen plan's is built
# and timed against it: the peak-figure estimate misses conversions and converter overheads.
CLOSE_ESTIMATE = 0.8
TOO_SMALL = "too small"  # how a layer's reason begins when "auto" leaves it at fp32 for its size
KEPT_BY_USER = "kept fp32 by keep_fp32"  # how a layer's reason begins when the user held it at fp32
SCHEME_FOR = {Precision.BF16: Scheme.BF16, Precision.FP16: Scheme.FP16, Precision.FP8: Scheme.FP8,
              Precision.INT4: Scheme.INT4_WEIGHT}


def assign_precision(gm: GraphModule, ctx: PassContext) -> PassResult:
    opts = ctx.options
    layers = weighted_layers(gm)
    if ctx.layer_plans is not None:  # the precision search picked one of the plans weighed before
        return _annotated(gm, dict(ctx.layer_plans), layers)
    kept = _kept_fp32(gm, layers, opts.keep_fp32)
    quantized = [n.name for n in gm.graph.nodes if n.op == "call_function" and "quantize" in str(n.target)]
    if quantized:
        reason = f"the model already carries {len(quantized)} Q/DQ or fake-quant nodes; its quantisation is kept as is"
        result = _annotated(gm, {}, layers, reason)
        return dataclasses.replace(result, skipped=(Skip(quantized[0], reason),))
    if opts.precision is Precision.FP32 or not layers:
        return _annotated(gm, {name: _plain(node, "precision='fp32' was requested" if layers else "")
                               for name, node in layers.items()}, layers)
    schemes = _schemes(ctx)
    if not schemes:
        why = ("no precision below fp32 that this device and a tried backend both run" +
               (" (integer types need calibration data)" if not ctx.calibration else "")) if opts.auto \
            else f"device {ctx.profile.primary.name} does not run {opts.precision.value}"
        return _annotated(gm, {name: _plain(node, why) for name, node in layers.items()}, layers)
    analysis = Analysis(gm, [_plain(node, "") for node in layers.values()], *measurement_samples(ctx), opts.calibration_observer,
                        _metric_drop(gm, ctx))
    outcomes = [(scheme, _try_scheme(gm, analysis, layers, scheme, ctx, kept)) for scheme in schemes]
    if (mixed := _int8_over_float(gm, analysis, layers, outcomes, ctx, kept)) is not None:
        outcomes.append(mixed)  # after the single schemes: outcomes[0] stays the fastest single one
    ranked = sorted(outcomes, key=lambda o: -_saving(layers, o[1], ctx))
    plans = ranked[0][1]
    if not any(p.scheme != Scheme.FP32 for p in plans.values()):
        plans = outcomes[0][1]  # nothing fits: report why the fastest candidate did not
    # under "auto", the other precisions' plans that fit the budget, most estimated saving first:
    # the precision search builds the next one when the chosen plan measures slower than fp32
    alternatives = [(scheme, other) for scheme, other in ranked[1:]
                    if opts.auto and any(p.scheme != Scheme.FP32 for p in other.values())]
    result = _annotated(gm, plans, layers)
    held = tuple(Skip(p.node, p.reason) for p in plans.values() if p.scheme == Scheme.FP32 and p.reason)
    # the estimate cannot tell two plans apart when the runner-up saves nearly as much: the
    # precision search then times both (a mix of int8 and bf16 runs through another converter)
    close = len(ranked) > 1 and _saving(layers, ranked[1][1], ctx) >= CLOSE_ESTIMATE * _saving(layers, plans, ctx)
    return dataclasses.replace(result, skipped=held, decided={"plans": plans, "alternatives": alternatives,
                                                              "race_runner_up": bool(alternatives) and close})


def _annotated(gm: GraphModule, plans: dict[str, LayerPlan], layers: dict[str, Node], override: str = "") -> PassResult:
    """Annotate `gm` with `plans` and say so: the layers lowered, and the nodes annotated."""
    annotated = _annotate(gm, plans, override)
    lowered = sum(p.scheme != Scheme.FP32 for p in plans.values())
    return PassResult(False, {"lowered": lowered, "layers": len(layers)}, annotated=annotated,
                      decided={"plans": plans, "alternatives": [], "race_runner_up": False})


def weighted_layers(gm: GraphModule, experts: bool = True) -> dict[str, Node]:
    """Linear and convolution nodes whose weight is a stored tensor, and (with `experts`)
    kiln::moe_experts nodes whose expert weights are, in graph order."""
    found = {}
    for node in gm.graph.nodes:
        if experts and is_call(node, MOE_EXPERTS) and attr_value(gm, node.args[UP_ARG]) is not None:
            found[node.name] = node
            continue
        if not is_call(node, *LINEARS, *CONVS) or attr_value(gm, node.args[1]) is None:
            continue
        if node.target is aten.convolution.default and node.args[6]:
            continue  # transposed: its output channels sit on weight axis 1, which per-channel schemes assume is 0
        found[node.name] = node
    return found


def _plain(node: Node, reason: str) -> LayerPlan:
    return LayerPlan(node.name, _kind(node), str(node.args[_weight_arg(node)].target), Scheme.FP32, reason=reason)


def _kind(node: Node) -> str:
    return "experts" if node.target is MOE_EXPERTS else "linear" if node.target in LINEARS else "conv"


def _weight_arg(node: Node) -> int:
    return UP_ARG if node.target is MOE_EXPERTS else 1


def _schemes(ctx: PassContext) -> list[str]:
    opts, device = ctx.options, ctx.profile.primary
    calibrated = bool(ctx.calibration)
    if opts.auto:
        precisions = auto_candidates(device, opts.backends_for(device), calibrated)
    else:
        precisions = [opts.precision] if device_runs(device, opts.precision) else []
    return [(Scheme.INT8_STATIC if calibrated else Scheme.INT8_DYNAMIC) if p is Precision.INT8 else SCHEME_FOR[p]
            for p in precisions]


def auto_candidates(device, backends: tuple[str, ...], calibrated: bool) -> list[Precision]:
    """Precisions "auto" may assign, fastest first by the device's peak figures: those the device
    runs and at least one tried backend's capability table lowers there, integer types only with
    calibration data. Weight-only int4 is left to explicit requests: it pays on memory-bound
    decoding, not on math."""
    found = []
    for precision in (Precision.INT8, *FLOATS_BELOW_FP32):
        if precision.is_integer and not calibrated:
            continue
        if device_runs(device, precision) and registry.lowering(backends, device, precision):
            found.append(precision)
    return sorted(found, key=lambda p: -device.peak_tflops.get(p, 0.0))


def _kept_fp32(gm: GraphModule, layers: dict[str, Node], keys: tuple[str, ...]) -> dict[str, str]:
    """{layer: reason} for the layers the user keeps at fp32; a key that names nothing is an error."""
    kept: dict[str, str] = {}
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for key in keys:
        if not any(in_module(n, key) for n in nodes):
            raise OptionsError(f"keep_fp32 {key!r} matches no node", where="options.keep_fp32", fix=module_hint(nodes, key))
        for name, node in layers.items():
            if in_module(node, key):
                kept.setdefault(name, f"{KEPT_BY_USER}={key!r}")
    return kept


def _try_scheme(gm: GraphModule, analysis: Analysis, layers: dict[str, Node], scheme: str,
                ctx: PassContext, kept: dict[str, str]) -> dict[str, LayerPlan]:
    opts = ctx.options
    eligible, held, final_error = _eligible(gm, analysis, layers, scheme, ctx, kept)
    plans = _spend(analysis, opts.accuracy_budget, scheme, eligible, opts.int4_group_size,
                   work={name: float(_macs(layers[name])) for name in eligible})
    for name, reason in held.items():
        plans[name] = plans[name].at_fp32(reason, error=final_error if name == _final_layer(gm, layers) else 0.0)
    return plans


def _eligible(gm: GraphModule, analysis: Analysis, layers: dict[str, Node], scheme: str, ctx: PassContext,
              kept: dict[str, str]) -> tuple[list[str], dict[str, str], float]:
    """(the layers `scheme` may take, {layer held at fp32 by a rule: why}, the final layer's solo
    error when it is held for its sensitivity)."""
    opts = ctx.options
    eligible, held = [], {}
    for name, node in layers.items():
        if name in kept:
            held[name] = kept[name]
        elif node.target is MOE_EXPERTS and scheme not in EXPERT_TYPES:
            held[name] = (f"experts run in PyTorch, which kiln lowers to {', '.join(s.value for s in EXPERT_TYPES)} "
                          f"only, not {scheme}")
        elif scheme == Scheme.INT4_WEIGHT and node.target not in LINEARS:
            held[name] = "int4 weight-only kernels take linear layers only"
        elif opts.auto and attr_value(gm, node.args[_weight_arg(node)]).numel() < AUTO_MIN_WEIGHTS \
                and _macs(node) < AUTO_MIN_MACS:
            held[name] = (f"{TOO_SMALL} for {scheme} to pay (fewer than {AUTO_MIN_WEIGHTS} weights "
                          f"and {AUTO_MIN_MACS // 10**6}M multiply-adds)")
        else:
            eligible.append(name)
    final, final_error = _final_layer(gm, layers), 0.0
    if final in eligible and (sensitive := _sensitive_final(analysis, final, scheme, opts)) is not None:
        eligible.remove(final)
        held[final], final_error = sensitive
    return eligible, held, final_error


def _int8_over_float(gm: GraphModule, analysis: Analysis, layers: dict[str, Node],
                     outcomes: list[tuple[str, dict[str, LayerPlan]]], ctx: PassContext,
                     kept: dict[str, str]) -> tuple[str, dict[str, LayerPlan]] | None:
    """Under "auto": every layer at a float scheme (bf16), then static int8 on top of it where the
    budget allows, the least sensitive layers first. Proposed only where a tried backend builds
    the mix and the float scheme takes every layer: the backend (OpenVINO) runs the mix under
    that scheme's inference hint, which lowers every layer without QDQ nodes, the small ones
    "auto" would leave at fp32 included (measured so here). Layers the user keeps at fp32 rule
    it out."""
    opts, device = ctx.options, ctx.profile.primary
    found = dict(outcomes)
    if not opts.auto or kept or Scheme.INT8_STATIC not in found:
        return None
    for scheme in (Scheme.BF16, Scheme.FP16):
        floats = found.get(scheme)
        if floats is None or not registry.mixing(opts.backends_for(device), device, frozenset({Precision.INT8, SCHEME_PRECISION[scheme]})):
            continue
        small = {name for name, plan in floats.items() if plan.scheme == Scheme.FP32 and plan.reason.startswith(TOO_SMALL)}
        if any(plan.scheme == Scheme.FP32 and name not in small for name, plan in floats.items()):
            return None  # the budget keeps a layer from the float scheme, which the hint would lower anyway
        base = {name: dataclasses.replace(analysis.lowered(analysis.layers[name], scheme, opts.int4_group_size),
                                          reason=f"{scheme}: the {scheme} and int8 mix's inference hint lowers it ({plan.reason})")
                if name in small else plan for name, plan in floats.items()}
        if small and not _fits(analysis, base, opts.accuracy_budget.tightened(SPEND_FRACTION)):
            return None
        eligible, _, _ = _eligible(gm, analysis, layers, Scheme.INT8_STATIC, ctx, kept)
        plans = _spend(analysis, opts.accuracy_budget, Scheme.INT8_STATIC, eligible, opts.int4_group_size,
                       work={name: float(_macs(layers[name])) for name in eligible}, base=base)
        if not any(plan.scheme == Scheme.INT8_STATIC for plan in plans.values()):
            return None
        return f"{scheme}+{Scheme.INT8_STATIC}", plans
    return None


def _fits(analysis: Analysis, plans: dict[str, LayerPlan], budget) -> bool:
    m = analysis.measure(plans)
    return budget.allows(m.cosine, m.rel_error, m.metric_drop)


def _spendable(budget, scheme: str, held_out: bool = False):
    """The part of `budget` a plan with `scheme` layers spends (the rest is headroom); static int8
    `held_out`: a plan that also holds it on calibration samples its ranges never saw."""
    cosine = INT8_STATIC_COSINE_FRACTION if scheme == Scheme.INT8_STATIC and not held_out else None
    return budget.tightened(SPEND_FRACTION, cosine)


def _spend(analysis: Analysis, budget, scheme: str, eligible: list[str], group_size: int, work: dict[str, float],
           base: dict[str, LayerPlan] | None = None) -> dict[str, LayerPlan]:
    """`analysis.spend` of `budget`'s spendable part. A static int8 plan first spends as much as
    other schemes do, and keeps that plan where held-out calibration samples find it within
    HELD_OUT_FRACTION of `budget` (see INT8_STATIC_COSINE_FRACTION); otherwise it spends the
    smaller part."""
    safe = _spendable(budget, scheme)
    if scheme != Scheme.INT8_STATIC or len(analysis.calibration) < 2:
        return analysis.spend(safe, scheme, eligible, group_size, work=work, base=base)[0]
    bold = _spendable(budget, scheme, held_out=True)
    plans, _ = analysis.spend(bold, scheme, eligible, group_size, work=work, base=base)
    if not any(plan.scheme == scheme for plan in plans.values()):
        return plans  # a smaller allowance lowers nothing either
    held = analysis.held_out({name: plan for name, plan in plans.items() if plan.scheme != Scheme.FP32})
    if budget.tightened(HELD_OUT_FRACTION).allows(held.cosine, held.rel_error, held.metric_drop):
        return _noted(plans, scheme, f"the plan holds on held-out calibration samples ({held.text()})")
    plans, _ = analysis.spend(safe, scheme, eligible, group_size, work=work, base=base)
    return _noted(plans, scheme, f"half the cosine allowance: the larger plan went past {HELD_OUT_FRACTION:.0%} of the "
                                 f"budget on held-out calibration samples ({held.text()})")


def _noted(plans: dict[str, LayerPlan], scheme: str, note: str) -> dict[str, LayerPlan]:
    return {name: dataclasses.replace(plan, reason=f"{plan.reason}; {note}") if plan.scheme == scheme else plan
            for name, plan in plans.items()}


def _final_layer(gm: GraphModule, layers: dict[str, Node]) -> str | None:
    """The layer closest to the outputs (the classifier or projection head), if any."""
    names = list(layers)
    return names[-1] if names else None


def _sensitive_final(analysis: Analysis, name: str, scheme: str, opts) -> tuple[str, float] | None:
    """The final layer stays fp32 when lowering it alone uses over half of the error budget:
    its error reaches the outputs with nothing after it to average it out."""
    limit = opts.accuracy_budget.max_rel_error
    if limit is None and opts.accuracy_budget.min_cosine is not None:
        limit = (2 * (1 - opts.accuracy_budget.min_cosine)) ** 0.5  # cos ~ 1 - r^2/2
    if limit is None:
        return None
    error = analysis.solo_error(analysis.lowered(analysis.layers[name], scheme, opts.int4_group_size))
    if error > limit / 2:
        return f"final layer, sensitive: {scheme} alone costs rel. error {error:.3g} (over half the budget's {limit:.3g})", error
    return None


def _saving(layers: dict[str, Node], plans: dict[str, LayerPlan], ctx: PassContext) -> float:
    """Estimated seconds saved per call: multiply-adds moved from fp32 to each lowered precision."""
    peaks = ctx.profile.primary.peak_tflops
    fp32 = peaks.get(Precision.FP32) or min(peaks.values())
    saved = 0.0
    for plan in plans.values():
        if plan.scheme == Scheme.FP32:
            continue
        peak = peaks.get(plan.precision, fp32)
        saved += 2 * _macs(layers[plan.node]) / 1e12 * (1 / fp32 - 1 / peak) if peak > 0 else 0.0
    return saved


def _macs(node: Node) -> int:
    """Multiply-adds of a linear or convolution layer at the example size: one weight row per output element;
    of an experts node, every (token, expert) pair through one expert's up and down projections.
    Sizes are read as their example values: arithmetic on a dynamic size would guard it, and a
    guard pins that size to the example in the graph's shape environment for every later call."""
    if node.target is MOE_EXPERTS:
        index, up, down = (node.args[i].meta.get("val") for i in (1, UP_ARG, DOWN_ARG))
        if index is None or up is None or down is None:
            return 1
        return math.prod(shape_of(index)) * (math.prod(shape_of(up)[1:]) + math.prod(shape_of(down)[1:]))
    val, weight = node.meta.get("val"), node.args[1].meta.get("val")
    if val is None or weight is None:
        return 1
    return math.prod(shape_of(val)) * math.prod(shape_of(weight)[1:])


def measurement_samples(ctx: PassContext) -> tuple[list, list]:
    """(observer samples, measurement samples): the user's inputs, on which verification holds
    the budget (verify.worst_checks): the example inputs and the calibration samples. Without
    calibration data, the example inputs alone, a weaker proof that api reports as such; random
    draws of their spec stand in only when there are none."""
    examples = [tuple(ctx.example_inputs)] if ctx.example_inputs else []
    if ctx.calibration:
        return list(ctx.calibration), examples + list(ctx.calibration[:MEASURE_SAMPLES - len(examples)])
    samples = examples or [tuple(random_inputs(ctx.input_spec, ctx.options.seed + 100 + k)) for k in range(2)]
    return samples, samples


def _metric_drop(gm: GraphModule, ctx: PassContext):
    if ctx.metric_score is None:
        return None
    baseline = ctx.metric_score(lambda *flat: tuple(gm(*flat)))

    def drop(config: dict[str, LayerPlan]) -> float:
        from kiln.precision.sensitivity import _Simulator

        return baseline - ctx.metric_score(lambda *flat: tuple(_Simulator(gm, config, {}).run(*flat)))
    return drop


def _annotate(gm: GraphModule, plans: dict[str, LayerPlan], override: str) -> int:
    """Write a NodeDecision on every op node, and the LayerPlan on each weighted layer; returns
    how many nodes were annotated."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        count += 1
        plan = plans.get(node.name)
        if plan is not None:
            node.meta[LAYER_META] = plan
            reason = override or plan.reason or "kept at fp32"
            node.meta[DECISION_META] = NodeDecision(precision=plan.precision, reasons=(reason,))
        elif (kind := FRAGILE_KIND.get(node.target)) is not None:
            node.meta.pop(LAYER_META, None)
            node.meta[DECISION_META] = NodeDecision(reasons=(override or f"numerically fragile ({kind}): fp32 by rule",))
        else:
            node.meta.pop(LAYER_META, None)
            node.meta[DECISION_META] = NodeDecision(reasons=(override or "not a weighted layer: fp32",))
    return count
