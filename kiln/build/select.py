"""Backend selection for one partition: `prefer` takes the first preferred backend that is
available, supports every op, builds and verifies; `measure` builds every available
preferred backend, verifies each, times each on the example inputs and keeps the fastest
verified one. Every candidate, chosen or not, leaves a CandidateRecord with its reason.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from kiln.backends import registry
from kiln.backends.base import BackendSettings, Engine
from kiln.timing import SETTLE_SECONDS, TIE_FRACTION, confirm, separated, time_engines  # noqa: F401 (SETTLE_SECONDS: bench/ reads it here)
from kiln.ir import DECISION_META, PartitionGraph
from kiln.errors import BackendError, BackendUnavailable, KilnError, VerificationError
from kiln.progress import heartbeat
from kiln.report import CandidateRecord
from kiln.types import Precision
from kiln.verify import OutputCheck, failures_text

log = logging.getLogger("kiln")

# Checks a built engine: returns the worst output checks over the verification inputs.
Checker = Callable[[Engine], list[OutputCheck]]
# Builds and checks one candidate: (backend object) -> (engine, checks). In-process by default;
# build/engines.py passes an isolating one (a child process with budgets) when asked to.
CandidateBuild = Callable[[object], tuple[Engine, list[OutputCheck]]]


@dataclass
class Selection:
    engine: Engine
    backend: str
    candidates: list[CandidateRecord]
    checks: list[OutputCheck]
    apart: frozenset[str] = frozenset()  # backends timed slower than the chosen one beyond the noise


def select_engine(partition: PartitionGraph, names: tuple[str, ...], mode: str, settings: BackendSettings,
                  check: Checker, measure_seconds: float, backend_fallback: bool, build: CandidateBuild | None = None,
                  deadline: float | None = None, *, left_out: Mapping[str, str] | None = None, parallel: int = 1,
                  why_first: str = "", build_seconds: Mapping[str, float] | None = None) -> Selection:
    """Pick the engine for `partition` among backends `names`, tried in order; `left_out` are
    candidates not built, with the reason (kiln/build/effort.py). `deadline` (time.monotonic())
    ends the search: candidates not started by then are recorded as skipped. In "measure" mode
    up to `parallel` candidates build at once (each in its own child process: `build` isolates).
    `build_seconds`: how long each backend's build took here before, for the progress lines."""
    if build is None:
        def build(backend):
            engine = backend.compile(partition, settings)
            return engine, check(engine)
    strict = mode == "prefer" and not backend_fallback  # a failure is the user's answer, not a reason to move on
    records = {name: CandidateRecord(partition.name, name, "not tried") for name in (*names, *(left_out or {}))}
    for name, reason in (left_out or {}).items():
        records[name].status, records[name].reason = "skipped", reason
    built: list[_Built] = []

    def attempt(name: str) -> _Built | None:
        record = records[name]
        if deadline is not None and time.monotonic() > deadline:
            record.status, record.reason = "skipped", "the compile time budget (time_budget_s) was spent"
        elif (backend := _usable_backend(name, partition, settings, record)) is not None:
            with heartbeat(f"building {name} for partition {partition.name}", (build_seconds or {}).get(name)):
                return _build_and_check(backend, build, record, strict, partition.name, settings)
        return None

    if mode == "measure" and parallel > 1 and len(names) > 1:
        with ThreadPoolExecutor(max_workers=min(parallel, len(names))) as pool:  # threads wait on child processes
            built = [b for b in pool.map(attempt, names) if b is not None]
    else:
        for name in names:
            if mode == "prefer" and built:
                records[name].reason = why_first or f"{built[0].record.backend} was preferred and verified"
                records[name].status = "skipped" if why_first else records[name].status
            elif (result := attempt(name)) is not None:
                built.append(result)
    if not built:
        summary = "; ".join(f"{r.backend}: {r.status} ({r.reason})" for r in records.values())
        raise BackendUnavailable(f"no backend could run partition {partition.name}: {summary}", where=f"device {settings.device.name}",
                                 fix="install a listed backend, or name one with backend=...")
    timed = mode == "measure" and len(built) > 1
    if timed:
        log.info("timing %d candidates for partition %s, interleaved (about %.0f s)", len(built), partition.name,
                 measure_seconds * len(built))
        best, confirmation, apart = _fastest(built, partition.example_inputs, measure_seconds)
    else:
        best, confirmation, apart = built[0], "", frozenset()
    for candidate in built:
        record = candidate.record
        if candidate is best:
            record.status = "chosen"
            record.reason = f"fastest verified{confirmation}" if timed else "the only candidate that built and verified" if mode == "measure" else (
                why_first or "first preferred backend that verified")
        else:
            record.status = "slower"
            record.reason = f"{record.median_ms / best.record.median_ms:.2f}x the chosen backend's time"
    return Selection(best.engine, best.record.backend, list(records.values()), best.checks, apart)


