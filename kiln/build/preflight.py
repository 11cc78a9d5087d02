"""Checks before anything is captured or built: the profile runs what the options ask for, and
a backend for its primary device is installed here."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.backends import registry
from kiln.errors import BackendUnavailable, OptionsError
from kiln.hardware_profiles.schema import Profile
from kiln.ir import BACKEND_NAMES, EAGER
from kiln.options import CompileOptions
from kiln.passes.assign_sparsity import sparse_lowerings
from kiln.precision.capability import device_runs
from kiln.types import Precision


def check_profile_fits(profile: Profile, opts: CompileOptions) -> None:
    """The requested precision runs on the profile's primary device and on a backend tried there;
    a forced backend exists."""
    if opts.backend is not None:
        registry.get(opts.backend)  # raises BackendUnavailable naming the known backends
    if opts.sparsity is not None:
        sparse_lowerings(profile, opts)  # raises OptionsError naming the profile and its device
    device = profile.primary
    if opts.auto or opts.precision is Precision.FP32:
        if Precision.FP32 not in device.precisions:  # the ops around lowered layers run in fp32
            raise OptionsError(f"profile {profile.name}'s device {device.name} does not run fp32",
                               where=f"{Path(profile.source_file).name}: devices.{device.name}.peak_tflops",
                               fix=f"choose one of {', '.join(sorted(p.value for p in device.precisions))} with precision=...")
        return
    precision = opts.precision
    runs = sorted(p.value for p in device.precisions)
    if not device_runs(device, precision):
        raise OptionsError(f"profile {profile.name}'s device {device.name} ({device.model}) does not run "
                           f"{precision.value}; it runs {', '.join(runs)}",
                           where=f"{Path(profile.source_file).name}: devices.{device.name}.peak_tflops",
                           fix=f"choose one of {', '.join(runs)}, or precision='auto'")
    names = opts.backends_for(device)
    if precision is not Precision.FP32 and not registry.lowering(names, device, precision):
        able = sorted(registry.lowering(tuple(n for n in BACKEND_NAMES if n != EAGER), device, precision))
        raise OptionsError(f"no backend tried for device {device.name} ({', '.join(names)}) runs {precision.value} "
                           f"on a {device.kind.value}",
                           where="options.backend" if opts.backend else f"{Path(profile.source_file).name}: devices.{device.name}.backends",
                           fix=(f"use backend={able[0]!r}" if able else "choose another precision") + ", or precision='auto'")


def check_primary_ready(profile: Profile, opts: CompileOptions) -> None:
    """Building needs the profile's primary device on this machine; planning does not (kiln.plan)."""
    device = profile.primary
    probe = torch.fx.Graph().placeholder("x")  # a node every table accepts: only the device is asked about
    reasons = []
    for name in opts.backends_for(device):
        try:
            backend = registry.get(name)
        except BackendUnavailable as exc:
            reasons.append(f"{name}: {exc.what}")
            continue
        status = backend.available()
        support = backend.supports(probe, device) if status.ok else None
        if support is not None and support.ok:
            return
        reasons.append(f"{name}: {status.reason} ({status.install_hint})" if not status.ok else f"{name}: {support.reason}")
    raise BackendUnavailable(f"no backend can build for device {device.name} of profile {profile.name} here: {'; '.join(reasons)}",
                             where=f"profile {profile.name}, device {device.name}",
                             fix="build on a machine with that device and its runtime, or plan without building: kiln.plan(...) "
                                 "or `kiln compile --plan-only`")
