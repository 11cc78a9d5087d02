"""A model's fingerprint without capturing it: the compile cache's cheaper key.

It covers what decides the graph torch.export would capture and the weights it would carry:
  - the code: the source files of every module's classes (their whole files, so module-level
    constants count) and of the functions and classes their methods reach through globals;
  - each module's state that is not a parameter or a buffer (flags, sizes, a config object),
    and its train/eval mode;
  - every parameter and buffer, by name, dtype, shape and bytes;
  - the call: the example inputs' structure, shapes and dtypes, and the dynamic dims.

Where it cannot tell (a class without a source file, hooks on a module, an attribute whose
value it cannot read as plain data) it answers None and the compile captures the model and uses
the full key (kiln/cache.py), as before. A cache hit found by either key is re-verified
against the model before it is returned.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import json
import os
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree

# torch's own code is covered by its version in the key; reading its files would cost time for nothing
TORCH_DIR = os.path.dirname(torch.__file__)
STDLIB = frozenset(sys.stdlib_module_names) | {"builtins"}
MAX_DEPTH = 3  # how far from a method the functions it calls are followed through globals
PARALLEL_BYTES = 16 << 20  # weights past this are hashed on several threads (_weights_digest)
MAX_HASH_THREADS = 4  # past this, memory bandwidth, not cores, bounds the hashing


class Undecidable(Exception):
    """The fingerprint cannot speak for this model; the full key must."""


def model_fingerprint(model: torch.nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None,
                      dynamic: Mapping | None) -> str | None:
    """The fingerprint, or None where it cannot tell. It never raises: what is wrong with the
    model or the call is for capture to report, with its own message."""
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        digest = hashlib.sha256()
        files: dict[str, str] = {}
        for name, module in model.named_modules():
            _check_no_hooks(module, name)
            for cls in type(module).__mro__:
                if cls.__module__.startswith("torch.") or cls is object:
                    continue
                _code_files(cls, files, 0)
            digest.update(json.dumps([name, _qualname(type(module)), module.training, _state(module, name)],
                                     default=str).encode())
        digest.update(json.dumps(sorted(files.items())).encode())
        digest.update(_weights_digest([*model.named_parameters(), *model.named_buffers()]))
        digest.update(_call_signature(example_inputs, example_kwargs, dynamic).encode())
        digest.update(sys.version.encode())
        return digest.hexdigest()
    except Undecidable:
        return None
    except Exception:  # anything unexpected in user objects (a property that raises): the full key decides
        return None


def _check_no_hooks(module: torch.nn.Module, name: str) -> None:
    for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"):
        if getattr(module, attribute, None):
            raise Undecidable(f"{name or 'the model'} has hooks")


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _code_files(obj, files: dict[str, str], depth: int) -> None:
    """Add the source file of `obj` (a class or function) and, through the globals its code
    names, the files of the functions and classes it reaches."""
    path = _source_file(obj)
    if path is None or path.startswith(TORCH_DIR):
        return
    if path not in files:
        files[path] = _file_digest(path)
    if depth >= MAX_DEPTH:
        return
    functions = [obj] if isinstance(obj, types.FunctionType) else [
        v for v in vars(obj).values() if isinstance(v, (types.FunctionType, staticmethod, classmethod, property))]
    for function in functions:
        function = getattr(function, "__func__", None) or getattr(function, "fget", None) or function
        if not isinstance(function, types.FunctionType):
            continue
        for name in _names(function.__code__):
            target = function.__globals__.get(name)
            if isinstance(target, (types.FunctionType, type)) and _source_file(target) not in files:
                _code_files(target, files, depth + 1)


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _source_file(obj) -> str | None:
    """The real path of `obj`'s source file; None for code whose behaviour its version states
    (builtins and the standard library: the Python version is in the key)."""
    if (getattr(obj, "__module__", None) or "").split(".")[0] in STDLIB:
        return None
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:  # a builtin: its behaviour is its library's version
        return None
    if path is None or not os.path.isfile(path):
        raise Undecidable(f"no source file for {_qualname(obj)}")
    return os.path.realpath(path)


@functools.lru_cache(maxsize=4096)
def _file_digest_cached(path: str, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as source:
        return hashlib.sha256(source.read()).hexdigest()


def _file_digest(path: str) -> str:
    stat = os.stat(path)
    return _file_digest_cached(path, stat.st_mtime_ns, stat.st_size)


_SKIPPED_STATE = frozenset({"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set",
                            "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                            "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                            "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                            "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_is_full_backward_hook"})


def _state(module: torch.nn.Module, name: str) -> dict:
    return {key: _plain(value, f"{name}.{key}", 0) for key, value in sorted(vars(module).items()) if key not in _SKIPPED_STATE}


def _plain(value, where: str, depth: int):
    """`value` as JSON-able plain data, or Undecidable."""
    if depth > 6:
        raise Undecidable(f"{where} nests too deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, enum.Enum):
        return f"{_qualname(type(value))}.{value.name}"
    if isinstance(value, (torch.dtype, torch.device, torch.Size, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, torch.Tensor):  # a plain tensor attribute: it can be read by forward
        return [str(value.dtype), list(value.shape), hashlib.sha256(_tensor_bytes(value)).hexdigest()]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_plain(v, where, depth + 1) for v in value]]
    if isinstance(value, (set, frozenset)):
        return sorted(json.dumps(_plain(v, where, depth + 1), default=str) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        path = _source_file(value) if not isinstance(value, types.BuiltinFunctionType) else None
        return [_qualname(value), _file_digest(path) if path and not path.startswith(TORCH_DIR) else None]
    if isinstance(value, functools.partial):
        return [_plain(value.func, where, depth + 1), _plain(value.args, where, depth + 1),
                _plain(value.keywords, where, depth + 1)]
    if dataclasses.is_dataclass(value):
        return [_qualname(type(value)), _plain(dataclasses.asdict(value), where, depth + 1)]
    to_dict = getattr(value, "to_dict", None)  # configuration objects (transformers' PretrainedConfig)
    if callable(to_dict):
        try:
            return [_qualname(type(value)), _plain(to_dict(), where, depth + 1)]
        except Undecidable:
            raise
        except Exception:
            raise Undecidable(f"{where}.to_dict() failed") from None
    raise Undecidable(f"{where} holds a {type(value).__name__}")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The tensor's bytes, as a view of its memory where it is contiguous on the CPU: copying
    them out first cost a third of the hashing (0.04 s for MiniLM's weights)."""
    t = tensor.detach()
    if t.is_quantized or t.layout != torch.strided or t.device.type == "meta":
        raise Undecidable("a quantized, sparse or meta tensor")
    t = t.contiguous().cpu()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else b""