def _fastest(built: list[_Built], inputs: tuple[torch.Tensor, ...],
             measure_seconds: float) -> tuple[_Built, str, frozenset[str]]:
    """The fastest of `built` (each record's median_ms filled in), a note on how sure that is,
    and the backends the first timing put behind it beyond the noise: the first timing's winner
    is re-timed against its runner-up alone, and the faster median over both timings wins;
    where only those two were timed and the first timing told them apart, it decides."""
    engines = [b.engine for b in built]
    first = time_engines(engines, inputs, measure_seconds * len(built))
    for median, candidate in zip(first.medians(), built):
        candidate.record.median_ms = median * 1000

    def apart_from(winner: int) -> frozenset[str]:
        return frozenset(b.record.backend for i, b in enumerate(built)
                         if i != winner and separated(first.blocks[winner], first.blocks[i]))

    if len(built) == 2 and (first.decided() or first.tied()):
        # two engines timed alone, told apart beyond the noise or tied: a re-timing of the same
        # pair would only repeat it (BERT-base: 4 to 6 s of a 35 s compile)
        index = first.ranking()[0]
        how = "apart beyond the noise" if first.decided() else f"within {TIE_FRACTION:.0%} of each other, a tie"
        return built[index], f", {how}" + (" once timed longer" if first.extended else ""), apart_from(index)
    confirmed = confirm(engines, inputs, first, 2 * measure_seconds)
    winner, runner_up = built[confirmed.winner], built[confirmed.runner_up]
    winner.record.median_ms, runner_up.record.median_ms = (m * 1000 for m in confirmed.medians)
    extended = ", timed longer: the two fastest were within the noise" if first.extended else ""
    flipped = (f"; re-timed against {runner_up.record.backend}, it was faster than the first timing's winner"
               if confirmed.flipped else f"; re-timed against {runner_up.record.backend}")
    return winner, f"{extended}{flipped}", apart_from(confirmed.winner)


@dataclass
class _Built:
    engine: Engine
    checks: list[OutputCheck]
    record: CandidateRecord


def buildable(names: tuple[str, ...], partition: PartitionGraph, settings: BackendSettings) -> tuple[str, ...]:
    """Those of `names` installed here that take every node of `partition`: what a selection
    will build (the others it records as unavailable or unsupported without building)."""
    return tuple(name for name in names
                 if _usable_backend(name, partition, settings, CandidateRecord(partition.name, name, "not tried")) is not None)


def _usable_backend(name: str, partition: PartitionGraph, settings: BackendSettings, record: CandidateRecord):
    """The backend object if it is installed and takes every node; else None, with the reason recorded."""
    try:
        backend = registry.get(name)
    except BackendUnavailable as exc:
        record.status, record.reason = "unavailable", exc.what
        return None
    status = backend.available()
    if not status.ok:
        record.status, record.reason = "unavailable", f"{status.reason} ({status.install_hint})"
        return None
    unsupported = _unsupported(backend, partition, settings)
    if unsupported:
        record.status, record.reason = "unsupported", unsupported
        return None
    return backend


def _build_and_check(backend, build: CandidateBuild, record: CandidateRecord, strict: bool, partition: str,
                     settings: BackendSettings) -> _Built | None:
    """Build one candidate and check it against eager; failures are recorded (raised if strict)."""
    start = time.perf_counter()
    try:
        engine, checks = build(backend)
    except KilnError as exc:
        record.status, record.reason = "failed", str(exc).splitlines()[0]
        if strict:
            raise
        return None
    except Exception as exc:  # a backend bug must not end the search; it is recorded
        record.status, record.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if strict:
            raise BackendError(f"backend {backend.name} failed on partition {partition}: {record.reason}",
                               fix="pass backend_fallback=True to try the next preferred backend, or choose another backend") from exc
        return None
    finally:
        record.compile_seconds = time.perf_counter() - start
    record.detail = getattr(engine, "summary", "")
    record.max_abs_error = max((c.max_abs_error for c in checks), default=0.0)
    if not all(c.ok for c in checks):
        record.status, record.reason = "mismatch", failures_text(checks, settings.precision, settings.budget)
        if strict:
            raise VerificationError(f"backend {backend.name} disagrees with eager: {record.reason}", where=f"partition {partition}",
                                    fix="pass backend_fallback=True to try the next backend, or report the model")
        return None
    return _Built(engine, checks, record)


def _unsupported(backend, partition: PartitionGraph, settings: BackendSettings) -> str:
    reasons = {}
    for node in partition.gm.graph.nodes:
        decision = node.meta.get(DECISION_META)
        precision = decision.precision if decision is not None else Precision.FP32
        support = backend.supports(node, settings.device, precision)
        if not support.ok:
            reasons.setdefault(support.reason, node.name)
    return "; ".join(f"{reason} (e.g. node {node})" for reason, node in list(reasons.items())[:3])


def time_interleaved(engines: list, inputs: tuple[torch.Tensor, ...], budget_seconds: float, block: int = 3) -> list[float]:
    """Median seconds per call of each engine, timed interleaved (kiln/timing.py): more
    rounds while the two fastest are within the noise of each other."""
    return time_engines(engines, inputs, budget_seconds, block).medians()
