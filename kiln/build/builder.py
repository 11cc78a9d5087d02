"""One build of a captured, decided graph: partition it, build an engine per partition, wrap
them in a CompiledModel and verify it against eager. The precision search calls `build` again
with other layer plans; each call re-decides precision and placement through the pass
pipeline (passes.pipeline.REDECIDE) and writes a report of its own."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from kiln.build import precision_report
from kiln.build.engines import build_engines
from kiln.build.host_record import HostRecord
from kiln.build.isolate import WorkerPool
from kiln.build.inputs import inputs_to_check
from kiln.build.verification import verify_against_eager
from kiln.frontend.capture import Captured
from kiln.frontend.input_spec import export_dynamic_shapes
from kiln.hardware_profiles.schema import Profile
from kiln.ir import EAGER, LayerPlan, PartitionPlan
from kiln.passes import pipeline
from kiln.passes.context import PassContext
from kiln.placement.partition import partition_graph
from kiln.progress import stage
from kiln.report import Report
from kiln.runtime.compiled_model import CompiledModel


@dataclass
class Builder:
    """What every build of one compile shares; `build()` is the step the precision search drives."""

    model: torch.nn.Module
    captured: Captured
    profile: Profile
    ctx: PassContext  # the passes' context: options, calibration samples, metric
    draws: list  # verification inputs: the example, random draws, the calibration samples
    report: Report  # the fields every build's report starts from (model, inputs, passes, notes)
    timings: dict[str, float] = field(default_factory=dict)
    deadline: float | None = None  # time.monotonic() past which no further candidate starts
    workers: WorkerPool | None = None  # child processes for isolated builds, started ahead
    host_record: HostRecord | None = None  # what this host measured before (CompileOptions.effort)

    def build(self, layer_plans: Mapping[str, LayerPlan] | None = None) -> CompiledModel:
        """Build and verify the graph as decided, or with `layer_plans` decided afresh."""
        if layer_plans is not None:
            ctx = dataclasses.replace(self.ctx, layer_plans=dict(layer_plans))
            self.report.passes += pipeline.run(self.captured.gm, ctx, pipeline.REDECIDE).records
        opts, captured, calibration = self.ctx.options, self.captured, self.ctx.calibration
        report = copy.deepcopy(self.report)
        plan = partition_graph(captured.gm, self.profile, captured.input_spec, captured.output_names,
                               captured.example_inputs, export_dynamic_shapes(captured.input_spec), calibration,
                               opts.calibration_observer)
        record_placement(plan, report)
        precision_report.record_plan(plan, opts, report, bool(calibration))
        checked, synthetic, note = inputs_to_check(plan, self.draws, calibration)
        if note:
            report.notes.append(note)
        workdir = Path(tempfile.mkdtemp(prefix="kiln-build-"))
        try:
            with stage("compile", self.timings):
                built = build_engines(plan, self.profile, opts, checked, synthetic, workdir, self.deadline, self.workers,
                                      self.host_record)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        report.candidates, report.partitions = built.candidates, built.partitions
        report.notes += built.notes
        compiled = CompiledModel(plan, built.engines, captured.input_spec, captured.output_structure, report,
                                 {"name": self.profile.name, "digest": self.profile.digest}, captured.output_none_positions)
        weakref.finalize(compiled, shutil.rmtree, workdir, True)
        if opts.verify:
            with stage("verify", self.timings):
                verify_against_eager(self.model, compiled, captured, checked, synthetic, opts, report, self.ctx.metric_score)
        return compiled


def record_placement(plan: PartitionPlan, report: Report) -> None:
    """The per-node placement records, and a note per eager partition and for a split graph."""
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
