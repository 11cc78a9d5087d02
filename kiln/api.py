"""optimize() and plan(): the stages of a compile, in order, each one call.

    profile -> capture -> calibration -> cache -> passes -> build (partition, engines, verify),
    the build driven by the precision search -> cache store

The work of each stage lives below: kiln.build (pre-build checks, inputs, builder, search),
kiln.passes (the pipeline), kiln.frontend, kiln.cache.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from kiln import cache as compile_cache
from kiln import hardware_profiles
from kiln.build import precision_report, precision_search, preflight
from kiln.build.builder import Builder, record_placement
from kiln.build.effort import RecordedRaces
from kiln.build.host_record import HostRecord
from kiln.build.isolate import WorkerPool
from kiln.build.inputs import flat_calibration, inputs_to_check, metric_score, verification_draws
from kiln.timing import time_engines
from kiln.build.verification import agrees_on_example, verify_against_eager
from kiln.cache import CompileCache, cache_key, quick_key
from kiln.frontend.capture import Captured, capture, keeping_modes
from kiln.frontend.fingerprint import model_fingerprint
from kiln.frontend.input_spec import export_dynamic_shapes, normalize_call
from kiln.hardware_profiles.schema import Profile
from kiln.host import openmp_spin_note
from kiln.ir import DECISION_META, LAYER_META, PartitionPlan, op_counts
from kiln.options import CompileOptions
from kiln.passes import pipeline
from kiln.passes.context import PassContext
from kiln.placement.partition import partition_graph
from kiln.progress import shown_on_terminal, stage
from kiln.report import PartitionRecord, Report
from kiln.runtime.compiled_model import CompiledModel
from kiln.types import DeviceKind, Dim, NodeDecision, Precision


def optimize(model: torch.nn.Module, profile: str | Path | Profile = "cpu-x86", example_inputs: Any = None, *,
             example_kwargs: Mapping[str, Any] | None = None, dynamic: Mapping[str, Mapping[int, Dim | str]] | None = None,
             options: CompileOptions | None = None, **option_overrides: Any) -> CompiledModel:
    """Compile `model` for the hardware `profile` names and verify it against eager PyTorch.

    example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors,
    shaped like real calls. dynamic: {input name: {axis: "dim name" | kiln.Dim}} for sizes
    that vary between calls. Options are CompileOptions fields, as `options=` or keywords.
    """
    opts = CompileOptions.build(options, **option_overrides)
    with keeping_modes(model), shown_on_terminal(opts.progress):  # the model leaves as it came; progress on a terminal
        return _optimize(model, profile, example_inputs, example_kwargs, dynamic, opts)


def _optimize(model, profile, example_inputs, example_kwargs, dynamic, opts: CompileOptions) -> CompiledModel:
    start, timings = time.monotonic(), {}
    with stage("profile", timings):
        prof = _profile(profile)
        preflight.check_profile_fits(prof, opts)
    cache = _open_cache(opts)
    quick = None
    if cache is not None:
        with stage("cache", timings):  # the model's fingerprint, before any capture
            quick, hit = _quick_lookup(cache, model, example_inputs, example_kwargs, dynamic, prof, opts)
        if hit is not None and (found := _quick_hit(model, hit, example_inputs, example_kwargs, opts, timings)) is not None:
            return found
    with stage("profile", timings):  # after the quick hit, which builds nothing (and need not import every runtime)
        preflight.check_primary_ready(prof, opts)
    workers = _build_workers(opts, prof)  # may start a child importing while the model is captured
    try:
        with stage("capture", timings):
            captured = capture(model, example_inputs, example_kwargs, dynamic, opts.moe_form, _no_moe_dispatch(prof, opts))
        with stage("calibration", timings):
            ctx = _pass_context(prof, opts, captured)
        if cache is not None:
            with stage("cache", timings):
                key = cache_key(captured.gm, captured.input_spec.to_dict(), captured.output_structure, prof.digest, opts.cache_fields())
                hit = cache.get(key)
            if hit is not None:
                verified = _verified_cache_hit(model, hit, captured, ctx, timings, key)
                if quick is not None:
                    cache.remember(quick, key)
                return verified
        report = _new_report(model, prof, captured)
        if (bypass := opts.cache_bypass_reason()) is not None and opts.cache:
            report.notes.append(bypass)
        with stage("passes", timings):
            decided = pipeline.run(captured.gm, ctx)
        report.passes = decided.records
        host_record = _host_record(opts)
        builder = Builder(model, captured, prof, ctx, verification_draws(captured, opts, ctx.calibration), report, timings,
                          None if opts.time_budget_s is None else start + opts.time_budget_s, workers, host_record)
        timed = opts.auto and opts.times_against_fp32(prof.select)
        compiled = precision_search.build_plan(builder.build, _precision_choice(decided), auto=opts.auto,
                                               fp32_fallback=opts.fp32_fallback, race=_race(captured, opts) if timed else None,
                                               history=_race_history(opts, captured, host_record))
        precision_report.check_requested_kept(compiled.report, opts)
        precision_report.warn_if_unproven(compiled.report)
        _finish_report(compiled.report, opts, timings)
        if cache is not None and opts.verify:  # only verified builds are reused
            with stage("cache store", timings):
                if cache.put(key, compiled) is not None:
                    compiled.report.notes.append(f"stored in the compile cache as {key[:16]}")
                    if quick is not None:
                        cache.remember(quick, key)
        return compiled
    finally:
        workers.close()


def _no_moe_dispatch(profile: Profile, opts: CompileOptions) -> str:
    """Why moe_form="auto" may not take the dispatch form (kiln.frontend.moe), or "": its node
    runs in kiln's eager partition, on the host CPU."""
    if not opts.eager_fallback:
        return "it runs in kiln's eager partition, and eager_fallback is off"
    if profile.primary.kind is not DeviceKind.CPU:
        return f"it runs on the host CPU, and the profile's primary device is a {profile.primary.kind.value}"
    return ""


