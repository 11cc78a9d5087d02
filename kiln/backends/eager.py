"""The eager pseudo-backend: a partition of ops no other backend supports, run by PyTorch itself.

Placement sends an op here only when no backend on any device takes it, and the report names
the op. The engine is the partition's fx GraphModule. It is saved as a torch.export program
(.pt2: graph as JSON, weights as raw bytes) with the sample inputs member emptied and every
payload checked to need no pickle, so the artifact reloads without the model's Python source
and without unpickling anything. Custom ops (torch.library) are looked up by name when the
program loads: import the library that registers them before `kiln.load`; kiln's own
(kiln::moe_experts, a mixture-of-experts block's experts) registers with kiln.

The eager partition lowers one kind of layer: an experts node the precision plan puts at bf16
gets its expert weights stored in bf16, and the op computes in its weights' type (oneDNN's bf16
GEMMs on the CPU), as the precision pass measured it. Any other layer here runs at fp32.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import io
import json
import re
import zipfile
from pathlib import Path
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from kiln.backends.base import (Availability, BackendBase, BackendSettings, CapabilityTable, EngineEntry, export_partition)
from kiln.frontend.moe_op import EXPERT_TYPES, MOE_EXPERTS, WEIGHT_ARGS
from kiln.fx_helpers import add_constant, attr_value
from kiln.ir import PartitionGraph
from kiln.errors import BackendError
from kiln.types import DeviceKind, Precision

# PyTorch runs every op at every precision; kiln runs eager partitions on the host CPU only.
CAPABILITIES = CapabilityTable("eager", {DeviceKind.CPU: frozenset(Precision)})


class EagerEngine:
    backend = "eager"

    def __init__(self, program: torch.export.ExportedProgram):
        self.program = program
        self.module = program.module()
        self.summary = "runs in eager PyTorch: " + ", ".join(sorted(_ops(self.module)))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.module(*inputs)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    def save(self, directory: Path, stem: str) -> EngineEntry:
        target = directory / f"{stem}.pt2"
        buffer = io.BytesIO()
        program = self.program
        torch.export.save(program, buffer)
        _without_pickles(buffer.getvalue(), target)
        return EngineEntry(self.backend, [target.name], {"torch": torch.__version__, "ops": sorted(_ops(self.module))})


def _experts_lowered(partition: PartitionGraph) -> PartitionGraph:
    """`partition` with each experts node the plan lowers reading its weights in the plan's type
    (new constants; the captured graph's tensors are the user's parameters, never written)."""
    low = {layer.node: EXPERT_TYPES[layer.scheme] for layer in partition.precision.lowered
           if layer.op == "experts" and layer.scheme in EXPERT_TYPES}
    if not low:
        return partition
    gm = GraphModule(partition.gm, copy.deepcopy(partition.gm.graph))
    for node in gm.graph.nodes:
        if node.name not in low or node.target is not MOE_EXPERTS:
            continue
        dtype, args = low[node.name], list(node.args)
        for index in range(WEIGHT_ARGS.start, WEIGHT_ARGS.stop):
            if isinstance(args[index], Node) and (value := attr_value(gm, args[index])) is not None:
                args[index] = add_constant(gm, node, value.to(dtype), str(dtype).split(".")[-1])
        node.args = tuple(args)
    gm.graph.eliminate_dead_code()
    # a GraphModule built from a graph keeps only the attributes it reads: not the fp32 weights
    return dataclasses.replace(partition, gm=GraphModule(gm, gm.graph))


def _ops(module: torch.nn.Module) -> set[str]:
    return {str(n.target) for n in module.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}


def _without_pickles(data: bytes, target: Path) -> None:
    """Copy the .pt2 archive, emptying the pickled sample inputs (torch.export.load treats an
    empty member as none) and refusing payloads that would need unpickling."""
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for name in source.namelist():
            payload = source.read(name)
            if "/sample_inputs/" in name:
                payload = b""
            elif name.endswith("_config.json") and _uses_pickle(payload):
                raise BackendError("the eager partition holds an object torch.export can only pickle", where=name,
                                   fix="keep such objects (script objects, opaque constants) out of the model's forward")
            out.writestr(name, payload)


def _uses_pickle(payload: bytes) -> bool:
    config = json.loads(payload).get("config", {})
    return any(entry.get("use_pickle") for entry in config.values() if isinstance(entry, dict))


# ---------------------------------------------------------------- load-time checks
#
# torch.export.load unpickles whatever an archive asks it to: a legacy weights or constants
# member (data/weights/model.pt), sample inputs, config entries with use_pickle, and opaque or
# script-object constants (pickled whatever use_pickle says); it passes every symbolic
# expression to sympy.sympify, which eval()s it, and exec()s the program's guards_code when it
# rebuilds the module with sample inputs present. So before torch opens an eager engine, kiln
# reads the archive as a zip and accepts only what its own save writes (an allow-list; anything
# else is refused, naming the member):
#
#   <root>/archive_format, archive_version, byteorder, .data/version, .data/serialization_id
#   <root>/models/model.json                 the graph: no guards_code, every expression plain
#                                            sympy, every call target an operator
#   <root>/data/weights/model_weights_config.json, data/weights/weight_<n>        raw tensor bytes
#   <root>/data/constants/model_constants_config.json, data/constants/tensor_<n>  raw tensor bytes
#   <root>/data/sample_inputs/model.pt      empty (kiln blanks it when saving)

PT2_METADATA = frozenset({"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"})
_EAGER_FIXED = PT2_METADATA | {"models/model.json", "data/weights/model_weights_config.json",
                               "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"}
_PAYLOADS = {"data/weights/model_weights_config.json": ("data/weights/", re.compile(r"weight_\d+")),
             "data/constants/model_constants_config.json": ("data/constants/", re.compile(r"tensor_\d+"))}
_UNTRUSTED = "rebuild the artifact from the model; pin its digest to load only the artifact you built"


def pt2_members(path: Path, what: str) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """The open archive of a .pt2 file and its members by name below the archive's one root
    folder; refuses duplicate names and members outside that folder (torch reads one root)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BackendError(f"{what} is not a readable .pt2 archive ({exc})", where=str(path), fix=_UNTRUSTED) from exc
    members: dict[str, zipfile.ZipInfo] = {}
    root = None
    for info in archive.infolist():
        head, _, rest = info.filename.partition("/")
        root = head if root is None else root
        if head != root or not rest or rest in members:
            archive.close()
            problem = "a second member named" if rest in members and head == root else "a member outside its root folder:"
            raise BackendError(f"{what} holds {problem} {info.filename!r}", where=str(path), fix=_UNTRUSTED)
        members[rest] = info
    return archive, members


