"""Capture a model as an ATen graph with torch.export.

The model is wrapped so the exported program takes the flat tensor leaves of the user's call
positionally and returns a flat tuple of tensors; the runtime restores both structures from
pytree specs. This keeps every backend's interface the same (named flat tensors in and out)
whatever the model's signature, and lets ModelOutput-style results come back as plain dicts
that serialise without pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from kiln.errors import CaptureError
from kiln.frontend.input_roles import with_input_roles
from kiln.frontend.input_spec import build_spec, export_dynamic_shapes, forward_parameters, leaf_names, normalize_call
from kiln.frontend.moe import MoeBlock, load_note, looks_like_moe, recording_expert_load, static_moe_forms
from kiln.types import Dim, InputSpec


@dataclass
class Captured:
    gm: torch.fx.GraphModule  # parameters as get_attr nodes, flat tensor placeholders
    input_spec: InputSpec
    output_structure: str  # pytree spec (JSON) of the model's output, dict/list/tuple only
    output_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]  # flat, in spec order
    example_outputs: tuple[torch.Tensor, ...]  # eager results on example_inputs, flat
    output_none_positions: tuple[int, ...] = ()  # leaves of the output structure that are None
    notes: tuple[str, ...] = ()  # for the report: what capture changed to capture the model
    moe_blocks: tuple[dict, ...] = ()  # MoeBlock.to_dict() per experts module: the static form taken, the expert load


class _FlatCall(torch.nn.Module):
    """Calls `model` from flat tensor leaves; returns flat output tensors."""

    def __init__(self, model: torch.nn.Module, spec: InputSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, *tensors: torch.Tensor):
        from kiln.frontend.input_spec import rebuild_call

        args, kwargs = rebuild_call(self.spec, list(tensors))
        out = plain_containers(self.model(*args, **kwargs))
        return tuple(leaf for leaf in pytree.tree_leaves(out) if leaf is not None)


def plain_containers(value: Any) -> Any:
    """Mappings (transformers' ModelOutput included) become dicts, namedtuples tuples."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain_containers(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [plain_containers(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_containers(v) for v in value)
    return value


def export_program(module: torch.nn.Module, inputs: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """torch.export as kiln uses it everywhere (capture and backends' re-export): non-strict and
    without autograd. With dynamic dims, a failed export is retried with examples of size 2
    where they had size 1 on a dynamic axis (export fixes sizes 0 and 1 and then blames the
    model), and only then size-oblivious: a size-oblivious program built from a batch of 1 ran
    wrong on every later row once AOTInductor compiled it (torch 2.13; a widened example gives a
    program right at every size), while models that export plainly keep export's usual reasoning."""
    with torch.no_grad():
        try:
            return torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic_shapes, strict=False)
        except Exception:
            if dynamic_shapes is None:
                raise
            first = sys.exc_info()
        widened = _widened(tuple(inputs), dynamic_shapes)
        if widened is not None:
            try:
                return torch.export.export(module, widened, dynamic_shapes=dynamic_shapes, strict=False)
            except Exception:
                pass
        try:
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                return torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic_shapes, strict=False)
        except Exception:
            raise first[1].with_traceback(first[2]) from None  # the plain export's reason is the clearer one


def _widened(inputs: tuple, dynamic_shapes) -> tuple | None:
    """`inputs` with each size-1 example axis that a dynamic Dim (max >= 2) covers repeated to
    size 2; None when there is none. The values repeat, so what the model computes per row is
    what it computes on the example."""
    per_input = dynamic_shapes
    if len(dynamic_shapes) == 1 and len(inputs) != 1 and isinstance(dynamic_shapes[0], (tuple, list)):
        per_input = dynamic_shapes[0]  # a module taking *tensors: one entry holds them all
    if len(per_input) != len(inputs):
        return None
    changed, out = False, []
    for value, axes in zip(inputs, per_input):
        if isinstance(value, torch.Tensor) and isinstance(axes, Mapping):
            for axis, dim in axes.items():
                if value.shape[axis] == 1 and getattr(dim, "max", 0) >= 2:
                    value, changed = torch.cat([value, value], dim=axis), True
        out.append(value)
    return tuple(out) if changed else None


CACHE_NOTE = ("the model returns a key/value cache object (transformers' use_cache=True), which no engine returns; "
              "kiln captured it with config.use_cache=False for this compile, so the compiled model returns no "
              "past_key_values (pass use_cache=False yourself to say so)")


def capture(model: torch.nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None,
            dynamic: Mapping[str, Mapping[int, Dim | str]] | None = None, moe_form: str = "auto",
            no_moe_dispatch: str = "") -> Captured:
    """The model as an fx graph over flat tensors, with its input spec and eager outputs. A
    transformers model whose config asks for a key/value cache is captured without it (a note
    says so); call it inside `keeping_modes(model)` to have its config and modes restored.
    Mixture-of-experts blocks are exported in the form `moe_form` names (kiln.frontend.moe);
    `no_moe_dispatch` says why "auto" may not take the dispatch form (empty: it may)."""
    try:
        return _capture(model, example_inputs, example_kwargs, dynamic, moe_form, no_moe_dispatch)
    except CaptureError as exc:
        config = getattr(model, "config", None)
        if not (_returns_cache(exc) and getattr(config, "use_cache", False)):
            raise
        config.use_cache = False  # keeping_modes puts it back once the compile is done
        captured = _capture(model, example_inputs, example_kwargs, dynamic, moe_form, no_moe_dispatch)
        return dataclasses.replace(captured, notes=(*captured.notes, CACHE_NOTE))


