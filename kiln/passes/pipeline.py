"""The pass pipeline: the one place the order of kiln's graph passes is written.

The runner, not each pass, removes dead code after a pass, lints the graph, recompiles it,
checks that every op node still carries its shape meta, times the pass, records what it did,
and turns an exception into PassFailed naming the pass, the passes before it and the node.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Callable

from torch.fx import GraphModule

from kiln.errors import PassFailed
from kiln.passes.assign_precision import assign_precision
from kiln.passes.context import PassContext
from kiln.passes.fold_batchnorm import fold_batchnorm
from kiln.passes.fold_constants import fold_constants
from kiln.passes.put_scalar_operands_last import put_scalar_operands_last
from kiln.passes.remove_dead_code import remove_dead_code
from kiln.passes.remove_inactive_dropout import remove_inactive_dropout
from kiln.passes.result import PassResult
from kiln.report import PassRecord

Pass = Callable[[GraphModule, PassContext], PassResult]


@dataclass(frozen=True)
class Stage:
    name: str
    passes: tuple[Pass, ...]
    repeat_until_stable: bool = False
    when: Callable[[PassContext], bool] = lambda ctx: True


MAX_REPEATS = 4

PIPELINE: tuple[Stage, ...] = (
    # Cleanup first so fusion patterns see the graph without identities and dead branches.
    Stage("cleanup", (remove_inactive_dropout, put_scalar_operands_last, fold_constants, remove_dead_code),
          repeat_until_stable=True),
    # Fusion: algebraic folds that remove whole ops.
    Stage("fusion", (fold_batchnorm,)),
    # Folding BatchNorm leaves its statistics unused; sweep again.
    Stage("cleanup", (remove_dead_code,)),
    # Precision is decided on the final graph, so each measured layer is one the backend sees.
    Stage("precision", (assign_precision,)),
)


def run(gm: GraphModule, ctx: PassContext, pipeline: tuple[Stage, ...] = PIPELINE) -> list[PassRecord]:
    """Run `pipeline` over `gm` in place; return one record per pass run."""
    records: list[PassRecord] = []
    for stage in pipeline:
        if not stage.when(ctx):
            continue
        for _ in range(MAX_REPEATS if stage.repeat_until_stable else 1):
            changed = False
            for pass_fn in stage.passes:
                if pass_fn.__name__ in ctx.options.disabled_passes:
                    continue
                record = _run_one(pass_fn, stage.name, gm, ctx, records)
                records.append(record)
                changed |= record.changed
            if not changed:
                break
    return records


def _run_one(pass_fn: Pass, stage: str, gm: GraphModule, ctx: PassContext, before: list[PassRecord]) -> PassRecord:
    start = time.perf_counter()
    try:
        result = pass_fn(gm, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"returned {type(result).__name__}, not PassResult")
        if result.changed:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
            _check_meta(gm)
    except Exception as exc:
        raise _failure(pass_fn.__name__, stage, before, exc) from exc
    return PassRecord(pass_fn.__name__, stage, result.changed, dict(result.counts),
                      [(s.node, s.reason) for s in result.skipped], time.perf_counter() - start)


def _check_meta(gm: GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            raise RuntimeError(f"node {node.name} ({node.target}) has no shape meta after the pass")


def _failure(name: str, stage: str, before: list[PassRecord], exc: Exception) -> PassFailed:
    ran = ", ".join(dict.fromkeys(r.name for r in before)) or "none"
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return PassFailed(f"pass {name} (stage {stage}) failed: {type(exc).__name__}: {exc}",
                      where=f"{frame.filename}:{frame.lineno}; passes run before it: {ran}",
                      fix=f"disable it with CompileOptions(disabled_passes=({name!r},)) and report the model")
