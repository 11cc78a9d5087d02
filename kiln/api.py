"""optimize(): profile -> capture -> passes -> plan -> backend selection -> verification."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from kiln import hardware_profiles
from kiln.host import usable_cores
from kiln.backends.base import BackendSettings
from kiln.build import preflight
from kiln.backends.isolate import build_isolated
from kiln.backends.select import select_engine, time_interleaved
from kiln import cache as compile_cache
from kiln.cache import CompileCache, cache_key
from kiln.errors import BackendError, BackendUnavailable, VerificationError
from kiln.frontend.capture import Captured, capture, plain_containers
from kiln.frontend.input_spec import export_dynamic_shapes, random_inputs, rebuild_call
from kiln.precision import setup as precision_setup
from kiln.precision.lowering import with_lowered_weights
from kiln.hardware_profiles.schema import Profile
from kiln.options import CompileOptions
from kiln.passes import pipeline
from kiln.passes.assign_precision import apply_plan
from kiln.passes.context import PassContext
from kiln.ir import PartitionPlan, op_counts
from kiln.placement.partition import partition_graph
from kiln.ir import EAGER
from kiln.report import PartitionRecord, Report
from kiln.runtime.compiled_model import CompiledModel
from kiln.types import Dim, NodeDecision, Precision
from kiln.verify import OutputCheck, failures_text, worst_checks

log = logging.getLogger("kiln")


def optimize(model: torch.nn.Module, profile: str | Path | Profile = "cpu-x86", example_inputs: Any = None, *,
             example_kwargs: Mapping[str, Any] | None = None, dynamic: Mapping[str, Mapping[int, Dim | str]] | None = None,
             options: CompileOptions | None = None, **option_overrides: Any) -> CompiledModel:
    """Compile `model` for the hardware `profile` names and verify it against eager PyTorch.

    example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors,
    shaped like real calls. dynamic: {input name: {axis: "dim name" | kiln.Dim}} for sizes
    that vary between calls. Options are CompileOptions fields, as `options=` or keywords.
    """
    opts = CompileOptions.build(options, **option_overrides)
    start = time.monotonic()
    timings: dict[str, float] = {}
    with _stage("profile", timings):
        prof = profile if isinstance(profile, Profile) else hardware_profiles.load(profile)
        preflight.check_profile_fits(prof, opts)
        preflight.check_primary_ready(prof, opts)
    with _stage("capture", timings):
        captured = capture(model, example_inputs, example_kwargs, dynamic)
    with _stage("calibration", timings):
        calibration = precision_setup.flat_calibration(captured, opts)
    cache, key = _cache(opts), None
    if cache is not None:
        with _stage("cache", timings):
            key = cache_key(captured.gm, captured.input_spec.to_dict(), captured.output_structure, prof.digest, opts.cache_fields())
            hit = cache.get(key)
        if hit is not None:
            return _finish_cache_hit(model, hit, captured, opts, timings, key)
    report = Report(type(model).__name__, prof.name, captured.input_spec.describe(), list(captured.output_names))
    if (bypass := opts.cache_bypass_reason()) is not None and opts.cache:
        report.notes.append(bypass)
    ctx = PassContext(prof, opts, captured.input_spec, captured.example_inputs, calibration,
                      precision_setup.metric_score(captured, opts))
    with _stage("passes", timings):
        report.captured_ops = sum(n.op == "call_function" for n in captured.gm.graph.nodes)
        report.passes = pipeline.run(captured.gm, ctx)
    draws = _verification_inputs(captured, opts, calibration)
    deadline = None if opts.time_budget_s is None else start + opts.time_budget_s

    def build_and_verify() -> CompiledModel:
        plan = partition_graph(captured.gm, prof, captured.input_spec, captured.output_names, captured.example_inputs,
                          export_dynamic_shapes(captured.input_spec), calibration, opts.calibration_observer)
        _record_placement(plan, report)
        precision_setup.record_plan(plan, opts, report, bool(calibration))
        checked, synthetic = _inputs_to_check(plan, draws, calibration, report)
        workdir = Path(tempfile.mkdtemp(prefix="kiln-build-"))
        try:
            with _stage("compile", timings):
                engines = _build_engines(plan, prof, opts, checked, synthetic, workdir, report, deadline)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        compiled = CompiledModel(plan, engines, captured.input_spec, captured.output_structure, report,
                                 {"name": prof.name, "digest": prof.digest}, captured.output_none_positions)
        weakref.finalize(compiled, shutil.rmtree, workdir, True)
        if opts.verify:
            with _stage("verify", timings):
                _verify_against_eager(model, compiled, captured, checked, synthetic, opts, report)
        return compiled

    try:
        compiled = _build_within_budget(build_and_verify, captured, ctx, report)
    except (BackendUnavailable, BackendError, VerificationError) as exc:
        if not (opts.auto and report.lowered):
            raise
        # "auto" lowers precision as an optimisation: when no backend builds the lowered plan
        # within the budget, the model is built at fp32 rather than refused (and the report says so)
        lowered = precision_setup.back_to_fp32(captured.gm, f"auto: the lowered plan failed ({type(exc).__name__})")
        report.notes = [n for n in report.notes if n not in (precision_setup.UNPROVEN, INTEGER_CHECKS)]
        report.notes.append(f"precision=auto: no backend built the plan with {lowered} lowered layers within the budget "
                            f"({exc.what[:300]}); built at fp32 instead")
        report.partitions, report.placement = [], []
        report.passes += pipeline.run(captured.gm, ctx, pipeline.PLACEMENT_ONLY)  # placement at fp32
        compiled = build_and_verify()
    else:
        if opts.auto and report.lowered and _precision_mode(prof, opts) == "measure":
            compiled = _faster_than_fp32(compiled, build_and_verify, captured, ctx, opts, report)
    if not opts.verify:
        report.notes.append("verification was turned off (verify=False): outputs are unchecked")
    report.notes = list(dict.fromkeys(report.notes))
    report.timings = timings
    if cache is not None and opts.verify:  # only verified builds are reused
        with _stage("cache store", timings):
            if cache.put(key, compiled) is not None:
                report.notes.append(f"stored in the compile cache as {key[:16]}")
    return compiled


# A lowered plan that misses the budget once built is rebuilt with these shares of its lowered
# layers back at fp32, most sensitive first: the sensitivity analysis simulates each backend's
# rounding and measures a few samples, so the built plan can land just outside the budget.
BACK_OFF_SHARES = (0.25, 0.5)


def _build_within_budget(build_and_verify, captured: Captured, ctx: PassContext, report: Report) -> CompiledModel:
    for share in (*BACK_OFF_SHARES, None):
        try:
            return build_and_verify()
        except VerificationError as exc:
            if share is None or not report.lowered:
                raise
            lowered = sum(row["scheme"] != "fp32" for row in report.precision)
            raised = precision_setup.raise_most_sensitive(
                captured.gm, share, f"back to fp32: the plan with {lowered} lowered layers missed the budget once built")
            report.notes.append(f"precision: the plan with {lowered} lowered layers missed the budget once built "
                                f"({exc.what[:200]}); its {raised} most sensitive lowered layers went back to fp32 and it was rebuilt")
            report.partitions, report.placement = [], []
            report.passes += pipeline.run(captured.gm, ctx, pipeline.PLACEMENT_ONLY)
    raise AssertionError("unreachable")  # the last share re-raises


def _mode(profile: Profile, opts: CompileOptions) -> str:
    """How each partition's backend is chosen: a forced backend is the only candidate."""
    return "prefer" if opts.backend else (opts.select or profile.select)