def _profile(profile: str | Path | Profile) -> Profile:
    return profile if isinstance(profile, Profile) else hardware_profiles.load(profile)


def _pass_context(profile: Profile, opts: CompileOptions, captured: Captured, plan_only: bool = False) -> PassContext:
    """What the passes read: the options, the calibration samples checked against the captured
    input spec (the precision pass decides on them), and the budget's metric."""
    return PassContext(profile, opts, captured.input_spec, captured.example_inputs, flat_calibration(captured, opts),
                       metric_score(captured, opts), plan_only=plan_only)


def _new_report(model: torch.nn.Module, profile: Profile, captured: Captured) -> Report:
    report = Report(type(model).__name__, profile.name, captured.input_spec.describe(), list(captured.output_names))
    report.captured_ops = sum(n.op == "call_function" for n in captured.gm.graph.nodes)
    report.notes += captured.notes
    report.experts = [dict(block) for block in captured.moe_blocks]
    return report


def _precision_choice(decided: pipeline.PipelineRun) -> precision_search.Choice:
    chosen = decided.decided.get("assign_precision", {})
    # assign_sparsity's plans are assign_precision's with each layer's 2:4 decision added
    plans = decided.decided.get("assign_sparsity", chosen).get("plans", {})
    return precision_search.Choice(dict(plans), list(chosen.get("alternatives", [])), bool(chosen.get("race_runner_up")))


def _race(captured: Captured, opts: CompileOptions) -> precision_search.Race:
    """Two built models timed interleaved on the example inputs (longer while within the noise)."""
    def race(a: CompiledModel, b: CompiledModel) -> tuple[float, float]:
        first, second = time_engines([lambda *x: a.run_flat(x), lambda *x: b.run_flat(x)], tuple(captured.example_inputs),
                                     2 * opts.measure_seconds).medians()
        return first, second
    return race


def _finish_report(report: Report, opts: CompileOptions, timings: dict[str, float]) -> None:
    if not opts.verify:
        report.verification = []
        report.notes.append("verification was turned off (verify=False): outputs are unchecked")
    if (note := openmp_spin_note({p.backend for p in report.partitions})) is not None:
        report.notes.append(note)
    report.notes = list(dict.fromkeys(report.notes))
    report.timings = timings


