"""Input specs: from example inputs and a `dynamic` mapping to kiln's InputSpec, and back to
torch.export's `dynamic_shapes`; random draws of a spec for verification and benchmarks."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree

from kiln.errors import CaptureError, InputMismatch
from kiln.types import Dim, InputSpec, TensorSpec


def normalize_call(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        args: tuple = ()
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**example_inputs, **kwargs}
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise CaptureError(f"example_inputs has type {type(example_inputs).__name__}",
                           where="example_inputs", fix="pass a tensor, a tuple of tensors, or a dict of named tensors")
    if not args and not kwargs:
        raise CaptureError("no example inputs were given", where="example_inputs",
                           fix="pass example_inputs=(tensor, ...) shaped like real calls")
    return args, kwargs


def forward_parameters(model: torch.nn.Module) -> tuple[str, ...]:
    """forward()'s named parameters in order; none when it takes *args or **kwargs (a call then
    cannot be bound by name)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return ()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def leaf_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """A readable name per pytree leaf of (args, kwargs): the forward() parameter names."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for index, arg in enumerate(args):
        base = params[index] if index < len(params) else f"input_{index}"
        names.extend(_sub_names(base, arg))
    for key, value in kwargs.items():
        names.extend(_sub_names(key, value))
    return names


def _sub_names(base: str, value: Any) -> list[str]:
    leaves, spec = pytree.tree_flatten(value)
    if spec.is_leaf():
        return [base]
    paths, _ = pytree.tree_flatten_with_path(value)
    return [base + "".join(_key_text(k) for k in path) for path, _ in paths]


def _key_text(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return f".{getattr(key, attr)}"
    return f".{key}"


def build_spec(flat: list[Any], names: list[str], structure: pytree.TreeSpec,
               dynamic: Mapping[str, Mapping[int, Dim | str]] | None) -> InputSpec:
    """InputSpec from flattened example leaves; non-tensor leaves become constants."""
    axes_by_input = _dynamic_axes(dynamic, names, flat)
    tensors, constants, positions, constant_names = [], [], [], []
    example_size: dict[str, tuple[int, str]] = {}
    for position, (name, leaf) in enumerate(zip(names, flat)):
        if not isinstance(leaf, torch.Tensor):
            if not isinstance(leaf, (int, float, bool, str, type(None))):
                raise CaptureError(f"input {name!r} has type {type(leaf).__name__}", where=f"input {name}",
                                   fix="pass tensors, or plain int/float/bool/str/None settings")
            constants.append(leaf)
            positions.append(position)
            constant_names.append(name)
            continue
        shape: list[int | Dim] = list(leaf.shape)
        for axis, dim in axes_by_input.get(name, {}).items():
            size = shape[axis]
            if not dim.min <= size <= dim.max:
                raise CaptureError(f"example size {size} on axis {axis} lies outside {dim.name}[{dim.min}..{dim.max}]",
                                   where=f"input {name}", fix="widen the Dim's range or change the example")
            first = example_size.setdefault(dim.name, (size, name))
            if first[0] != size:
                raise CaptureError(f"dim {dim.name!r} is {size} in this example but {first[0]} in input {first[1]!r}",
                                   where=f"input {name}", fix=f"inputs sharing {dim.name!r} need examples of equal size on it")
            shape[axis] = dim
        low = high = None
        if not leaf.is_floating_point() and leaf.numel() > 0 and leaf.dtype != torch.bool:
            low, high = int(leaf.min()), int(leaf.max())
        tensors.append(TensorSpec(name, leaf.dtype, tuple(shape), low, high))
    return InputSpec(tuple(tensors), pytree.treespec_dumps(structure), tuple(constants), tuple(positions),
                     tuple(constant_names))


def _dynamic_axes(dynamic: Mapping[str, Any] | None, names: list[str], flat: list[Any]) -> dict[str, dict[int, Dim]]:
    """Validate `dynamic` and resolve each axis to one Dim per name (a string names a Dim
    given elsewhere, or gets the default range); conflicting ranges for one name are an error."""
    if not dynamic:
        return {}
    if not isinstance(dynamic, Mapping):
        raise CaptureError(f"dynamic must be a mapping, got {type(dynamic).__name__}", where="dynamic",
                           fix='write dynamic={"input_name": {0: "batch"}}')
    unknown = sorted(set(dynamic) - set(names))
    if unknown:
        raise CaptureError(f"dynamic names unknown input(s) {unknown}", where="dynamic", fix=f"use input names: {', '.join(names)}")
    leaves = dict(zip(names, flat))
    defined: dict[str, tuple[Dim, str]] = {}
    raw: dict[str, dict[int, Dim | str]] = {}
    for name, axes in dynamic.items():
        if not isinstance(axes, Mapping):
            raise CaptureError(f"expected a mapping of axis to dim, got {type(axes).__name__} {axes!r}", where=f"dynamic[{name!r}]",
                               fix=f'write dynamic={{{name!r}: {{0: "batch"}}}}')
        leaf = leaves[name]
        rank = leaf.dim() if isinstance(leaf, torch.Tensor) else 0
        raw[name] = {}
        for axis, dim in axes.items():
            if isinstance(axis, bool) or not isinstance(axis, int):
                raise CaptureError(f"axis {axis!r} must be an int", where=f"dynamic[{name!r}]", fix="write axes as integers, e.g. {0: 'batch'}")
            if not -rank <= axis < rank:
                raise CaptureError(f"axis {axis} out of range for a {rank}-d input", where=f"dynamic[{name!r}]",
                                   fix=f"use axes 0..{rank - 1}")
            if isinstance(dim, str):
                try:
                    Dim(dim)
                except ValueError as exc:
                    raise CaptureError(str(exc), where=f"dynamic[{name!r}][{axis}]", fix="use an identifier such as 'batch'") from None
            elif isinstance(dim, Dim):
                seen = defined.setdefault(dim.name, (dim, name))
                if seen[0] != dim:
                    raise CaptureError(f"dim {dim.name!r} has range {dim.min}..{dim.max} here but {seen[0].min}..{seen[0].max} "
                                       f"in input {seen[1]!r}", where=f"dynamic[{name!r}]", fix="give one range per dim name")
            else:
                raise CaptureError(f"axis {axis} must be a name or kiln.Dim, got {type(dim).__name__}", where=f"dynamic[{name!r}]",
                                   fix='write {0: "batch"} or {0: kiln.Dim("batch", min=1, max=64)}')
            raw[name][axis % rank] = dim
    return {name: {axis: dim if isinstance(dim, Dim) else defined.get(dim, (Dim(dim), ""))[0] for axis, dim in axes.items()}
            for name, axes in raw.items()}


def export_dynamic_shapes(spec: InputSpec) -> tuple | None:
    """The `dynamic_shapes` torch.export needs for a module taking the flat tensors as parameters."""
    if not spec.dims():
        return None
    dims = {name: torch.export.Dim(name, min=d.min, max=d.max) for name, d in spec.dims().items()}
    return tuple({axis: dims[d.name] for axis, d in enumerate(t.shape) if isinstance(d, Dim)} or None
                 for t in spec.tensors)


def check_call(spec: InputSpec, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Flatten a call and check it against the spec; return the flat tensors in spec order."""
    if not kwargs and not spec.constant_positions and _plain_positional(spec.call_structure) == len(args):
        # the common case, tensors passed positionally: no pytree walk on the hot path
        tensors = [check_tensor(ts, value) for ts, value in zip(spec.tensors, args)]
        _check_shared_dims(spec, tensors)
        return tensors
    expected = _treespec(spec.call_structure)
    args, kwargs = _as_compiled(spec, expected, args, kwargs)
    flat, structure = pytree.tree_flatten((args, kwargs))
    if structure != expected:
        raise InputMismatch(_structure_difference(spec, expected, args, kwargs), where="call",
                            fix=f"call with the arguments used at compile time: {spec.describe()}")
    tensors = []
    constant_at = {p: (v, n) for p, v, n in zip(spec.constant_positions, spec.constants,
                                                 spec.constant_names or [f"#{p}" for p in spec.constant_positions])}
    tensor_specs = iter(spec.tensors)
    for position, leaf in enumerate(flat):
        if position in constant_at:
            value, name = constant_at[position]
            if isinstance(leaf, torch.Tensor) or not _same_setting(leaf, value):
                raise InputMismatch(f"setting is {_short(leaf)} but was {value!r} at compile time", where=f"input {name!r}",
                                    fix="pass the compiled value, or compile again with this one")
            continue
        ts = next(tensor_specs)
        tensors.append(check_tensor(ts, leaf))
    _check_shared_dims(spec, tensors)
    return tensors