def _check_archive(path: Path) -> None:
    """Refuse an eager .pt2 unless it holds only what kiln's save writes (see above): nothing in
    it may be unpickled, exec()ed or eval()ed when torch loads it."""
    archive, members = pt2_members(path, "eager engine")
    with archive:
        payload_files: dict[str, set[str]] = {}
        for config_name, (folder, pattern) in _PAYLOADS.items():
            if config_name not in members:
                raise BackendError(f"eager engine lacks member {config_name!r}", where=str(path), fix=_UNTRUSTED)
            payload_files[folder] = _payload_paths(archive.read(members[config_name]), config_name, pattern, path)
        for name, info in members.items():
            folder, _, file = name.rpartition("/")
            if name in _EAGER_FIXED or file in payload_files.get(folder + "/", ()):
                continue
            raise BackendError(f"eager engine holds member {name!r}, which kiln never writes (it could hold a pickle)",
                               where=str(path), fix=_UNTRUSTED)
        for folder, files in payload_files.items():
            missing = sorted(f for f in files if folder + f not in members)
            if missing:
                raise BackendError(f"eager engine lacks member {folder + missing[0]!r}, which its config names",
                                   where=str(path), fix=_UNTRUSTED)
        sample = members.get("data/sample_inputs/model.pt")
        if sample is not None and sample.file_size:
            raise BackendError("eager engine member 'data/sample_inputs/model.pt' holds pickled sample inputs "
                               "(kiln saves it empty)", where=str(path), fix=_UNTRUSTED)
        if "models/model.json" not in members:
            raise BackendError("eager engine lacks member 'models/model.json'", where=str(path), fix=_UNTRUSTED)
        _check_program(archive.read(members["models/model.json"]), path)


def _payload_paths(data: bytes, member: str, pattern: re.Pattern, path: Path) -> set[str]:
    """The raw tensor files a weights or constants config names; refuses an entry that is a
    pickle (use_pickle) or names anything but a raw tensor file (a script or opaque object)."""
    try:
        config = json.loads(data)["config"]
        entries = list(config.items())
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise BackendError(f"eager engine member {member!r} is not a payload config ({type(exc).__name__})",
                           where=str(path), fix=_UNTRUSTED) from None
    files = set()
    for key, entry in entries:
        name = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False or not isinstance(name, str) \
                or not pattern.fullmatch(name) or not isinstance(entry.get("tensor_meta"), dict):
            raise BackendError(f"eager engine member {member!r} entry {key!r} is not raw tensor bytes (a pickled payload "
                               f"or an object torch.export can only pickle: {name!r})", where=str(path), fix=_UNTRUSTED)
        files.add(name)
    return files