def _build_workers(opts: CompileOptions, profile: Profile) -> WorkerPool:
    """Child processes for isolated candidate builds, mostly started by each selection as it
    learns which candidates it builds: started during a precision analysis, their imports slowed
    it more than they saved. A compile that will measure several backends with no analysis to
    run starts one before capture, so the first candidate's child has its imports (3.5 s of
    torch, kiln and the backends' libraries) done by the time its build begins."""
    pool = WorkerPool(opts.backends_for(profile.primary), opts.build_memory_mb)
    several = opts.backend is None and len(opts.backends_for(profile.primary)) > 1
    measured = (opts.select or profile.select) == "measure" and opts.effort != "fast"
    if several and measured and opts.isolate is not False and opts.precision is Precision.FP32:
        pool.expect(1, ahead=1)
    return pool


def _race_history(opts: CompileOptions, captured: Captured, record: HostRecord) -> RecordedRaces:
    """Races of lowered plans against fp32 on this host: always stored; trusted to skip one only at
    effort="default" when the user did not ask for the race (time_against_fp32=True)."""
    trusted = opts.effort == "default" and opts.time_against_fp32 is None
    return RecordedRaces(record, captured.gm, trusted)


def _host_record(opts: CompileOptions) -> HostRecord:
    """What this host measured before, beside the compile cache (read even with cache=False:
    it holds timings, not engines)."""
    return HostRecord.beside(Path(opts.cache_dir) if opts.cache_dir else compile_cache.default_dir())


def _open_cache(opts: CompileOptions) -> CompileCache | None:
    if not opts.cache or opts.cache_bypass_reason() is not None:
        return None
    # looked up on the module at call time, so a redirected default (tests' private caches) takes effect
    return CompileCache(Path(opts.cache_dir) if opts.cache_dir else compile_cache.default_dir(), int(opts.cache_max_gb * 2**30))


def _quick_lookup(cache: CompileCache, model, example_inputs, example_kwargs, dynamic, profile: Profile,
                  opts: CompileOptions) -> tuple[str | None, CompiledModel | None]:
    """(the quick key, or None where the fingerprint cannot decide; the entry it leads to, or None)."""
    fingerprint = model_fingerprint(model, example_inputs, example_kwargs, dynamic)
    if fingerprint is None:
        return None, None
    quick = quick_key(fingerprint, profile.digest, opts.cache_fields())
    key = cache.alias(quick)
    return quick, cache.get(key) if key is not None else None


def _quick_hit(model, compiled: CompiledModel, example_inputs, example_kwargs, opts: CompileOptions,
               timings: dict[str, float]) -> CompiledModel | None:
    """A hit found by the fingerprint, returned without capture once it agrees with the model on
    the example call; None (the compile goes on to capture and the full key) where it does not."""
    report = compiled.report
    checked = "not verified again (verify=False)"
    if opts.verify:
        with stage("verify", timings):
            args, kwargs = normalize_call(example_inputs, example_kwargs)
            if (sample := agrees_on_example(model, compiled, args, kwargs, opts, report)) is None:
                return None
            checked = f"verified again against the model on {sample}"
    report.notes = [n for n in report.notes if not n.startswith(("stored in the compile cache", "loaded from the compile cache"))]
    report.notes.append("loaded from the compile cache by the model's fingerprint (code, state, weights, input shapes), "
                        f"without capture; {checked}; passes and backend decisions are those of the original build")
    precision_report.warn_if_unproven(report)
    _finish_report(report, opts, timings)
    return compiled


def _verified_cache_hit(model, compiled: CompiledModel, captured: Captured, ctx: PassContext, timings: dict[str, float],
                        key: str) -> CompiledModel:
    """A cache hit still answers to eager: it is verified like a fresh build."""
    opts, report = ctx.options, compiled.report
    report.notes = [n for n in report.notes if not n.startswith("stored in the compile cache")]
    report.notes.append(f"loaded from the compile cache ({key[:16]}); passes and backend decisions are those of the "
                        "original build")
    precision_report.warn_if_unproven(report)
    if opts.verify:
        with stage("verify", timings):
            checked, synthetic, note = inputs_to_check(compiled.plan, verification_draws(captured, opts, ctx.calibration),
                                                       ctx.calibration)
            if note:
                report.notes.append(note)
            verify_against_eager(model, compiled, captured, checked, synthetic, opts, report, ctx.metric_score)
    _finish_report(report, opts, timings)
    return compiled