def _same_setting(given: Any, compiled: Any) -> bool:
    numbers = (bool, int, float)
    if isinstance(given, numbers) and isinstance(compiled, numbers):
        return given == compiled  # True and 1 take the same branch in the model
    return type(given) is type(compiled) and given == compiled


@functools.lru_cache(maxsize=64)
def _treespec(text: str) -> pytree.TreeSpec:
    """Parsed once per spec: this runs on every call of a compiled model."""
    return pytree.treespec_loads(text)


@functools.lru_cache(maxsize=64)
def _plain_positional(text: str) -> int:
    """How many tensors the compiled call took positionally, if that is all it took; else -1."""
    expected = _treespec(text)
    args, kwargs = expected.child(0), expected.child(1)
    if kwargs.num_children or any(not child.is_leaf() for child in args.children()):
        return -1
    return args.num_children


def _as_compiled(spec: InputSpec, expected: pytree.TreeSpec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call split into positional and keyword inputs the way the compile call was, bound by
    forward()'s parameter names as Python binds them (`m(ids, attention_mask=mask)` and
    `m(input_ids=ids, attention_mask=mask)` are one call), keywords in the compiled order. A call
    that does not bind (a missing or unknown name) is left as given for the mismatch report."""
    positional, keys = expected.child(0).num_children, list(_kwarg_names(expected))
    if len(args) == positional and set(kwargs) == set(keys):
        return args, {key: kwargs[key] for key in keys}
    params = spec.parameters
    if not params or len(args) > len(params) or any(p in kwargs for p in params[:len(args)]):
        return args, kwargs
    bound = {**dict(zip(params, args)), **kwargs}
    wanted = [*params[:positional], *keys]
    if set(bound) != set(wanted) or len(wanted) != len(set(wanted)):
        return args, kwargs
    return tuple(bound[p] for p in params[:positional]), {key: bound[key] for key in keys}


def _kwarg_names(expected: pytree.TreeSpec) -> list:
    return list(expected.child(1).context or [])


def _structure_difference(spec: InputSpec, expected: pytree.TreeSpec, args: tuple, kwargs: dict) -> str:
    want_args = expected.child(0).num_children
    want_kwargs = _kwarg_names(expected)
    parts = []
    if len(args) != want_args:
        parts.append(f"{len(args)} positional input(s) given, {want_args} compiled")
    missing = [k for k in want_kwargs if k not in kwargs]
    unexpected = [k for k in kwargs if k not in want_kwargs]
    if missing:
        parts.append(f"missing keyword input(s) {missing}")
    if unexpected:
        parts.append(f"unexpected keyword input(s) {unexpected}")
    if not parts:
        nested = _nesting_differences(spec, expected, args, kwargs)
        parts.append(f"input(s) {nested} are not nested as compiled (tensor, tuple, list or dict)" if nested
                     else "an input's nesting (tuple, list, dict or tensor) differs from the compiled call")
    return "the call does not match the compiled one: " + "; ".join(parts)


def _nesting_differences(spec: InputSpec, expected: pytree.TreeSpec, args: tuple, kwargs: dict) -> list[str]:
    """Names of the top-level inputs whose pytree shape differs from the compiled call's."""
    leaf_names = _leaf_names(spec, expected.num_leaves)
    compiled = [*expected.child(0).children(), *expected.child(1).children()]
    given = [*args, *(kwargs[k] for k in _kwarg_names(expected))]
    names, start = [], 0
    for want, value in zip(compiled, given):
        if pytree.tree_structure(value) != want:
            names.append(leaf_names[start].split(".")[0] if start < len(leaf_names) else f"#{start}")
        start += want.num_leaves
    return names


