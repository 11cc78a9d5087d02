"""PassContext: what a pass may read about the compile (read-only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kiln.hardware_profiles.schema import Profile
from kiln.options import CompileOptions
from kiln.types import InputSpec

# Scores a function over flat tensors with the accuracy budget's metric on its dataset.
MetricScore = Callable[[Callable[..., tuple]], float]


@dataclass(frozen=True)
class PassContext:
    profile: Profile
    options: CompileOptions
    input_spec: InputSpec
    example_inputs: tuple[torch.Tensor, ...] = ()  # flat, in spec order
    calibration: tuple[tuple[torch.Tensor, ...], ...] = ()  # the user's calibration samples, flat
    metric_score: MetricScore | None = None  # set when the budget has a metric and dataset
    # Planning only (kiln.plan): placement may choose devices this machine cannot run, judging
    # backends by their capability tables alone; nothing is built.
    plan_only: bool = False
    # Written by assign_precision under precision="auto": the other precisions' plans that fit
    # the budget, most estimated saving first, as (scheme, {node name: LayerPlan}). optimize()
    # builds the next one when the chosen plan measures slower than fp32.
    alternatives: list = field(default_factory=list)