def _precision_mode(profile: Profile, opts: CompileOptions) -> str:
    """Whether "auto" times its lowered plan against fp32. A forced backend still measures:
    its low-precision kernels can lose to its own fp32 ones (OpenVINO's bf16 on a CPU
    without AMX), and the user who named the backend asked for speed on it all the same."""
    return opts.select or profile.select


_REPORT_FIELDS = ("precision", "precision_summary", "partitions", "placement", "verification", "verified_draws", "notes",
                  "candidates")


def _faster_than_fp32(lowered: CompiledModel, build_and_verify, captured: Captured, ctx: PassContext,
                      opts: CompileOptions, report: Report) -> CompiledModel:
    """When measuring, "auto" keeps a lowered plan only if it runs faster than fp32 here: the
    profile's peak figures that chose it are estimates, and a runtime's low-precision kernels
    can lose to its fp32 ones. A plan that loses makes way for the next precision that fit the
    budget (ctx.alternatives, e.g. int8 after bf16), built and timed the same way; fp32 is kept
    when none wins. Every build is verified; each is timed interleaved with the fp32 one."""
    kept = _snapshot(report)
    lowered_layers = precision_setup.back_to_fp32(captured.gm, "auto: fp32 measured against the lowered plan")
    _place_again(captured, ctx, report)
    try:
        fp32 = build_and_verify()
    except (BackendUnavailable, BackendError, VerificationError) as exc:
        _restore(report, kept)
        report.notes.append(f"precision=auto: the fp32 comparison build failed ({exc.what[:200]}); the lowered plan is kept")
        return lowered
    inputs = tuple(captured.example_inputs)
    first = True
    while True:
        lowered_s, fp32_s = time_interleaved([lambda *x: lowered.run_flat(x), lambda *x: fp32.run_flat(x)], inputs,
                                             2 * opts.measure_seconds)
        verdict = (f"precision=auto: the lowered plan ({lowered_layers} layers, {_schemes_of(kept)}) ran "
                   f"{lowered_s * 1e3:.2f} ms, fp32 {fp32_s * 1e3:.2f} ms (timed interleaved here)")
        if fp32_s > lowered_s:
            _restore(report, kept)
            report.notes.append(f"{verdict}; the lowered plan kept")
            return lowered
        if first:  # the fp32 build's candidate list begins with the first plan's candidates
            for candidate in report.candidates[:len(kept["candidates"])]:
                if candidate.status == "chosen":
                    candidate.status, candidate.reason = "slower", "with the lowered precision plan: slower than fp32 here"
            first = False
        report.notes.append(f"{verdict}; fp32 kept" if not ctx.alternatives else f"{verdict}; next: {ctx.alternatives[0][0]}")
        if not ctx.alternatives:
            precision_setup.back_to_fp32(captured.gm, "auto: fp32 measured faster than the lowered plans")
            return fp32
        scheme, plans = ctx.alternatives.pop(0)
        fp32_state = _snapshot(report)
        apply_plan(captured.gm, plans)
        _place_again(captured, ctx, report)
        try:
            lowered = build_and_verify()
        except (BackendUnavailable, BackendError, VerificationError) as exc:
            _restore(report, fp32_state)
            precision_setup.back_to_fp32(captured.gm, "auto: fp32 measured against the lowered plans")
            report.notes.append(f"precision=auto: the {scheme} plan failed ({exc.what[:200]}); fp32 kept")
            return fp32
        kept, lowered_layers = _snapshot(report), sum(p.scheme != "fp32" for p in plans.values())
        _restore(report, fp32_state)  # the fp32 build stays the report's picture until a plan wins


