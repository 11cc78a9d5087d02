"""What kiln uses of TensorRT's Python API, and a check of those uses against an installed TensorRT.

kiln's TensorRT backend cannot be run without an NVIDIA GPU, so a renamed flag or a removed
method would reach users before any test. This module makes the API surface kiln touches a
list, read mechanically from kiln's own TensorRT modules (`kiln/backends/tensorrt*.py`) with
`ast`, and checks that list against the real compiled bindings, which import without NVIDIA's
native libraries when tiny stand-ins are on the library path (tests/backends/test_tensorrt_conformance.py).

What `scan` reads as a use of TensorRT:
- every attribute chain and call on the name `trt` (in kiln's TensorRT code a local or
  parameter named `trt` is always the tensorrt module, by convention);
- the same on names annotated with a TensorRT class (`builder: trt.Builder`), and on names and
  `self.` attributes assigned from such a chain (`network = builder.create_network(flags)`);
- attributes written on such objects (`builder_config.DLA_core = 0`): the property needs a setter;
- methods a subclass of a TensorRT class overrides (`class Log(trt.ILogger): def log(...)`);
- members reached with `getattr(trt.X, name)` by names from kiln's own tables: those tables
  are DYNAMIC below, checked member by member for each TensorRT major that may use them.

`check` resolves each use on a tensorrt module: each name exists; a call's positional count and
keywords fit one of the pybind11 signatures in the docstring ("name(self: tensorrt.X, arg: T,
...) -> R", overloads numbered); the docstring's return type types the rest of the chain. This
file imports only the standard library, so it runs in a subprocess beside bindings that cannot
load into kiln's own process: `python kiln/backends/tensorrt_api.py --json` checks kiln's code
against the tensorrt importable there.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

# TensorRT majors kiln builds and loads engines with: 10 (strong typing opt-in, weak typing
# deprecated since 10.12) and 11 (strongly typed only, weak-typing API removed).
SUPPORTED_MAJORS = (10, 11)
INSTALL = "pip install 'tensorrt>=10,<12'"

# trt.BuilderFlag members kiln may set or clear, with the majors it may use each with. The
# weak-typing precision flags are used only for DLA builds on TensorRT 10 (derive_build_config).
BUILDER_FLAGS: dict[str, tuple[int, ...]] = {
    "TF32": (10, 11), "SPARSE_WEIGHTS": (10, 11), "VERSION_COMPATIBLE": (10, 11), "GPU_FALLBACK": (10, 11),
    "FP16": (10,), "INT8": (10,),
}
HARDWARE_COMPATIBILITY = ("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")
# Every trt.DataType member (10.16 and 11.4 have the same twelve); the conformance check fails
# when a release adds one, so that kiln's dtype tables (tensorrt_config) are extended with it.
DATATYPES = ("FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8", "INT4", "FP4", "E8M0")
# trt.NetworkDefinitionCreationFlag members kiln passes, per major: 11 builds every network
# strongly typed and deprecates the flag ("retained for API compatibility but ignored").
NETWORK_FLAGS: dict[str, tuple[int, ...]] = {"STRONGLY_TYPED": (10,)}
# Members the code reaches by getattr(trt.<Class>, name): class -> {member: majors}
DYNAMIC: dict[str, dict[str, tuple[int, ...]]] = {
    "BuilderFlag": BUILDER_FLAGS,
    "NetworkDefinitionCreationFlag": NETWORK_FLAGS,
    "HardwareCompatibilityLevel": {name: SUPPORTED_MAJORS for name in HARDWARE_COMPATIBILITY},
    "DataType": {name: SUPPORTED_MAJORS for name in DATATYPES},
}
# Enums whose full member list kiln keeps (DATATYPES): a member kiln lacks is a problem.
COMPLETE_ENUMS = {"DataType": DATATYPES}
# Names TensorRT's docstrings mark [DEPRECATED] that kiln still uses, and why; any other
# deprecated name kiln uses is a problem, so a deprecation reaches kiln before the removal.
ALLOWED_DEPRECATED = {
    "BuilderFlag.FP16": "TensorRT 10 compiles DLA engines from precision flags only",
    "BuilderFlag.INT8": "TensorRT 10 compiles DLA engines from precision flags only",
}

MODULE = "trt"  # the name kiln's TensorRT code gives the tensorrt module


def major_of(version: str) -> int:
    """10 for "10.16.1.11"; -1 when the text starts with no number."""
    match = re.match(r"\s*(\d+)", version or "")
    return int(match.group(1)) if match else -1


def unsupported_major(version: str) -> str | None:
    """Why kiln cannot use TensorRT `version`, or None."""
    major = major_of(version)
    if major in SUPPORTED_MAJORS:
        return None
    return (f"TensorRT {version} is installed; kiln builds with TensorRT "
            f"{' and '.join(str(m) for m in SUPPORTED_MAJORS)} only")


# ---------------------------------------------------------------------------------------------
# The scan: kiln's source -> uses

@dataclass(frozen=True)
class Step:
    kind: str  # "attr" | "call" | "set" | "instance" | "override" | "getattr"
    name: str = ""  # attribute (attr, set, override) or the class whose members getattr reaches
    args: int = 0  # positional arguments of a call; parameters (less self) of an override
    keywords: tuple[str, ...] = ()

    def text(self) -> str:
        if self.kind == "attr":
            return f".{self.name}"
        if self.kind == "call":
            return "(" + ", ".join(["_"] * self.args + [f"{k}=_" for k in self.keywords]) + ")"
        if self.kind == "set":
            return f".{self.name} = _"
        if self.kind == "instance":
            return "<instance>"
        if self.kind == "override":
            return f" overrides {self.name}({self.args} args)"
        return ".<getattr>"


@dataclass(frozen=True)
class Use:
    steps: tuple[Step, ...]  # from the tensorrt module
    where: str  # file:line

    def text(self) -> str:
        return MODULE + "".join(s.text() for s in self.steps)


def _signature_of_call(node: ast.Call) -> Step:
    starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
    return Step("call", args=-1 if starred else len(node.args), keywords=tuple(k.arg or "**" for k in node.keywords))


class _Scanner:
    def __init__(self, where: str):
        self.where = where
        self.uses: list[Use] = []

    # a chain: the steps from the tensorrt module to `node`, or None when `node` is not one
    def chain(self, node: ast.AST, env: dict) -> tuple[Step, ...] | None:
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return env.get(f"self.{node.attr}")
            base = self.chain(node.value, env)
            return None if base is None else base + (Step("attr", node.attr),)
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
                base = self.chain(node.args[0], env)
                if base is None:
                    return None
                name = node.args[1]
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    return base + (Step("attr", name.value),)
                owner = base[-1].name if base and base[-1].kind == "attr" else ""
                return base + (Step("getattr", owner),)
            base = self.chain(node.func, env)
            return None if base is None else base + (_signature_of_call(node),)
        return None

    def annotation(self, node: ast.AST | None, env: dict) -> tuple[Step, ...] | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
        base = self.chain(node, {MODULE: ()})
        return None if not base else base + (Step("instance"),)

    def emit(self, steps: tuple[Step, ...], node: ast.AST) -> None:
        if steps:
            self.uses.append(Use(steps, f"{self.where}:{getattr(node, 'lineno', 0)}"))

    # expressions: emit maximal chains, then look inside their calls' arguments
    def expression(self, node: ast.AST | None, env: dict) -> None:
        if node is None:
            return
        if isinstance(node, (ast.Attribute, ast.Call)) and (steps := self.chain(node, env)) is not None:
            self.emit(steps, node)
            self._arguments(node, env)
            return
        if isinstance(node, (ast.Lambda,)):
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr) or isinstance(child, (ast.comprehension, ast.keyword)):
                self.expression(child, env)

    def _arguments(self, node: ast.AST, env: dict) -> None:
        while isinstance(node, (ast.Attribute, ast.Call)):
            if isinstance(node, ast.Call):
                for arg in node.args:
                    self.expression(arg, env)
                for keyword in node.keywords:
                    self.expression(keyword.value, env)
                node = node.func
            else:
                node = node.value

    # statements
    def body(self, statements: Sequence[ast.stmt], env: dict) -> None:
        for statement in statements:
            self.statement(statement, env)

    def statement(self, node: ast.stmt, env: dict) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.function(node, env, {})
        elif isinstance(node, ast.ClassDef):
            self.klass(node, env)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            self.expression(value, env)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            typed = self.annotation(node.annotation, env) if isinstance(node, ast.AnnAssign) else None
            steps = typed if typed is not None else (self.chain(value, env) if value is not None else None)
            for target in targets:
                self.assign(target, steps, env)
        elif isinstance(node, ast.AugAssign):
            self.expression(node.value, env)
            self.expression(node.target, env)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    self.statement(child, env)
                elif isinstance(child, ast.expr):
                    self.expression(child, env)
                elif isinstance(child, (ast.withitem, ast.excepthandler)):
                    for part in ast.iter_child_nodes(child):
                        if isinstance(part, ast.stmt):
                            self.statement(part, env)
                        elif isinstance(part, ast.expr):
                            self.expression(part, env)

    def assign(self, target: ast.AST, steps, env: dict) -> None:
        if isinstance(target, ast.Name):
            if target.id == MODULE:
                return  # `trt = _import_trt()`: still the module
            if steps:
                env[target.id] = steps
            else:
                env.pop(target.id, None)
        elif isinstance(target, ast.Attribute):
            if isinstance(target.value, ast.Name) and target.value.id == "self":
                if steps:
                    env[f"self.{target.attr}"] = steps
                return
            base = self.chain(target.value, env)
            if base is not None:
                self.emit(base + (Step("set", target.attr),), target)
            else:
                self.expression(target.value, env)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self.assign(element, None, env)

    def function(self, node, outer: dict, class_env: dict) -> None:
        env = {**outer, **class_env, MODULE: ()}
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if arg.arg == MODULE:
                continue
            typed = self.annotation(arg.annotation, env)
            if typed is not None:
                env[arg.arg] = typed
            else:
                env.pop(arg.arg, None)
        for default in [*args.defaults, *args.kw_defaults]:
            self.expression(default, outer)
        self.body(node.body, env)

    def klass(self, node: ast.ClassDef, env: dict) -> None:
        for base in node.bases:
            self.expression(base, env)
            steps = self.chain(base, env)
            if steps:  # a subclass of a TensorRT class: what it overrides must exist there
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                        count = len(item.args.posonlyargs) + len(item.args.args) - 1
                        self.emit(steps + (Step("override", item.name, count),), item)
        # `self.X = <chain>` in any method types self.X in every method
        class_env: dict = {}
        for _ in range(2):  # twice: an attribute assigned from another one defined later
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    probe = _Scanner(self.where)
                    local = {**env, **class_env, MODULE: ()}
                    for arg in item.args.args:
                        if arg.arg != MODULE:
                            typed = probe.annotation(arg.annotation, local)
                            if typed is not None:
                                local[arg.arg] = typed
                            else:
                                local.pop(arg.arg, None)
                    for statement in ast.walk(item):
                        if isinstance(statement, ast.Assign):
                            steps = probe.chain(statement.value, local)
                            for target in statement.targets:
                                if isinstance(target, ast.Name) and steps and target.id != MODULE:
                                    local[target.id] = steps
                                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                                        and target.value.id == "self" and steps):
                                    class_env[f"self.{target.attr}"] = local[f"self.{target.attr}"] = steps
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.function(item, env, class_env)
            else:
                self.statement(item, {**env, **class_env})


def scan_source(text: str, where: str = "<source>") -> list[Use]:
    """Every use of TensorRT in one module's source."""
    scanner = _Scanner(where)
    scanner.body(ast.parse(text).body, {MODULE: ()})
    return scanner.uses


