"""The pass pipeline: the one place the order of kiln's graph passes is written.

The runner, not each pass, removes dead code after a pass, lints the graph, recompiles it,
checks that every op node still carries its shape meta, times the pass, records what it did
(and what a decide-only pass decided), and turns an exception into PassFailed naming the pass,
the passes before it, the node it was at and the user's source line that made that node.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch.fx import GraphModule

from kiln.errors import KilnError, OptionsError, PassFailed
from kiln.fx_helpers import source_line
from kiln.passes.assign_precision import assign_precision
from kiln.passes.assign_sparsity import assign_sparsity
from kiln.passes.context import PassContext
from kiln.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from kiln.passes.fold_batchnorm import fold_batchnorm
from kiln.passes.fold_constants import fold_constants
from kiln.passes.fold_shape_arithmetic import fold_shape_arithmetic
from kiln.passes.fuse_attention import fuse_attention
from kiln.passes.fuse_linear_bias import fuse_linear_bias
from kiln.passes.group_epilogues import group_epilogues
from kiln.passes.guard_fully_masked_attention import guard_fully_masked_attention
from kiln.passes.merge_qkv_projections import merge_qkv_projections
from kiln.passes.place_on_devices import place_on_devices
from kiln.passes.put_scalar_operands_last import put_scalar_operands_last
from kiln.passes.recognise_activations import recognise_activations
from kiln.passes.recognise_norms import recognise_norms
from kiln.passes.remove_dead_code import remove_dead_code
from kiln.passes.remove_inactive_dropout import remove_inactive_dropout
from kiln.passes.remove_noop_views import remove_noop_views
from kiln.passes.remove_redundant_permutes import remove_redundant_permutes
from kiln.passes.result import PassResult
from kiln.report import PassRecord
from kiln.types import Dim

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
    # Sizes fold before views (a folded size can make a reshape a no-op); duplicates merge
    # before fold_constants, which would otherwise store each copy as its own buffer.
    Stage("cleanup", (remove_inactive_dropout, put_scalar_operands_last, fold_shape_arithmetic, remove_noop_views,
                      remove_redundant_permutes, eliminate_common_subexpressions, fold_constants, remove_dead_code),
          repeat_until_stable=True),
    # Fusion: hand-written norms and activations become single ops first; matmuls with stored
    # weights become linear before fold_batchnorm, which folds BatchNorm1d into a linear;
    # attention becomes SDPA; epilogue groups are counted once BatchNorm is folded.
    Stage("fusion", (recognise_norms, recognise_activations, fuse_linear_bias, fold_batchnorm, fuse_attention,
                     group_epilogues), when=lambda ctx: ctx.options.fusion),
    # One Q/K/V GEMM, except where ONNX Runtime may build the graph: its attention fusion
    # matches three separate projections and is lost after the merge (measured on MiniLM).
    Stage("fusion", (merge_qkv_projections,), when=lambda ctx: ctx.options.fusion and not onnxruntime_may_build(ctx)),
    # PyTorch's answer for fully masked attention rows, on every backend (a correctness rewrite,
    # so it runs with fusion off too); before the cleanup that merges each layer's copy of the guard.
    Stage("masking", (guard_fully_masked_attention,)),
    # Fusion leaves folded statistics unused and may leave views and permutes that now cancel.
    Stage("cleanup", (remove_noop_views, remove_redundant_permutes, eliminate_common_subexpressions, remove_dead_code)),
    # Precision is decided on the final graph, so each measured layer is one the backend sees.
    Stage("precision", (assign_precision,)),
    # 2:4 sparsity on top of each layer's precision, from what the budget has left (opt-in: it changes answers).
    Stage("sparsity", (assign_sparsity,), when=lambda ctx: ctx.options.sparsity is not None),
    # Placement last: it decides on the final graph, at each node's precision (decide only).
    Stage("placement", (place_on_devices,)),
)


# The decisions again, on the graph the passes left: the precision search asks for another of
# the plans assign_precision weighed (ctx.layer_plans), and placement follows the new precisions.
REDECIDE: tuple[Stage, ...] = (Stage("precision", (assign_precision,)),
                                Stage("sparsity", (assign_sparsity,), when=lambda ctx: ctx.options.sparsity is not None),
                                Stage("placement", (place_on_devices,)))


@dataclass
class PipelineRun:
    """What running a pipeline left: one record per pass run, and what the decide-only passes
    decided beyond node meta (pass name -> its PassResult.decided, the last run's)."""

    records: list[PassRecord] = field(default_factory=list)
    decided: dict[str, Mapping[str, Any]] = field(default_factory=dict)


def onnxruntime_may_build(ctx: PassContext) -> bool:
    """Whether ONNX Runtime is the forced backend or a candidate on any device of the profile."""
    return any("onnxruntime" in ctx.options.backends_for(device) for device in ctx.profile.devices.values())


def run(gm: GraphModule, ctx: PassContext, pipeline: tuple[Stage, ...] = PIPELINE) -> PipelineRun:
    """Run `pipeline` over `gm` in place; return the records and the decisions."""
    _check_disabled_names(ctx.options.disabled_passes, pipeline)
    done = PipelineRun()
    for stage in pipeline:
        if not stage.when(ctx):
            continue
        for _ in range(MAX_REPEATS if stage.repeat_until_stable else 1):
            changed = False
            for pass_fn in stage.passes:
                if pass_fn.__name__ in ctx.options.disabled_passes:
                    continue
                record, result = _run_one(pass_fn, stage.name, gm, ctx, done.records)
                done.records.append(record)
                if result.decided:
                    done.decided[pass_fn.__name__] = result.decided
                changed |= record.changed
            if not changed:
                break
    return done


def run_pass(pass_fn: Pass, gm: GraphModule, ctx: PassContext, stage: str = "single") -> PassResult:
    """One pass through the runner's checks and clean-up, as the pipeline runs it (for tests and
    tools that study one pass)."""
    return _run_one(pass_fn, stage, gm, ctx, [])[1]


def _run_one(pass_fn: Pass, stage: str, gm: GraphModule, ctx: PassContext,
             before: list[PassRecord]) -> tuple[PassRecord, PassResult]:
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
        _check_dynamic_sizes(gm, ctx)  # also after a decide-only pass: reading a size can pin it
    except KilnError:
        raise  # a pass's own error already says what, where and the fix (e.g. a pin naming no node)
    except Exception as exc:
        raise _failure(pass_fn.__name__, stage, before, exc, gm) from exc
    record = PassRecord(pass_fn.__name__, stage, result.changed, dict(result.counts),
                        [(s.node, s.reason) for s in result.skipped], time.perf_counter() - start, result.annotated)
    return record, result


def _check_disabled_names(disabled: tuple[str, ...], pipeline: tuple[Stage, ...]) -> None:
    # A misspelt name would otherwise disable nothing, silently.
    known = list(dict.fromkeys(p.__name__ for stage in pipeline for p in stage.passes))
    for name in disabled:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise OptionsError(f"unknown pass {name!r} in disabled_passes", where="options.disabled_passes",
                               fix=f"{hint}passes: {', '.join(known)}")


def _check_meta(gm: GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            raise RuntimeError(f"node {node.name} ({node.target}) has no shape meta after the pass")


def _check_dynamic_sizes(gm: GraphModule, ctx: PassContext) -> None:
    # Arithmetic or a comparison on a symbolic size adds a guard; a guard that fixes the size
    # pins it to the example for every later call of the graph (a dynamic batch of 2 would then
    # refuse a batch of 3). Caught here, the error names the pass instead of the user's call.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = ctx.input_spec.tensors if ctx.input_spec is not None else ()
    for index, node in enumerate(placeholders):
        if not isinstance(val := node.meta.get("val"), torch.Tensor):
            continue
        spec = specs[index] if len(specs) == len(placeholders) else None
        for axis, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and size.node.expr.is_number:
                dim = spec.shape[axis] if spec is not None and axis < len(spec.shape) else None
                what = f"dynamic size {dim.name!r}" if isinstance(dim, Dim) else "dynamic size"
                raise RuntimeError(f"the {what} of input {spec.name if spec else node.name!r} (axis {axis}) was pinned to "
                                   f"{int(size.node.expr)}: the pass computed with the symbolic size, not its example value")


def _failure(name: str, stage: str, before: list[PassRecord], exc: Exception, gm: GraphModule) -> PassFailed:
    ran = ", ".join(dict.fromkeys(r.name for r in before)) or "none"
    node = _node_at_failure(exc, gm)
    if node is not None:
        line = source_line(node)
        where = f"node {node.name} ({node.target})" + (f", from {line}" if line else "")
    else:
        where = "no single node (the pass failed outside its walk over the graph)"
    return PassFailed(f"pass {name} (stage {stage}) failed: {type(exc).__name__}: {exc}",
                      where=f"{where}; passes run before it: {ran}",
                      fix=f"disable it with CompileOptions(disabled_passes=({name!r},)) and report the model")


def _node_at_failure(exc: BaseException, gm: GraphModule) -> torch.fx.Node | None:
    """The node of `gm` the pass was working on when it raised: the innermost frame of the
    traceback that holds one of the graph's nodes in a local variable named `node`, else in
    any local variable."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    nodes = set(gm.graph.nodes)
    for frame in reversed(frames):
        local = frame.f_locals
        named = local.get("node")
        if isinstance(named, torch.fx.Node) and named in nodes:
            return named
        found = next((v for v in local.values() if isinstance(v, torch.fx.Node) and v in nodes), None)
        if found is not None:
            return found
    return None