def _returns_cache(exc: CaptureError) -> bool:
    return "cache_utils" in exc.what or "Cache'>" in exc.what


def _capture(model: torch.nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None,
             dynamic: Mapping[str, Mapping[int, Dim | str]] | None, moe_form: str, no_moe_dispatch: str = "") -> Captured:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model has type {type(model).__name__}", where="model",
                           fix="pass a torch.nn.Module (wrap a plain function in a Module's forward)")
    args, kwargs = normalize_call(example_inputs, example_kwargs)
    flat, structure = pytree.tree_flatten((args, kwargs))
    names = leaf_names(model, args, kwargs)
    spec = dataclasses.replace(build_spec(flat, names, structure, dynamic), parameters=forward_parameters(model))
    tensors = tuple(x for x in flat if isinstance(x, torch.Tensor))
    if model.training:
        model.eval()  # inference compiler: dropout and BatchNorm statistics in eval mode
    wrapper = _FlatCall(model, spec).eval()
    with static_moe_forms(model, moe_form, bool(dynamic), no_moe_dispatch) as moe_blocks:  # the user's forwards are back after the export
        try:
            dynamic_shapes = export_dynamic_shapes(spec)
            # the wrapper takes *tensors: one dynamic_shapes entry holds them all
            exported = export_program(wrapper, tensors, None if dynamic_shapes is None else (dynamic_shapes,))
        except Exception as exc:  # torch.export raises many types; all become one clear CaptureError
            raise _moe_capture_error(exc, model, moe_blocks) or _capture_error(exc, model, spec.names) from exc
    gm = exported.module()
    _refuse_state_writes(gm, model)
    drop_guard_calls(gm)  # kiln checks inputs itself, with errors that name the input
    spec = with_input_roles(spec, gm)  # which inputs index tables (checked per call) and which are masks
    for param in gm.parameters():
        param.requires_grad_(False)
    # One eager call gives the output structure and the reference outputs verification reuses.
    with torch.no_grad(), recording_expert_load(model, moe_blocks):
        eager_leaves, out_structure = pytree.tree_flatten(plain_containers(model(*args, **kwargs)))
    output_names = _output_names(out_structure)
    for name, leaf in zip(output_names, eager_leaves):
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise CaptureError(f"{name} has type {type(leaf).__name__}; kiln compiles tensor outputs only",
                               where="model output", fix="return tensors (or dicts, lists and tuples of tensors) from forward()")
    none_positions = tuple(i for i, leaf in enumerate(eager_leaves) if leaf is None)
    tensor_names = tuple(n for i, n in enumerate(output_names) if i not in none_positions)
    return Captured(gm, spec, pytree.treespec_dumps(out_structure), tensor_names, tensors,
                    tuple(x for x in eager_leaves if x is not None), none_positions, _moe_notes(moe_blocks),
                    tuple(block.to_dict() for block in moe_blocks))


def _moe_notes(blocks: list[MoeBlock]) -> tuple[str, ...]:
    taken = [b for b in blocks if b.form is not None]
    if not taken:
        return ()
    forms = sorted({b.form for b in taken})
    how = {"dispatch": "one kiln::moe_experts node running each expert on its own tokens in PyTorch, in the eager "
                       "partition between the compiled ones (the loop's work)",
           "blocked": "tokens grouped by expert, each expert's run padded to whole blocks, one batched matmul over the blocks "
                      "(about the loop's FLOPs)",
           "dense": "every expert on every token, weighted by a routing matrix zero off the top-k (E/k times the FLOPs)"}
    notes = [f"mixture of experts: {len(taken)} experts modules captured in a form whose shapes do not follow the routing ({'; '.join(f'{f}: {how[f]}' for f in forms)}) "
             "in place of transformers' per-expert loop over data-dependent token lists; no token is dropped, and the model "
             "keeps its own forward (verification compares against it)"]
    notes += [f"expert load: {load_note(b)}" for b in taken if b.load]
    notes += [f"mixture of experts: {b.name} kept its own forward: {b.refusal}" for b in blocks if b.form is None]
    return tuple(notes)


def _moe_capture_error(exc: Exception, model: torch.nn.Module, blocks: list[MoeBlock]) -> CaptureError | None:
    """A failed export of a model that routes tokens to experts in a form kiln could not make
    static: the error names those blocks and what to try. None for other models."""
    kept = [f"{b.name} ({b.refusal})" for b in blocks if b.form is None]
    unknown = looks_like_moe(model, {b.name for b in blocks})
    if not (kept or unknown):
        return None
    base = _capture_error(exc, model, ())
    named = "; ".join(kept + unknown)
    return CaptureError(f"{base.what}. The model has mixture-of-experts blocks kiln did not rewrite into a static form: {named}",
                        where=base.where,
                        fix="kiln rewrites experts written as transformers 5 writes them (3-D gate_up_proj/up_proj and down_proj "
                            "parameters, an act_fn, forward(hidden, top_k_index, top_k_weights)); write the block that way, "
                            "or pass moe_form='dense' if only the dispatch and blocked forms failed, or compile the model's parts around "
                            "the block")