@dataclass
class PlannedModel:
    """What `plan` returns: where each partition would run and why, estimated, nothing built."""

    plan: PartitionPlan
    report: Report

    @property
    def estimated_ms(self) -> float:
        return sum(p.estimated_ms or 0.0 for p in self.plan.partitions)

    def render(self) -> str:
        lines = [f"kiln placement plan: {self.report.model} for profile {self.report.profile} (planned, not built)",
                 f"  inputs:  {self.report.inputs}", "", "Partitions"]
        lines += self.report.render_partitions()
        lines += self.report.render_placement()
        lines += self.report.render_sparsity()
        lines += ["", f"Estimated end to end: {self.estimated_ms:.3f} ms (kiln's cost model, transfers included)"]
        lines += [f"Note: {n}" for n in self.report.notes]
        return "\n".join(lines)

    def html(self) -> str:
        from kiln.placement.html import render_html

        return render_html(self.report, title=f"{self.report.model} on {self.report.profile} (planned)")

    def __str__(self) -> str:
        return self.render()


def plan(model: torch.nn.Module, profile: str | Path | Profile = "cpu-x86", example_inputs: Any = None, *,
         example_kwargs: Mapping[str, Any] | None = None, dynamic: Mapping[str, Mapping[int, Dim | str]] | None = None,
         options: CompileOptions | None = None, assume_precision: str | Precision | None = None,
         **option_overrides: Any) -> PlannedModel:
    """Capture, run the passes and place the graph on `profile`'s devices without building
    anything: devices this machine lacks are judged by their backends' capability tables.

    assume_precision: plan as if every op ran at this precision, in place of assign_precision's
    measured choice, e.g. "fp16" for an NPU without fp32. (`precision=` is a CompileOptions
    field: the precision requested, decided by the precision pass as optimize() would.)"""
    if "precision" in option_overrides and assume_precision is None and options is None:
        warnings.warn("kiln.plan(precision=...) meant 'assume every op at this precision'; that is now "
                      "assume_precision=..., and precision=... is the requested precision as in optimize() "
                      "(the old meaning is kept for one more release)", DeprecationWarning, stacklevel=2)
        assume_precision = option_overrides.pop("precision")
    opts = CompileOptions.build(options, **option_overrides)
    prof = _profile(profile)
    with keeping_modes(model):
        captured = capture(model, example_inputs, example_kwargs, dynamic, opts.moe_form, _no_moe_dispatch(prof, opts))
    if assume_precision is not None:
        wanted = assume_precision if isinstance(assume_precision, Precision) else Precision.parse(assume_precision)
        for node in captured.gm.graph.nodes:
            if node.op == "call_function":
                node.meta[DECISION_META] = NodeDecision(precision=wanted, reasons=(f"planned at {wanted.value}",))
        opts = CompileOptions.build(opts, disabled_passes=(*opts.disabled_passes, "assign_precision"))
    report = _new_report(model, prof, captured)
    ctx = _pass_context(prof, opts, captured, plan_only=True)  # the precision pass decides as optimize() would
    report.passes = pipeline.run(captured.gm, ctx).records
    report.precision = [n.meta[LAYER_META].report_row()
                        for n in captured.gm.graph.nodes if LAYER_META in n.meta]
    planned = partition_graph(captured.gm, prof, captured.input_spec, captured.output_names, captured.example_inputs,
                              export_dynamic_shapes(captured.input_spec), ctx.calibration, opts.calibration_observer)
    record_placement(planned, report)
    for partition in planned.partitions:
        ops = op_counts(partition.graph.gm) if len(planned.partitions) > 1 else op_counts(captured.gm)
        report.partitions.append(PartitionRecord(partition.name, partition.device, partition.placed_backend,
                                                 sum(ops.values()), ops, partition.estimated_ms))
    return PlannedModel(planned, report)