def _snapshot(report: Report) -> dict:
    return {name: copy.copy(getattr(report, name)) for name in _REPORT_FIELDS}


def _restore(report: Report, state: dict) -> None:
    for name, value in state.items():
        setattr(report, name, copy.copy(value))


def _schemes_of(state: dict) -> str:
    return ", ".join(sorted({row["scheme"] for row in state["precision"] if row["scheme"] != "fp32"})) or "fp32"


def _place_again(captured: Captured, ctx: PassContext, report: Report) -> None:
    """Placement again after the layers' precisions changed; the notes of a lowered build go."""
    report.notes = [n for n in report.notes if n not in (precision_setup.UNPROVEN, INTEGER_CHECKS)]
    report.partitions, report.placement = [], []
    report.passes += pipeline.run(captured.gm, ctx, pipeline.PLACEMENT_ONLY)


def _cache(opts: CompileOptions) -> CompileCache | None:
    if not opts.cache or opts.cache_bypass_reason() is not None:
        return None
    # looked up on the module at call time, so a redirected default (tests' private caches) takes effect
    return CompileCache(Path(opts.cache_dir) if opts.cache_dir else compile_cache.default_dir(), int(opts.cache_max_gb * 2**30))


def _finish_cache_hit(model, compiled: CompiledModel, captured: Captured, opts: CompileOptions,
                      timings: dict[str, float], key: str) -> CompiledModel:
    """A cache hit still answers to eager: it is verified like a fresh build."""
    report = compiled.report
    report.notes = [n for n in report.notes if not n.startswith("stored in the compile cache")]
    report.notes.append(f"loaded from the compile cache ({key[:16]}); passes and backend decisions are those of the "
                        "original build")
    precision_setup.warn_again(report)
    if opts.verify:
        with _stage("verify", timings):
            calibration = precision_setup.flat_calibration(captured, opts)
            checked, synthetic = _inputs_to_check(compiled.plan, _verification_inputs(captured, opts, calibration), calibration,
                                                  report)
            _verify_against_eager(model, compiled, captured, checked, synthetic, opts, report)
    else:
        report.verification = []
        report.notes.append("verification was turned off (verify=False): outputs are unchecked")
    report.notes = list(dict.fromkeys(report.notes))
    report.timings = timings
    return compiled