def kiln_sources() -> list[Path]:
    """kiln's TensorRT modules: the files this one sits beside whose names start with tensorrt."""
    here = Path(__file__).resolve()
    return sorted(p for p in here.parent.glob("tensorrt*.py") if p != here)


def scan(paths: Iterable[Path] | None = None) -> list[Use]:
    uses: list[Use] = []
    for path in kiln_sources() if paths is None else paths:
        uses.extend(scan_source(Path(path).read_text(), Path(path).name))
    return uses


# ---------------------------------------------------------------------------------------------
# The check: uses -> problems, against an imported tensorrt module

@dataclass(frozen=True)
class Param:
    name: str
    default: bool


@dataclass
class Problem:
    use: str
    where: str
    problem: str


@dataclass
class _At:
    """Where a chain stands: the module, a class, an instance of a class, a function (bound to an
    instance or not), a plain value (int, str, ...), or unknown."""

    kind: str
    obj: object = None
    cls: type | None = None
    bound: bool = False
    label: str = ""


_SIGNATURE = re.compile(r"^\s*(?:\d+\.\s+)?([\w.]*)\((.*)\)\s*->\s*(.+?)\s*$")


def signatures(doc: str | None, name: str | None = None) -> list[tuple[list[Param], str]]:
    """The pybind11 signatures in a docstring: (parameters, return type) per overload; the
    generic "(*args, **kwargs)" header of an overloaded function is left out."""
    found = []
    for line in (doc or "").splitlines():
        match = _SIGNATURE.match(line)
        if match is None or (name is not None and match.group(1) and match.group(1).split(".")[-1] != name):
            continue
        params = [p for p in _split(match.group(2)) if p]
        if params == ["*args", "**kwargs"]:
            continue
        found.append(([Param(p.split(":")[0].split("=")[0].strip(), "=" in p) for p in params], match.group(3)))
    return found


