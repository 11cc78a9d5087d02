"""PassContext: what a pass may read about the compile (read-only)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.hardware_profiles.schema import Profile
from kiln.options import CompileOptions
from kiln.types import InputSpec


@dataclass(frozen=True)
class PassContext:
    profile: Profile
    options: CompileOptions
    input_spec: InputSpec
    # Planning only (kiln.plan): placement may choose devices this machine cannot run, judging
    # backends by their capability tables alone; nothing is built.
    plan_only: bool = False