@contextmanager
def _stage(name: str, timings: dict[str, float]):
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    log.info("%s done in %.1f s", name, timings[name])


def _threads(profile: Profile, opts: CompileOptions) -> int:
    here = usable_cores()
    return opts.threads or max(1, min(profile.primary.cores or here, here))


def _verification_inputs(captured: Captured, opts: CompileOptions, calibration: tuple = ()) -> list[tuple[torch.Tensor, ...]]:
    """The example inputs, `verify_draws` fresh random draws of the same spec, then the
    calibration samples (the inputs a lowered model's accuracy is proven on)."""
    draws = [captured.example_inputs]
    example_sizes = {d.name: captured.example_inputs[i].shape[axis]
                     for i, t in enumerate(captured.input_spec.tensors) for axis, d in enumerate(t.shape) if isinstance(d, Dim)}
    for k in range(opts.verify_draws if opts.verify else 0):
        sizes = example_sizes if k == 0 else None  # first draw at the example's sizes, later ones vary dynamic dims
        draws.append(tuple(random_inputs(captured.input_spec, opts.seed + k, sizes)))
    return draws + [tuple(c) for c in calibration]


INTEGER_CHECKS = ("integer layers were verified on the example inputs and the calibration samples, not on random draws: "
                  "their activation ranges are calibrated on real inputs, which random draws do not resemble")


def _inputs_to_check(plan: PartitionPlan, draws: list, calibration: tuple, report: Report) -> tuple[list, frozenset[int]]:
    """The verification inputs for `plan` and the indexes among them of the random draws, which
    a lowered plan meets at its precision's tolerance, not its budget (verify.worst_checks)."""
    checked = draws
    if _integer_plan(plan) and calibration and len(draws) > 1 + len(calibration):
        checked = _real_inputs_only(draws, calibration)
        report.notes.append(INTEGER_CHECKS)
    return checked, frozenset(range(1, len(checked) - len(calibration)))


def _integer_plan(plan: PartitionPlan) -> bool:
    return any(layer.precision.is_integer for partition in plan.partitions for layer in partition.graph.precision.lowered)


def _real_inputs_only(draws: list, calibration: tuple) -> list:
    """An integer plan's activation ranges are calibrated on the user's samples: random draws
    of the input spec fall outside them (an image model's first layer sees noise, not pixels),
    so its accuracy is verified on the example inputs and the calibration samples."""
    return [draws[0], *draws[len(draws) - len(calibration):]]


