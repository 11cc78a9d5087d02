"""kiln.sweep(): one model compiled at a series of settings, each build verified by optimize(),
all of them timed in one interleaved run beside eager PyTorch, then each one's accuracy measured
on the user's data, and the Pareto front marked.

    settings -> (prune) -> optimize() per point -> time every engine and eager, round-robin
             -> eager's outputs and score once -> each point's cosine to them and its score
             -> front -> each artifact saved with the whole curve in its report

Timing before evaluation keeps the evaluation's allocations out of the timed rounds; timing
every engine in one loop makes the machine's drift (other load, clocks) fall on all alike.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from kiln import hardware_profiles
from kiln.api import optimize
from kiln.timing import time_engines
from kiln.pruning import prune
from kiln.errors import InputMismatch, KilnError, OptionsError
from kiln.frontend.capture import keeping_modes
from kiln.frontend.input_spec import check_call, normalize_call
from kiln.hardware_profiles.schema import Profile
from kiln.options import CompileOptions
from kiln.progress import shown_on_terminal
from kiln.sweep.result import SweepPoint, SweepResult
from kiln.sweep.settings import Setting, parse_settings
from kiln.verify import worst_per_example

log = logging.getLogger("kiln")

# metric(predict, dataset) -> float, higher is better (as kiln.Budget(metric=, dataset=))
Metric = Callable[[Callable, Any], float]
# pruner(model, example_inputs, level=...) -> an object with .model (kiln.prune's interface)
Pruner = Callable[..., Any]
SET_PER_POINT = ("precision", "accuracy_budget")


def sweep(model: torch.nn.Module, profile: str | Path | Profile = "cpu-x86", example_inputs: Any = None,
          settings=None, *, metric: Metric | None = None, dataset: Any = None, output_dir: str | Path | None = None,
          pruner: Pruner | None = None, options: CompileOptions | None = None, **option_overrides: Any) -> SweepResult:
    """Compile `model` at each of `settings` (kiln.sweep.Setting or their text, e.g. "fp32",
    "auto:0.995", "int8", "fp32+prune=0.3"; default fp32 and auto down to min_cosine 0.99), time
    every build and eager PyTorch interleaved on the example inputs, and measure each build's
    cosine to eager on the example and `dataset` inputs and, with `metric`, its score
    metric(predict, dataset) (higher is better). With `output_dir`, each point's artifact is
    saved there carrying the whole curve in its report. Other options are CompileOptions
    fields, as for optimize(); measure_seconds is the timing budget per engine."""
    points, evaluation = parse_settings(settings), _Evaluation.checked(metric, dataset)
    clashing = [k for k in SET_PER_POINT if k in option_overrides]
    if clashing:
        raise OptionsError(f"{', '.join(clashing)} given to sweep(), which sets them per point", where="sweep()",
                           fix="put precisions and budgets in settings=, e.g. ['fp32', 'auto:0.995', 'int8']")
    opts = CompileOptions.build(options, **option_overrides)
    prof = profile if isinstance(profile, Profile) else hardware_profiles.load(profile)
    folder = _output_folder(output_dir)
    with keeping_modes(model), shown_on_terminal(opts.progress):
        model.eval()
        result = SweepResult(type(model).__name__, prof.name, [], evaluation.name)
        for index, setting in enumerate(points, 1):
            result.points.append(_build_point(model, prof, example_inputs, setting, index, len(points), opts, pruner, result))
        _time_points(model, example_inputs, result, opts.measure_seconds)
        evaluation.measure(model, example_inputs, result)
        result.mark_front()
        if folder is not None:
            _save_artifacts(result, folder)
    return result


def _output_folder(output_dir: str | Path | None) -> Path | None:
    if output_dir is None:
        return None
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise OptionsError(f"output_dir {folder} exists and is not a folder", where="sweep.output_dir",
                           fix="name a folder (created if missing); each point's artifact is written into it")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _build_point(model, profile: Profile, example_inputs, setting: Setting, index: int, total: int, opts: CompileOptions,
                 pruner: Pruner | None, result: SweepResult) -> SweepPoint:
    """optimize() at one setting (on the pruned model where the setting prunes); a build that
    fails is recorded as a failed point with its reason, and the sweep goes on."""
    point = SweepPoint(index, setting.text(), setting.label)
    log.info("sweep point %d of %d (%s): building", index, total, setting.label)
    start = time.perf_counter()
    try:
        target = model
        if setting.prune_level is not None:
            target, point.prune = _pruned(model, example_inputs, setting.prune_level, pruner)
        point.parameters = sum(p.numel() for p in target.parameters())
        # progress=False: the sweep shows its own lines, and the compile's go to the same handler
        compiled = optimize(target, profile, example_inputs,
                            options=CompileOptions.build(opts, progress=False, **setting.option_overrides()))
    except KilnError as exc:
        if isinstance(exc, OptionsError) and (exc.where or "").startswith("sweep."):
            raise  # the sweep's own inputs are wrong: every point would fail alike
        point.status, point.reason = "failed", f"{type(exc).__name__}: {' '.join(exc.what.split())}"
        log.info("sweep point %d of %d (%s): failed: %s", index, total, setting.label, point.reason)
        return point
    finally:
        point.build_seconds = time.perf_counter() - start
    point.backends = dict(compiled.backends)
    point.precision_summary = compiled.report.precision_summary
    result.compiled[index] = compiled
    log.info("sweep point %d of %d (%s): built in %.1f s (%s)", index, total, setting.label, point.build_seconds,
             ", ".join(sorted(set(point.backends.values()))))
    return point


def _pruned(model, example_inputs, level: float, pruner: Pruner | None) -> tuple[torch.nn.Module, str]:
    pruner = pruner if pruner is not None else _default_pruner()
    pruned = pruner(model, example_inputs, level=level)
    smaller = getattr(pruned, "model", None)
    if not isinstance(smaller, torch.nn.Module):
        raise OptionsError(f"the pruner returned {type(pruned).__name__} without a .model nn.Module", where="sweep.pruner",
                           fix="return an object whose .model is the pruned nn.Module, as kiln.prune does")
    describe = getattr(pruned, "describe", None)
    return smaller, describe() if callable(describe) else f"pruned at level {level:g}"


def _default_pruner() -> Pruner:
    """kiln.prune: magnitude pruning of heads, neurons and channels (kiln/pruning)."""
    return prune


def _time_points(model, example_inputs, result: SweepResult, seconds_per_engine: float) -> None:
    """Every built point and eager PyTorch timed round-robin on the example inputs: median and
    p99 per call, and each point's speed-up over eager."""
    args, kwargs = normalize_call(example_inputs, None)
    built = [p for p in result.points if p.index in result.compiled]

    def eager() -> None:
        with torch.no_grad():
            model(*args, **kwargs)

    calls: list[Callable[[], Any]] = [eager]
    for point in built:
        compiled = result.compiled[point.index]
        flat = tuple(check_call(compiled.input_spec, args, kwargs))
        calls.append(lambda c=compiled, f=flat: c.run_flat(f))
    log.info("sweep: timing %d builds and eager PyTorch, interleaved (about %.0f s)", len(built),
             seconds_per_engine * len(calls))
    samples = time_engines(calls, (), seconds_per_engine * len(calls)).calls
    medians = [statistics.median(s) * 1000 for s in samples]
    p99s = [sorted(s)[min(len(s) - 1, int(0.99 * len(s)))] * 1000 for s in samples]
    result.eager_ms, result.eager_p99_ms = medians[0], p99s[0]
    for point, median, p99 in zip(built, medians[1:], p99s[1:]):
        point.median_ms, point.p99_ms, point.speedup_vs_eager = median, p99, medians[0] / median


