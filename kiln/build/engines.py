"""Build one engine per partition: candidates from the device's backend list (or the forced
backend), each built (in a child process when measuring), checked against the partition's
graph run eagerly, and timed; the selection (kiln/build/select.py) keeps one per partition."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.backends.base import BackendSettings, Engine
from kiln.build.effort import plan_candidates
from kiln.build.host_record import HostRecord, graph_kind
from kiln.build.isolate import PartitionFiles, WorkerPool, build_isolated, op_libraries
from kiln.build.select import buildable, select_engine
from kiln.frontend.moe_op import MOE_EXPERTS
from kiln.hardware_profiles.schema import Profile
from kiln.host import usable_cores
from kiln.ir import EAGER, Partition, PartitionPlan, op_counts
from kiln.options import CompileOptions
from kiln.precision.lowering import with_lowered_weights
from kiln.report import CandidateRecord, PartitionRecord
from kiln.verify import OutputCheck, worst_checks

log = logging.getLogger("kiln")


@dataclass
class BuiltEngines:
    engines: dict[str, Engine] = field(default_factory=dict)  # partition name -> engine
    candidates: list[CandidateRecord] = field(default_factory=list)
    partitions: list[PartitionRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the report: how the builds ran, where that differs


def selection_mode(profile: Profile, opts: CompileOptions) -> str:
    """How each partition's backend is chosen: a forced backend is the only candidate."""
    return "prefer" if opts.backend else (opts.select or profile.select)


def isolates(opts: CompileOptions, mode: str, candidates: int) -> bool:
    """Whether candidates build in child processes: when asked, or when several are built and
    measured, so that one crashing or hanging toolchain costs only its own candidate."""
    return opts.isolate if opts.isolate is not None else mode == "measure" and candidates > 1


def threads(profile: Profile, opts: CompileOptions) -> int:
    here = usable_cores()
    return opts.threads or max(1, min(profile.primary.cores or here, here))