def _build_engines(plan: PartitionPlan, profile: Profile, opts: CompileOptions, draws, synthetic: frozenset[int], workdir: Path,
                   report: Report, deadline: float | None) -> dict:
    engines = {}
    mode = _mode(profile, opts)
    isolate = opts.isolate if opts.isolate is not None else mode == "measure"
    for partition in plan.partitions:
        device = profile.devices[partition.device]
        eager = partition.placed_backend == EAGER  # PyTorch itself: nothing to choose, nothing to isolate
        names = (EAGER,) if eager else (opts.backend,) if opts.backend else device.backends
        graph = partition.graph
        # backends build from the plan's rounded weights and corrected biases; the references stay fp32
        built = graph if eager else with_lowered_weights(graph)
        budget = opts.accuracy_budget if graph.precision.lowered else None
        settings = BackendSettings(device, _threads(profile, opts), workdir, graph.precision.lowest(), budget=budget,
                                   fuse=opts.fusion, autotune=opts.autotune)
        partition_draws = draws if len(plan.partitions) == 1 else _partition_draws(plan, partition, draws)
        with torch.no_grad():  # the post-pass graph, run eagerly, is what each candidate must match
            references = [tuple(graph.gm(*inputs)) for inputs in partition_draws]

        def check(engine, references=references, graph=graph, partition_draws=partition_draws) -> list[OutputCheck]:
            runs = ((list(engine(*inputs)), list(want)) for inputs, want in zip(partition_draws, references))
            return worst_checks(graph.output_names, runs, settings.precision, budget, synthetic)

        def build_isolated_candidate(backend, references=references, built=built, settings=settings, partition_draws=partition_draws):
            engine, checks, _ = build_isolated(backend, built, settings, partition_draws, references, synthetic,
                                               opts.build_timeout_s, opts.build_memory_mb)
            return engine, checks

        log.info("building partition %s on %s: candidates %s (%s%s)", partition.name, device.name, ", ".join(names), mode,
                 ", each in a child process" if isolate and not eager else "")
        selection = select_engine(built, names, "prefer" if eager else mode, settings, check, opts.measure_seconds,
                                  opts.allow_fallback, build_isolated_candidate if isolate and not eager else None, deadline)
        partition.backend = selection.backend
        engines[partition.name] = selection.engine
        report.candidates.extend(selection.candidates)
        ops = op_counts(graph.gm)
        report.partitions.append(PartitionRecord(partition.name, partition.device, selection.backend, sum(ops.values()), ops,
                                                 partition.estimated_ms, _median_ms(selection.engine, graph.example_inputs)))
    return engines


def _partition_draws(plan: PartitionPlan, partition, draws) -> list[tuple[torch.Tensor, ...]]:
    """Each verification draw's values at `partition`'s inputs, from running the earlier
    partitions' graphs eagerly."""
    result = []
    for inputs in draws:
        values = dict(zip(plan.input_names, inputs))
        for earlier in plan.partitions:
            if earlier is partition:
                break
            with torch.no_grad():
                values.update(zip(earlier.graph.output_names, earlier.graph.gm(*(values[n] for n in earlier.graph.input_names))))
        result.append(tuple(values[n] for n in partition.graph.input_names))
    return result