def _save_artifacts(result: SweepResult, folder: Path) -> None:
    """Each built point's artifact, its report carrying the whole sweep and which point it is."""
    for point in result.points:
        if point.index in result.compiled:
            point.artifact = str(folder / f"point-{point.index:02d}-{Setting.parse(point.setting).slug}.kiln")
    for point in result.points:
        if point.artifact is not None:
            compiled = result.compiled[point.index]
            compiled.report.sweep = result.to_dict(this_point=point.index)
            compiled.save(point.artifact, overwrite=True)  # replaces a kiln artifact only; anything else is refused


class _Recorder:
    """predict() for a metric, running `fn` and keeping each call's output tensors (eager), or
    comparing them with the reference's call of the same number (a point): worst cosine and
    relative error over every output, row and call."""

    def __init__(self, fn: Callable, reference: "_Recorder | None" = None):
        self.fn, self.reference = fn, reference
        self.outputs: list[list[torch.Tensor]] = []
        self.calls, self.cosine, self.rel_error, self.mismatched = 0, 1.0, 0.0, False

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            out = self.fn(*args, **kwargs)
        leaves = [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if self.reference is None:
            self.outputs.append(leaves)
        elif self.calls < len(self.reference.outputs) and len(leaves) == len(self.reference.outputs[self.calls]):
            for got, want in zip(leaves, self.reference.outputs[self.calls]):
                cosine, rel = worst_per_example(got.float(), want.float())
                self.cosine, self.rel_error = min(self.cosine, cosine), max(self.rel_error, rel)
        else:
            self.mismatched = True  # a metric calling differently each time, or outputs of another structure
        self.calls += 1
        return out


class _Evaluation:
    """The accuracy side of a sweep: eager's outputs and score once, then each point against them."""

    def __init__(self, metric: Metric | None, dataset: tuple | None):
        self.metric, self.dataset = metric, dataset
        self.name = getattr(metric, "__name__", "metric") if metric is not None else "cosine to eager"

    @classmethod
    def checked(cls, metric, dataset) -> "_Evaluation":
        if metric is not None and dataset is None:
            raise OptionsError("metric= was given without dataset=", where="sweep.dataset",
                               fix="pass dataset= (the inputs metric(predict, dataset) runs predict on) with metric=")
        if metric is not None and not callable(metric):
            raise OptionsError(f"metric must be callable, got {type(metric).__name__}", where="sweep.metric",
                               fix="pass a function metric(predict, dataset) -> float, higher is better")
        if dataset is not None and not isinstance(dataset, tuple):
            try:
                dataset = tuple(dataset)  # an iterator is read once, here, and each point sees the same items
            except TypeError:
                raise OptionsError(f"dataset must be iterable, got {type(dataset).__name__}", where="sweep.dataset",
                                   fix="pass a list of model inputs (each a tensor, a tuple of tensors or a dict)") from None
        return cls(metric, dataset)

    def measure(self, model, example_inputs, result: SweepResult) -> None:
        reference = _Recorder(model)
        result.reference_score = self._run(reference, example_inputs)
        result.evaluated_inputs = reference.calls
        for point in result.points:
            if point.index not in result.compiled:
                continue
            log.info("sweep: measuring point %d (%s) on %d inputs", point.index, point.label, reference.calls)
            recorder = _Recorder(result.compiled[point.index], reference)
            point.score = self._run(recorder, example_inputs)
            point.cosine_min, point.rel_error_max = recorder.cosine, recorder.rel_error
            point.accuracy = point.score if self.metric is not None else point.cosine_min
            if recorder.mismatched:
                result.notes.append(f"point {point.index}: some calls could not be compared with eager's (the metric "
                                    "called predict differently, or the outputs differ in structure); cosine covers the rest")

    def _run(self, predict: _Recorder, example_inputs) -> float | None:
        """The example inputs, then the dataset: through the metric when there is one."""
        try:
            args, kwargs = normalize_call(example_inputs, None)
            predict(*args, **kwargs)
            if self.metric is not None:
                return float(self.metric(predict, self.dataset))
            for item in self.dataset or ():
                args, kwargs = normalize_call(item, None)
                predict(*args, **kwargs)
        except InputMismatch as exc:
            raise OptionsError(f"a dataset item does not match the compiled inputs: {exc.what}", where="sweep.dataset",
                               fix="give dataset items shaped like example_inputs (or compile with dynamic=...)") from None
        return None