def _weights_digest(named: list[tuple[str, torch.Tensor]]) -> bytes:
    """sha256 over each tensor's name, dtype, shape and bytes, in order. Past PARALLEL_BYTES the
    tensors are cut into one contiguous run per core, each hashed on its own thread (hashlib
    lets go of the GIL while it hashes), and the runs' digests are joined in order: MiniLM's
    90 MB take 0.03 s on two cores instead of 0.05 s on one."""
    sizes = [t.numel() * t.element_size() for _, t in named]
    total = sum(sizes)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    runs = min(cores, MAX_HASH_THREADS) if total >= PARALLEL_BYTES else 1
    groups: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(runs)]
    filled = 0
    for item, size in zip(named, sizes):
        groups[min(runs - 1, filled * runs // max(total, 1))].append(item)
        filled += size
    tensor_bytes = [[(name, tensor, _tensor_bytes(tensor)) for name, tensor in group] for group in groups]  # raises here

    def run_digest(group) -> bytes:
        digest = hashlib.sha256()
        for name, tensor, data in group:
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(data)
        return digest.digest()

    if runs == 1:
        return run_digest(tensor_bytes[0])
    with ThreadPoolExecutor(runs) as pool:
        return b"".join(pool.map(run_digest, tensor_bytes))


def _call_signature(example_inputs, example_kwargs, dynamic) -> str:
    """The call's structure with each tensor's shape and dtype (its values do not shape the build)."""
    leaves, spec = pytree.tree_flatten((example_inputs, dict(example_kwargs or {})))
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append(["tensor", str(leaf.dtype), list(leaf.shape)])
        else:
            described.append(_plain(leaf, "example input", 0))
    return json.dumps([str(spec), described, _plain(_dynamic_plain(dynamic), "dynamic", 0)], default=str)


def _dynamic_plain(dynamic):
    if dynamic is None:
        return None
    out = {}
    for name, axes in dynamic.items():
        out[str(name)] = {str(axis): (dim if isinstance(dim, str) else [getattr(dim, "name", str(dim)), getattr(dim, "min", None),
                                                                        getattr(dim, "max", None)])
                          for axis, dim in (axes or {}).items()}
    return out
