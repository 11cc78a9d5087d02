"""PassContext: what a pass may read about the compile (read-only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from kiln.hardware_profiles.schema import Profile
from kiln.ir import LayerPlan
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
    # Set when the precision search (kiln/build/precision_search.py) asks for a plan it chose
    # among those assign_precision weighed (a back-off, the fp32 comparison, the next precision):
    # {layer node name: LayerPlan} that assign_precision annotates instead of analysing again.
    layer_plans: Mapping[str, LayerPlan] | None = None