def build_engines(plan: PartitionPlan, profile: Profile, opts: CompileOptions, draws: list, synthetic: frozenset[int],
                  workdir: Path, deadline: float | None, workers: WorkerPool | None = None,
                  host_record: HostRecord | None = None) -> BuiltEngines:
    """Engines for every partition of `plan`, checked on `draws` (the indexes in `synthetic`
    are random draws, held to the precision's tolerance). Fills in each partition's backend.
    `workers` start the isolated builds' child processes ahead; `host_record` holds what this
    host measured before, read to leave out candidates (CompileOptions.effort) and written
    after each measured selection."""
    built = BuiltEngines()
    mode = selection_mode(profile, opts)
    host_record = host_record or HostRecord(None)
    choices = routing_choices(plan)
    for partition in plan.partitions:
        eager = partition.placed_backend == EAGER  # PyTorch itself: nothing to choose, nothing to isolate
        device = profile.devices[partition.device]
        names = (EAGER,) if eager else opts.backends_for(device)
        graph = partition.graph
        # backends build from the plan's rounded weights and corrected biases; the references stay fp32
        lowered = graph if eager else with_lowered_weights(graph)
        budget = opts.accuracy_budget if graph.precision.lossy else None
        settings = BackendSettings(device, threads(profile, opts), workdir, graph.precision.lowest(), budget=budget,
                                   fuse=opts.fusion, autotune=opts.autotunes)
        kind = graph_kind(graph) if len(names) > 1 else None
        recorded = host_record.lookup(kind) if kind is not None else {}
        candidates = plan_candidates(names, "prefer" if eager else mode, opts.effort, recorded)
        partition_draws = draws if len(plan.partitions) == 1 else _partition_draws(plan, partition, draws)
        with torch.no_grad():  # the post-pass graph, run eagerly, is what each candidate must match
            references = [tuple(graph.gm(*inputs)) for inputs in partition_draws]

        def check(engine) -> list[OutputCheck]:
            runs = ((list(engine(*inputs)), list(want)) for inputs, want in zip(partition_draws, references))
            return worst_checks(graph.output_names, runs, settings.precision, budget, synthetic, choices)

        libraries = op_libraries(graph.gm)

        def build_in_child(backend):
            engine, checks, _ = build_isolated(backend, lowered, settings, files, synthetic, opts.build_timeout_s, pool,
                                               libraries, choices)
            return engine, checks

        # a candidate that cannot build here (not installed, or an op or precision it does not take)
        # is only recorded: one left to build is built in this process, with no child to start
        to_build = candidates.order if eager else buildable(candidates.order, lowered, settings)
        in_child = not eager and isolates(opts, candidates.mode, len(to_build))
        if in_child and libraries.unimportable:
            in_child = False
            built.notes.append(f"partition {partition.name} was built in this process, not in child processes: its op(s) "
                               f"{', '.join(libraries.unimportable)} are defined where a child cannot import them (__main__); "
                               "define them in an importable module to build each candidate in isolation")
        # two candidates build side by side even on two cores: much of a build waits on one thread
        # (an export, a graph optimizer) while the other's threads use the second core. GPT-2 at
        # fp32 on 2 cores: ONNX Runtime and OpenVINO in 11.4 s side by side, 16.2 s one after the
        # other. Past two, one build per two cores (each runs two or more threads).
        parallel = max(1, min(len(to_build), max(2, usable_cores() // 2))) if in_child else 1
        # one program and one set of verification data for every child (torch.export is not thread-safe: before the builds)
        files = PartitionFiles.write(lowered, partition_draws, references, workdir / f"{partition.name}-inputs") if in_child else None
        pool = workers if workers is not None or not in_child else WorkerPool(names, opts.build_memory_mb)
        if in_child:
            pool.expect(max(1, len(to_build)), ahead=parallel + 1)
        elif pool is not None:
            pool.release_idle()  # one started before capture, and this partition builds in this process
        log.info("building partition %s on %s: candidates %s (%s, effort %s%s)", partition.name, device.name,
                 ", ".join(candidates.order), candidates.mode, opts.effort, ", each in a child process" if in_child else "")
        try:
            selection = select_engine(lowered, candidates.order, candidates.mode, settings, check, opts.measure_seconds,
                                      opts.backend_fallback or candidates.fallback, build_in_child if in_child else None,
                                      deadline, left_out=candidates.left_out, parallel=parallel, why_first=candidates.why_first,
                                      build_seconds={name: r.build_seconds for name, r in recorded.items()})
        finally:
            if pool is not None and pool is not workers:
                pool.close()
        if candidates.mode == "measure" and kind is not None:
            host_record.store(kind, {r.backend: (r.median_ms, r.compile_seconds or 0.0) for r in selection.candidates
                                     if r.median_ms is not None}, apart=selection.apart)
        partition.backend = selection.backend
        built.engines[partition.name] = selection.engine
        built.candidates.extend(selection.candidates)
        ops = op_counts(graph.gm)
        timed = next((r.median_ms for r in selection.candidates if r.status == "chosen" and r.median_ms is not None), None)
        built.partitions.append(PartitionRecord(partition.name, partition.device, selection.backend, sum(ops.values()), ops,
                                                partition.estimated_ms,
                                                timed if timed is not None else _median_ms(selection.engine, graph.example_inputs)))
    return built


def routing_choices(plan: PartitionPlan) -> frozenset[str]:
    """The values a kiln::moe_experts node reads as its top-k expert index, by name: routing
    choices, which verification lets a lowered plan flip where two experts score alike
    (verify.compare)."""
    found = set()
    for partition in plan.partitions:
        for node in partition.graph.gm.graph.nodes:
            index = node.args[1] if node.op == "call_function" and node.target is MOE_EXPERTS else None
            if isinstance(index, torch.fx.Node) and index.op == "placeholder":
                found.add(index.name)
    return frozenset(found)


def _partition_draws(plan: PartitionPlan, partition: Partition, draws) -> list[tuple[torch.Tensor, ...]]:
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