def _leaf_names(spec: InputSpec, count: int) -> list[str]:
    tensors = iter(t.name for t in spec.tensors)
    constants = dict(zip(spec.constant_positions, spec.constant_names or ()))
    return [constants.get(i, f"#{i}") if i in spec.constant_positions else next(tensors, f"#{i}") for i in range(count)]


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def check_tensor(ts: TensorSpec, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputMismatch(f"expected a tensor, got {type(value).__name__}", where=f"input {ts.name!r}", fix=f"pass {ts.describe()}")
    if value.dtype != ts.dtype:
        raise InputMismatch(f"dtype {value.dtype} does not match the compiled {ts.dtype}", where=f"input {ts.name!r}",
                            fix=f"convert with .to({ts.dtype}); expected {ts.describe()}")
    if value.dim() != len(ts.shape):
        raise InputMismatch(f"rank {value.dim()} (shape {tuple(value.shape)}) does not match the compiled rank {len(ts.shape)}",
                            where=f"input {ts.name!r}", fix=f"expected {ts.describe()}")
    for axis, (size, want) in enumerate(zip(value.shape, ts.shape)):
        if isinstance(want, Dim):
            if not want.min <= size <= want.max:
                raise InputMismatch(f"size {size} on axis {axis} is outside the compiled range {want.name}[{want.min}..{want.max}]",
                                    where=f"input {ts.name!r}", fix="recompile with a wider dynamic range")
        elif size != want:
            raise InputMismatch(f"shape {tuple(value.shape)} does not match the compiled shape (axis {axis}: {size} != {want})",
                                where=f"input {ts.name!r}",
                                fix=f"expected {ts.describe()}; to accept other sizes compile with dynamic={{{ts.name!r}: {{{axis}: 'name'}}}}")
    if value.device.type != "cpu":
        raise InputMismatch(f"tensor is on {value.device}, the compiled model takes CPU tensors", where=f"input {ts.name!r}",
                            fix="move it with .cpu()")
    if ts.index_range is not None and value.numel():
        _check_index_values(ts, value)
    return value if value.is_contiguous() else value.contiguous()


def _check_index_values(ts: TensorSpec, value: torch.Tensor) -> None:
    """Ids past the table the model looks them up in: PyTorch raises IndexError, a compiled
    engine would read out of bounds (an Inductor engine aborts the process)."""
    low, high = ts.index_range
    smallest, largest = (int(v) for v in torch.aminmax(value))
    if smallest < low or largest > high:
        bad = smallest if smallest < low else largest
        raise InputMismatch(f"value {bad} is outside {low}..{high}, the rows of the table the model looks this input up in",
                            where=f"input {ts.name!r}",
                            fix=f"pass values in {low}..{high} (token ids from the model's own tokenizer, for a vocabulary)")


def _check_shared_dims(spec: InputSpec, tensors: list[torch.Tensor]) -> None:
    seen: dict[str, tuple[int, str]] = {}
    for ts, value in zip(spec.tensors, tensors):
        for axis, want in enumerate(ts.shape):
            if isinstance(want, Dim):
                size = value.shape[axis]
                if want.name in seen and seen[want.name][0] != size:
                    raise InputMismatch(f"dim {want.name!r} is {size} here but {seen[want.name][0]} in input {seen[want.name][1]!r}",
                                        where=f"input {ts.name!r}", fix=f"inputs sharing {want.name!r} must agree on its size")
                seen.setdefault(want.name, (size, ts.name))


def random_inputs(spec: InputSpec, seed: int, sizes: Mapping[str, int] | None = None) -> list[torch.Tensor]:
    """A fresh draw of the flat tensor inputs; dynamic dims take `sizes` or a value in range."""
    gen = torch.Generator().manual_seed(seed)
    chosen = dict(sizes or {})
    for name, dim in spec.dims().items():
        if name not in chosen:
            chosen[name] = int(torch.randint(dim.min, min(dim.max, max(dim.min, 16)) + 1, (1,), generator=gen))
    out = []
    for ts in spec.tensors:
        shape = [chosen[d.name] if isinstance(d, Dim) else d for d in ts.shape]
        if ts.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(ts.dtype))
        elif ts.mask:
            out.append(padding_mask(shape, gen, fully_padded=seed % 2 == 0).to(ts.dtype))
        elif ts.dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            low, high = int(ts.low or 0), int(ts.high if ts.high is not None else 1)
            out.append(torch.randint(low, high + 1, shape, generator=gen, dtype=ts.dtype))
    return out


def padding_mask(shape: list[int], gen: torch.Generator, fully_padded: bool) -> torch.Tensor:
    """A mask as real batches have them: each row (the last axis) ones for its length, then
    zeros. Lengths are drawn per row; with `fully_padded` the last row is all zeros (a batch
    padded with an empty sequence) and, with more than one row, the first one is whole."""
    if not shape or 0 in shape:
        return torch.zeros(shape, dtype=torch.int64)
    length = shape[-1]
    rows = torch.randint(0, length + 1, (max(1, int(torch.tensor(shape[:-1]).prod())),), generator=gen)
    if fully_padded:
        rows[-1] = 0
        if rows.numel() > 1:
            rows[0] = length
    mask = (torch.arange(length)[None, :] < rows[:, None]).to(torch.int64)
    return mask.reshape(shape)


def rebuild_call(spec: InputSpec, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    """The user's (args, kwargs) from flat tensors plus the captured constants."""
    constant_at = dict(zip(spec.constant_positions, spec.constants))
    structure = _treespec(spec.call_structure)
    it = iter(tensors)
    leaves = [constant_at[i] if i in constant_at else next(it) for i in range(structure.num_leaves)]
    return pytree.tree_unflatten(leaves, structure)
