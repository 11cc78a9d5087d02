"""Decide which linear and convolution layers get 2:4 structured sparse weights (decide only).

Runs when CompileOptions(sparsity="2:4") asks for it, after assign_precision: a layer's weight is
pruned (2 largest |w| of every 4 along the input axis kept, precision/sparsity.py) on top of the
precision it was given, and NVIDIA's sparse tensor cores then do half its multiply-adds. Pruning
changes answers, so it is spent from the accuracy budget like a lower precision:

1. Eligible layers: the device runs 2:4 (profile `structured_sparsity`), the layer computes at a
   precision sparse tensor cores take (fp16, bf16, int8, fp8), its weight is its own, it is large
   enough to pay, and a tried backend's sparse lowering takes its shape (TensorRT: input channels
   in groups of 4; Inductor on CUDA: linear weights in semi-structured blocks).
2. Each eligible layer pruned alone ranks the layers by the model output error it causes; the
   longest least-harmful prefix whose combined simulation keeps the budget is pruned: the worst
   layers are backed off.

Each layer's LayerPlan then carries `sparsity` ("2:4" or None), its measured error and the
reason; the lowering prunes the chosen weights before any backend sees them
(precision/lowering.py). Only the primary device is planned for: a layer placed elsewhere keeps
its pruned weight (answers within the budget) without the sparse speed-up.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from kiln.backends.inductor_sparsity import semi_structured_refusal
from kiln.backends.tensorrt_config import trt_sparse_refusal
from kiln.errors import OptionsError
from kiln.fx_helpers import attr_value
from kiln.hardware_profiles.schema import Profile
from kiln.ir import DECISION_META, LAYER_META, LayerPlan, Scheme
from kiln.passes.assign_precision import LINEARS, SPEND_FRACTION, measurement_samples, weighted_layers
from kiln.options import CompileOptions
from kiln.passes.context import PassContext
from kiln.passes.result import PassResult, Skip
from kiln.precision.sparsity import SparsityAnalysis
from kiln.types import DeviceKind, NodeDecision, Precision

# The precisions sparse tensor cores multiply 2:4 weights in (NVIDIA A100 Tensor Core GPU
# Architecture whitepaper, "Fine-Grained Structured Sparsity"; fp8 from Hopper on). tf32 too,
# but kiln's fp32 plans clear TF32 to stay within fp32 tolerance, so an fp32 layer stays dense.
SPARSE_DTYPES = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16, Precision.INT8: torch.int8,
                 Precision.FP8: torch.float8_e4m3fn}
# Below this many weights a layer's GEMM is bound by launch and memory traffic, not math, and
# the sparse kernel's index metadata costs what the skipped multiply-adds save (a heuristic:
# 128 x 128; re-measure on a GPU with bench/ when one is available).
MIN_SPARSE_WEIGHTS = 128 * 128


def assign_sparsity(gm: GraphModule, ctx: PassContext) -> PassResult:
    pattern = ctx.options.sparsity
    lowerings = sparse_lowerings(ctx.profile, ctx.options)
    layers = weighted_layers(gm, experts=False)  # experts run in PyTorch, which has no 2:4 kernels on the CPU
    plans = {name: node.meta.get(LAYER_META) or _plain(node) for name, node in layers.items()}
    if ctx.layer_plans is not None:  # a rebuild: the plans the precision search passed carry the sparsity chosen before
        return _annotated(gm, layers, plans, ())
    held, eligible = {}, []
    for name, node in layers.items():
        why = _ineligible(gm, node, plans[name], lowerings)
        if why is None:
            eligible.append(name)
        else:
            held[name] = why
    _, samples = measurement_samples(ctx)  # (observer samples, measured ones): no activation ranges needed here
    analysis = SparsityAnalysis(gm, plans, samples, ctx.metric_score)
    pruned, errors, final = analysis.spend(ctx.options.accuracy_budget.tightened(SPEND_FRACTION), eligible)
    rank = {name: index + 1 for index, name in enumerate(sorted(eligible, key=lambda n: errors[n]))}
    for name in eligible:
        where = f"error rank {rank[name]} of {len(eligible)}, alone: rel. error {errors[name]:.3g}"
        if name in pruned:
            reason = f"{pattern} keeps the budget ({where}; lowered by {', '.join(lowerings)}); all pruned: {final.text()}"
        else:
            reason = f"{pattern} would exceed the budget ({where})"
        plans[name] = dataclasses.replace(plans[name], sparsity=pattern if name in pruned else None,
                                          sparsity_error=errors[name], sparsity_reason=reason)
    for name, why in held.items():
        plans[name] = dataclasses.replace(plans[name], sparsity=None, sparsity_error=0.0, sparsity_reason=why)
    skipped = tuple(Skip(name, plans[name].sparsity_reason) for name in layers if name not in pruned)
    return _annotated(gm, layers, plans, skipped)


def sparse_lowerings(profile: Profile, options: CompileOptions) -> tuple[str, ...]:
    """The backends tried on the primary device that lower its 2:4 weights to sparse kernels; an
    OptionsError naming the profile and device where the device has no sparse tensor cores or no
    such backend is tried (api's preflight asks before any work, the pass again)."""
    pattern, device = options.sparsity, profile.primary
    if pattern not in device.structured_sparsity:
        others = [d.name for d in profile.devices.values() if pattern in d.structured_sparsity]
        also = f"; its device(s) {', '.join(others)} do, but kiln plans sparsity for the primary device only" if others else ""
        raise OptionsError(f"sparsity={pattern!r} needs sparse tensor cores, and device {device.name} ({device.model}) of "
                           f"profile {profile.name} has none (its profile lists no structured_sparsity: [\"{pattern}\"]){also}",
                           where="options.sparsity",
                           fix="leave sparsity unset for this profile, or use one whose device runs 2:4 (a100, a10, h100, l4, jetson-orin)")
    tried = options.backends_for(device)
    found = tuple(b for b in tried if b == "tensorrt" or (b == "inductor" and device.kind is DeviceKind.GPU))
    if not found:
        raise OptionsError(f"sparsity={pattern!r}: none of the backends tried on device {device.name} ({', '.join(tried)}) "
                           "lowers 2:4 weights to sparse kernels", where="options.sparsity",
                           fix="let the profile's backends be tried (TensorRT, or Inductor on CUDA), or leave sparsity unset")
    return found


def _ineligible(gm: GraphModule, node: Node, plan: LayerPlan, lowerings: tuple[str, ...]) -> str | None:
    """Why `node` keeps a dense weight whatever the budget, or None when it is a candidate."""
    weight_node, weight = node.args[1], attr_value(gm, node.args[1])
    others = [u.name for u in weight_node.users if u is not node]
    if others:
        return f"kept dense: its weight is shared with {', '.join(others[:3])} (pruning it would change them too)"
    if plan.precision not in SPARSE_DTYPES:
        return (f"kept dense: it computes at {plan.precision.value}, and sparse tensor cores run 2:4 at fp16, bf16, int8 "
                "and fp8 only (ask for one with precision=..., or 'auto')")
    if weight.numel() < MIN_SPARSE_WEIGHTS:
        return f"kept dense: too small to pay ({weight.numel()} weights; sparse kernels pay from {MIN_SPARSE_WEIGHTS})"
    refusals = []
    for backend in lowerings:
        if backend == "tensorrt":
            why = trt_sparse_refusal(weight.shape)
        elif node.target not in LINEARS:
            why = "semi-structured sparse tensors multiply linear weights only, not convolutions"
        else:
            why = semi_structured_refusal(weight.shape, SPARSE_DTYPES[plan.precision])
        if why is None:
            return None
        refusals.append(f"{backend}: {why}")
    return "kept dense: no sparse lowering takes its shape (" + "; ".join(refusals) + ")"


def _plain(node: Node) -> LayerPlan:
    """The plan of a layer assign_precision did not annotate (it was disabled): fp32."""
    return LayerPlan(node.name, "linear" if node.target in LINEARS else "conv", str(node.args[1].target), Scheme.FP32)


def _annotated(gm: GraphModule, layers: dict[str, Node], plans: dict[str, LayerPlan], skipped: tuple[Skip, ...]) -> PassResult:
    for name, node in layers.items():
        plan = plans[name]
        node.meta[LAYER_META] = plan
        decision = node.meta.get(DECISION_META) or NodeDecision(precision=plan.precision)
        kept = tuple(r for r in decision.reasons if not r.startswith(("sparsity: ",)))
        if plan.sparsity_reason:
            node.meta[DECISION_META] = dataclasses.replace(decision, reasons=(*kept, f"sparsity: {plan.sparsity_reason}"))
    sparse = sum(1 for p in plans.values() if p.sparsity)
    return PassResult(False, {"sparse": sparse, "layers": len(layers)}, skipped=skipped, annotated=len(layers),
                      decided={"plans": plans})