# Call targets torch's deserializer resolves by attribute lookup from `torch`, `operator` or
# `math`: operators (torch.ops.<namespace>.<op>[.<overload>]) and the symbolic-shape ops it
# knows; anything else (torch.load, a function reached through torch's own imports) is refused.
_OP_TARGET = re.compile(r"torch\.ops(\.(?!__)\w+){2,3}")
_SYM_TARGETS = frozenset(
    [f"_operator.{n}" for n in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod",
                                "pow", "truediv", "and_", "or_", "lshift", "rshift", "getitem")]
    + ["math.trunc"] + [f"torch.sym_{n}" for n in ("not", "int", "float", "ite", "max", "min", "sqrt")])


def _check_program(data: bytes, path: Path) -> None:
    member = "models/model.json"
    try:
        program = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackendError(f"eager engine member {member!r} is not JSON ({exc})", where=str(path), fix=_UNTRUSTED) from None
    if not isinstance(program, dict) or program.get("guards_code", []) != []:
        raise BackendError(f"eager engine member {member!r} carries guards_code, Python source torch would exec() "
                           "(kiln never writes any)", where=str(path), fix=_UNTRUSTED)
    stack = [(program, None)]
    while stack:
        value, key = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, k) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, key) for v in value)
        elif key in ("target", "as_operator") and not (isinstance(value, str) and (
                _OP_TARGET.fullmatch(value) or value in _SYM_TARGETS)):
            raise BackendError(f"eager engine member {member!r} calls {value!r}, which is not an operator",
                               where=str(path), fix=_UNTRUSTED)
        elif key == "expr_str" and not (isinstance(value, str) and _plain_sympy(value)):
            raise BackendError(f"eager engine member {member!r} holds the expression {str(value)[:80]!r}, which is not plain "
                               "sympy (torch would eval() it)", where=str(path), fix=_UNTRUSTED)


@functools.cache
def _sympy_names() -> frozenset[str]:
    import torch.utils._sympy.functions as shape_functions

    torch_functions = {n for n, v in vars(shape_functions).items() if isinstance(v, type) and v.__module__ == shape_functions.__name__}
    return frozenset(torch_functions | {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan",
        "GreaterThan", "And", "Or", "Not", "Xor", "ITE", "Piecewise", "ExprCondPair", "BooleanTrue", "BooleanFalse",
        "oo", "zoo", "nan", "true", "false", "pi", "E"})


_SYMBOL = re.compile(r"[a-z]+\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.IGNORECASE)
_OPERATORS = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop,
              ast.boolop, ast.Load)


def _plain_sympy(text: str) -> bool:
    """True when `text` is what sympy's srepr writes for a shape expression (sympy classes and
    functions by name, the program's symbols, numbers): no attribute, subscript, lambda or
    string beyond a Symbol's name or a Float's digits, so sympify has nothing to run."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    names = _sympy_names()
    allowed_strings = set()  # ids of the string constants a Call below admits (ast.walk visits parents first)
    for node in ast.walk(tree):
        if isinstance(node, _OPERATORS) or isinstance(node, ast.keyword):
            continue
        if isinstance(node, ast.Name):
            if node.id not in names and not _SYMBOL.fullmatch(node.id):
                return False
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in names:
                return False
            if node.keywords and node.func.id not in ("Symbol", "Float"):
                return False
            if any(not isinstance(k.value, ast.Constant) or not isinstance(k.value.value, (bool, int)) for k in node.keywords):
                return False
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and (
                    (node.func.id == "Symbol" and _SYMBOL.fullmatch(first.value))
                    or (node.func.id == "Float" and _NUMBER.fullmatch(first.value))):
                allowed_strings.add(id(first))
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and id(node) not in allowed_strings:
                return False
            if not isinstance(node.value, (bool, int, float, str)):
                return False
        else:
            return False
    return True


class EagerBackend(BackendBase):
    name: ClassVar[str] = "eager"
    capabilities: ClassVar[CapabilityTable] = CAPABILITIES

    def available(self) -> Availability:
        return Availability(True, version=torch.__version__)

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> EagerEngine:
        try:
            return EagerEngine(export_partition(_experts_lowered(partition)))
        except Exception as exc:
            raise BackendError(f"could not export the eager partition: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                               where=f"partition {partition.name}", fix="report the model") from exc

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> EagerEngine:
        path = directory / entry.files[0]
        _check_archive(path)
        try:
            program = torch.export.load(path)
        except Exception as exc:
            ops = ", ".join(entry.meta.get("ops", []))
            raise BackendError(f"could not load the eager partition ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                               where=str(path), fix=f"it runs {ops}: import the library registering any custom op "
                                                    "(torch.library) before kiln.load") from exc
        return EagerEngine(program)