@contextlib.contextmanager
def keeping_modes(model: torch.nn.Module):
    """Run a compile with `model` in eval mode, and leave each of its modules in the train or
    eval mode it had (capture switches a training model to eval: dropout off, BatchNorm on its
    running statistics), and a transformers config's use_cache as it was."""
    modes = [(module, module.training) for module in model.modules()] if isinstance(model, torch.nn.Module) else []
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        if use_cache is not None:
            config.use_cache = use_cache


def _refuse_state_writes(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """A model whose forward writes its own buffers or parameters (a step counter, a running
    statistic, a cache kept in a buffer) has state a compiled engine would not keep: its answers
    would drift from the model's call by call. Refused here, before any eager call advances it."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for arg, schema_arg in zip(node.args, node.target._schema.arguments):
            info = schema_arg.alias_info
            if info is not None and info.is_write and isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                line = next((ln.strip() for ln in reversed((node.meta.get("stack_trace") or "").strip().splitlines())
                             if ln.strip().startswith("File ")), None)
                state = arg.target[len("model."):] if arg.target.startswith("model.") else arg.target  # past the wrapper
                raise CaptureError(f"the model writes its own state in forward(): {node.target} updates {state!r} "
                                   "on every call, which a compiled engine would not do, so its answers would drift from "
                                   "the model's", where=line or f"{type(model).__name__}.forward",
                                   fix="keep forward() free of state updates in eval mode (move the update out of forward, "
                                       "or guard it with `if self.training`), or compile a module without that state")


def _output_names(structure: pytree.TreeSpec) -> tuple[str, ...]:
    dummy = pytree.tree_unflatten(list(range(structure.num_leaves)), structure)
    if structure.is_leaf():
        return ("output",)
    paths, _ = pytree.tree_flatten_with_path(dummy)
    from kiln.frontend.input_spec import _key_text

    return tuple("output" + "".join(_key_text(k) for k in path) for path, _ in paths)


def drop_guard_calls(gm: torch.fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    gm.recompile()


def _capture_error(exc: Exception, model: torch.nn.Module, input_names: tuple[str, ...]) -> CaptureError:
    """The exporter's reason, the user's source line, and what to try."""
    text = str(exc)
    for index, name in enumerate(input_names):  # torch names inputs by the wrapper's *tensors
        text = text.replace(f"L['tensors'][{index}]", name).replace(f"tensors_{index}", name)
    message = text.strip().split("\n")
    reason = next((line for line in message if line.strip()), type(exc).__name__)
    reason = reason.split(" For more information")[0]
    details = [line.strip() for line in message if line.strip().startswith("- ")][:3]
    if "Suggested fixes:" in message:  # torch's own suggestion, e.g. "batch = 2*_batch"
        at = message.index("Suggested fixes:")
        details.append("Suggested fixes: " + "; ".join(line.strip() for line in message[at + 1:at + 4] if line.strip()))
    if details:
        reason = f"{reason} {' '.join(details)}"
    where = _user_frame(exc) or f"{type(model).__name__}.forward"
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__ or "Could not guard on data-dependent" in text:
        fix = ("the model branches on a tensor's value; compute the branch with torch.where or torch.cond, "
               "or move the check outside forward()")
    elif "Constraints violated" in text or "specialized" in text or "ConstraintViolation" in type(exc).__name__:
        fix = ("a dimension you marked dynamic is fixed by the model (or limited to a smaller range); "
               "drop it from `dynamic` or narrow its min/max as the message says")
    elif "cache_utils" in text or "Cache'>" in text:
        fix = "call the model without its key/value cache: pass use_cache=False (e.g. example_kwargs={'use_cache': False})"
    elif "Unsupported" in type(exc).__name__ or "not supported" in text.lower():
        fix = "rewrite the unsupported construct named above, or capture a submodule that avoids it"
    else:
        fix = "check that model(*example_inputs) runs in eager mode; simplify the construct at the line named"
    op = _op_in(text)
    what = f"torch.export could not capture the model: {type(exc).__name__}: {reason[:700]}"
    if op:
        what += f" (op: {op})"
    return CaptureError(what, where=where, fix=fix)


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch, kiln and the standard library."""
    torch_dir = os.path.dirname(torch.__file__)
    kiln_dir = os.path.dirname(os.path.dirname(__file__))
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename
        if path.startswith(("<", torch_dir, kiln_dir)) or "/lib/python3" in path and "site-packages" not in path:
            continue
        found = f"{path}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return found


def _op_in(text: str) -> str | None:
    import re

    match = re.search(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", text)
    return match.group(1) if match else None