def _split(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return parts


def fits(params: list[Param], positional: int, keywords: Sequence[str]) -> str | None:
    """Why a call with `positional` arguments and `keywords` does not fit `params` (self
    already removed), or None. positional -1: a *args call, counted as fitting."""
    if any(p.name.startswith("*") for p in params) or positional < 0:
        return None
    if positional > len(params):
        return f"takes {len(params)} positional arguments, kiln passes {positional}"
    filled = {p.name for p in params[:positional]}
    names = [p.name for p in params]
    for keyword in keywords:
        if keyword not in names or re.fullmatch(r"arg\d+", keyword):  # pybind11's unnamed arguments
            return f"has no keyword argument {keyword!r} (parameters: {', '.join(names) or 'none'})"
        if keyword in filled:
            return f"gets {keyword!r} twice"
        filled.add(keyword)
    missing = [p.name for p in params if p.name not in filled and not p.default]
    if missing:
        return f"needs {', '.join(missing)}, which kiln does not pass"
    return None


_DEPRECATED = re.compile(r"(?<!\()\[DEPRECATED\][^.]*(?:\.\d+)*[^.]*")  # not "(... [DEPRECATED] ...)" about another name


def deprecation(holder, name: str) -> str | None:
    """The [DEPRECATED] note TensorRT's docstrings give `holder.name`, or None. A function or
    class carries it in its own docstring (a class before its ":ivar" list), an enum member in
    its enum's "Members:" list, a property in its class's ":ivar name:" entry."""
    static = inspect.getattr_static(holder, name, None)
    if isinstance(static, property):
        for entry in (getattr(holder, "__doc__", "") or "").split(":ivar ")[1:]:
            if entry.startswith(f"{name}:"):
                return _note(entry)
        return None
    value = getattr(holder, name, None)
    if isinstance(value, type):
        return _note(re.split(r":ivar |:arg |Members:", value.__doc__ or "")[0])
    if callable(value):
        return _note(getattr(value, "__doc__", "") or "")
    entries: dict[str, str] = {}
    current = None
    for line in (getattr(holder, "__doc__", "") or "").split("Members:", 1)[-1].splitlines():
        match = re.match(r"\s{1,4}(\w+) : ?(.*)", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2)
        elif current is not None:
            entries[current] += " " + line.strip()
    return _note(entries.get(name, ""))


def _note(text: str) -> str | None:
    match = _DEPRECATED.search(text)
    return " ".join(match.group(0).split()) if match else None


def _deprecated_use(holder, name: str) -> str | None:
    note = deprecation(holder, name)
    label = f"{getattr(holder, '__name__', '?')}.{name}"
    if note is None or label in ALLOWED_DEPRECATED:
        return None
    return f"{label} is deprecated ({note})"


def _resolve_type(trt, text: str) -> _At:
    text = text.strip()
    for wrapper in ("typing.Optional[", "Optional["):
        if text.startswith(wrapper):
            text = text[len(wrapper):-1]
    text = text.split(" | ")[0].strip()
    if text in ("None", "int", "float", "bool", "str", "bytes", "object", "typing.SupportsInt", "typing.SupportsFloat") \
            or text.startswith(("list", "tuple", "dict", "typing.", "collections.")):
        return _At("value", label=text)
    name = re.split(r"[.:]+", text)[-1]
    for candidate in (name, name[1:] if name.startswith("I") else None):
        cls = getattr(trt, candidate, None) if candidate else None
        if isinstance(cls, type):
            return _At("instance", cls=cls, label=cls.__name__)
    return _At("unknown", label=text)


def _step(trt, at: _At, step: Step) -> tuple[_At, str | None]:
    """Apply one step; returns where the chain stands next and a problem (or None)."""
    if at.kind in ("unknown", "value"):
        return at, (None if at.kind == "value" else f"cannot check past an untyped {at.label!r}")
    if step.kind == "instance":
        if at.kind != "class":
            return _At("unknown", label="instance"), f"{at.label} is not a class"
        return _At("instance", cls=at.obj, label=at.obj.__name__), None
    if step.kind in ("attr", "set"):
        holder = at.obj if at.kind in ("module", "class") else at.cls
        if at.kind not in ("module", "class", "instance"):
            return _At("unknown", label=step.name), f"{at.label} has no attributes to look up"
        try:
            static = inspect.getattr_static(holder, step.name)
        except AttributeError:
            return _At("unknown", label=step.name), f"{at.label} has no attribute {step.name!r}"
        label = f"{at.label}.{step.name}"
        if (note := _deprecated_use(holder, step.name)) is not None:
            return _At("unknown", label=label), note
        if step.kind == "set":
            if at.kind != "instance":
                return at, f"kiln writes {label} on a {at.kind}, not an instance"
            if isinstance(static, property):
                return at, (None if static.fset is not None else f"{label} is read-only")
            return at, f"{label} is not a property kiln can write"
        if isinstance(static, property):
            if at.kind == "instance":
                returned = signatures(static.fget.__doc__)
                return (_resolve_type(trt, returned[0][1]) if returned else _At("unknown", label=label)), None
            return _At("value", label=label), None
        value = getattr(holder, step.name)
        if isinstance(value, type):
            return _At("class", obj=value, label=value.__name__), None
        if callable(value) and not isinstance(value, type):
            return _At("function", obj=value, cls=holder if isinstance(holder, type) else None,
                       bound=at.kind == "instance" or (at.kind == "class" and isinstance(static, (staticmethod, classmethod))),
                       label=label), None
        if at.kind == "class" and isinstance(value, at.obj):  # an enum member
            return _At("instance", cls=at.obj, label=label), None
        return _At("value", label=label), None
    if step.kind == "call":
        if at.kind == "class":
            options = signatures(getattr(at.obj, "__init__").__doc__, "__init__")
            result, bound = _At("instance", cls=at.obj, label=at.obj.__name__), True
        elif at.kind == "function":
            name = at.label.rsplit(".", 1)[-1]
            options = signatures(getattr(at.obj, "__doc__", ""), name)
            result, bound = None, at.bound
        else:
            return _At("unknown", label=at.label), f"{at.label} is not callable"
        if not options:
            return _At("unknown", label=at.label), f"{at.label} has no pybind11 signature to check the call against"
        reasons = []
        for params, returns in options:
            params = params[1:] if bound and params and params[0].name in ("self", "arg0") else params
            reason = fits(params, step.args, step.keywords)
            if reason is None:
                return (result or _resolve_type(trt, returns)), None
            reasons.append(reason)
        return _At("unknown", label=at.label), f"{at.label}{step.text()} fits no signature: {'; '.join(reasons)}"
    if step.kind == "override":
        if at.kind != "class":
            return at, f"{at.label} is not a class to subclass"
        method = getattr(at.obj, step.name, None)
        if method is None:
            return at, f"{at.label} has no method {step.name!r} to override"
        options = signatures(method.__doc__, step.name)
        if options and not any(len(params) - 1 == step.args for params, _ in options):
            counts = sorted({len(params) - 1 for params, _ in options})
            return at, f"{at.label}.{step.name} passes {counts} arguments, kiln's override takes {step.args}"
        return at, None
    if step.kind == "getattr":
        if step.name not in DYNAMIC:
            return _At("unknown", label=step.name), (f"getattr on {at.label} with names kiln's DYNAMIC table does "
                                                     "not list")
        return (_At("instance", cls=at.obj, label=at.label) if at.kind == "class" else _At("unknown")), None
    return at, f"unknown step {step.kind}"


def check(trt, uses: Iterable[Use], major: int | None = None) -> list[Problem]:
    """Every use that does not resolve on the tensorrt module `trt`, plus DYNAMIC members missing
    for this major and enum members kiln does not know."""
    major = major_of(trt.__version__) if major is None else major
    problems: list[Problem] = []
    seen = set()
    for use in uses:
        key = (use.steps, use.where)
        if key in seen:
            continue
        seen.add(key)
        at = _At("module", obj=trt, label=MODULE)
        for step in use.steps:
            at, problem = _step(trt, at, step)
            if problem is not None:
                problems.append(Problem(use.text(), use.where, problem))
                break
    for owner, members in DYNAMIC.items():
        enum = getattr(trt, owner, None)
        for member, majors in members.items():
            if major not in majors:
                continue
            if not hasattr(enum, member):
                problems.append(Problem(f"{MODULE}.{owner}.{member}", "tensorrt_api.DYNAMIC",
                                        f"TensorRT {trt.__version__} has no {owner}.{member}"))
            elif (note := _deprecated_use(enum, member)) is not None and owner not in COMPLETE_ENUMS:
                problems.append(Problem(f"{MODULE}.{owner}.{member}", "tensorrt_api.DYNAMIC", note))
    for owner, known in COMPLETE_ENUMS.items():
        members = getattr(getattr(trt, owner, None), "__members__", {})
        for extra in sorted(set(members) - set(known)):
            problems.append(Problem(f"{MODULE}.{owner}.{extra}", "tensorrt_api.COMPLETE_ENUMS",
                                    f"TensorRT {trt.__version__} has {owner}.{extra}, which kiln's tables lack"))
    return problems


def main(argv: list[str] | None = None) -> int:
    """Check kiln's TensorRT code (and any --source files) against the importable tensorrt."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--module", default="tensorrt", help="the module to check against (tensorrt, tensorrt_lean)")
    parser.add_argument("--source", action="append", default=[], help="check this file's uses instead of kiln's")
    parser.add_argument("--member", action="append", default=[],
                        help="also check that Enum.MEMBER exists and is not deprecated (e.g. BuilderFlag.TF32)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import importlib

    trt = importlib.import_module(args.module)
    uses = scan([Path(s) for s in args.source]) if args.source else scan()
    problems = check(trt, uses)
    for text in args.member:
        owner, _, name = text.partition(".")
        enum = getattr(trt, owner, None)
        if enum is None or not hasattr(enum, name):
            problems.append(Problem(text, "--member", f"TensorRT {trt.__version__} has no {text}"))
        elif (note := _deprecated_use(enum, name)) is not None:
            problems.append(Problem(text, "--member", note))
    if args.json:
        datatypes = sorted(getattr(getattr(trt, "DataType", None), "__members__", {}))
        print(json.dumps({"version": trt.__version__, "uses": len(uses), "datatypes": datatypes,
                          "problems": [asdict(p) for p in problems]}))
    else:
        print(f"TensorRT {trt.__version__}: {len(uses)} uses checked, {len(problems)} problems")
        for p in problems:
            print(f"  {p.where}: {p.use}: {p.problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    # run as a script, this file's folder leads sys.path, and kiln's own tensorrt.py would
    # shadow the real package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main())