def _median_ms(engine, inputs: tuple, calls: int = 5) -> float:
    """The engine's median time on the example inputs after one warm-up call (for the report's
    est. vs measured column; selection's own timing is separate)."""
    engine(*inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        engine(*inputs)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _record_placement(plan: PartitionPlan, report: Report) -> None:
    report.placement = plan.placement
    for partition in plan.partitions:
        if partition.placed_backend == EAGER:
            ops = sorted({r["op"] for r in plan.placement if r["partition"] == partition.name and r["backend"] == EAGER})
            report.notes.append(f"partition {partition.name} runs eagerly in PyTorch on {partition.device}: no backend supports "
                                f"{', '.join(ops)}")
    if len(plan.partitions) > 1:
        total = sum(p.estimated_ms or 0.0 for p in plan.partitions)
        report.notes.append(f"placement split the graph into {len(plan.partitions)} partitions on "
                            f"{', '.join(dict.fromkeys(p.device for p in plan.partitions))}; est. {total:.3f} ms end to end")


def _verify_against_eager(model, compiled: CompiledModel, captured: Captured, draws, synthetic: frozenset[int],
                          opts: CompileOptions, report: Report) -> None:
    import torch.utils._pytree as pytree

    budget = opts.accuracy_budget if report.lowered else None
    precision = precision_setup.lowest_precision(report)

    def runs():
        for index, inputs in enumerate(draws):
            if index == 0:
                want = list(captured.example_outputs)
            else:
                args, kwargs = rebuild_call(captured.input_spec, list(inputs))
                with torch.no_grad():
                    want = [x for x in pytree.tree_leaves(plain_containers(model(*args, **kwargs))) if x is not None]
            yield list(compiled.run_flat(inputs)), want
    checks = worst_checks(captured.output_names, runs(), precision, budget, synthetic)
    report.verification = [c.to_dict() for c in checks]
    report.verified_draws = len(draws) - 1
    report.verified_calibration = len(opts.calibration or ())  # read once into a tuple by CompileOptions
    if budget is not None:
        precision_setup.record_cost(checks, compiled, captured, opts, report)
    if not all(c.ok for c in checks):
        fix = ("loosen accuracy_budget, pass calibration data like the real inputs, or use precision='fp32'" if budget is not None
               else "report the model; meanwhile try another backend=... or disable passes with disabled_passes=(...)")
        raise VerificationError(f"the compiled model disagrees with eager PyTorch: {failures_text(checks, precision, budget)}",
                                where=f"model {report.model}, backends {', '.join(compiled.backends.values())}", fix=fix)


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
         options: CompileOptions | None = None, precision: str | Precision | None = None,
         **option_overrides: Any) -> PlannedModel:
    """Capture, run the passes and place the graph on `profile`'s devices without building
    anything: devices this machine lacks are judged by their backends' capability tables.

    precision: plan as if every op ran at this precision (as a precision pass would decide),
    e.g. "fp16" for an NPU without fp32, in place of assign_precision's measured choice."""
    opts = CompileOptions.build(options, **option_overrides)
    prof = profile if isinstance(profile, Profile) else hardware_profiles.load(profile)
    captured = capture(model, example_inputs, example_kwargs, dynamic)
    if precision is not None:
        # every op at one precision, in place of assign_precision's measured choice
        wanted = precision if isinstance(precision, Precision) else Precision.parse(precision)
        for node in captured.gm.graph.nodes:
            if node.op == "call_function":
                node.meta["kiln"] = NodeDecision(precision=wanted, reasons=(f"planned at {wanted.value}",))
        opts = CompileOptions.build(opts, disabled_passes=(*opts.disabled_passes, "assign_precision"))
    report = Report(type(model).__name__, prof.name, captured.input_spec.describe(), list(captured.output_names))
    # the precision pass decides as optimize() would: integer types only with calibration data
    calibration = precision_setup.flat_calibration(captured, opts)
    ctx = PassContext(prof, opts, captured.input_spec, captured.example_inputs, calibration,
                      precision_setup.metric_score(captured, opts), plan_only=True)
    report.passes = pipeline.run(captured.gm, ctx)
    planned = partition_graph(captured.gm, prof, captured.input_spec, captured.output_names, captured.example_inputs,
                         export_dynamic_shapes(captured.input_spec), calibration, opts.calibration_observer)
    _record_placement(planned, report)
    for partition in planned.partitions:
        ops = op_counts(partition.graph.gm) if len(planned.partitions) > 1 else op_counts(captured.gm)
        report.partitions.append(PartitionRecord(partition.name, partition.device, partition.placed_backend,
                                                 sum(ops.values()), ops, partition.estimated_ms))
    return PlannedModel(planned, report)
