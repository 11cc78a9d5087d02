"""One differential-fuzzing case: generate the model for a seed, compile it with kiln on one
backend, and compare the compiled model with eager PyTorch on a fresh input, then on inputs
drawn the way users send them (`probes`): integer inputs at the edges of their ranges and past
them, NaN and Inf in float inputs, a batch of one, and for the masked family attention masks
with padding, fully padded rows included. Shared by tests/fuzz/test_differential_fuzz.py
(CI-sized) and bench/fuzz_long.py (long runs).

Families: "general" (fuzz/generator.py, random op graphs) and "masked" (fuzz/masked.py, small
text encoders with input_ids and attention_mask).

Outcomes:
  ok          kiln built the model and it matches eager on kiln's own, fresh and probe inputs
  kiln_error  kiln refused with a KilnError other than VerificationError (message recorded)
  mismatch    VerificationError, or a fresh-input or probe comparison failed (a bug)
  crash       a non-Kiln exception from optimize() or from calling the compiled model, or the
              compiled model refusing an input eager accepts, or accepting one eager refuses
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

import kiln
from kiln.verify import TOLERANCE

from fuzz.generator import call, describe, draw_inputs, random_model
from fuzz.masked import masked_model, padded_masks

FAMILIES = ("general", "masked")

OUTCOMES = ("ok", "kiln_error", "mismatch", "crash")


@dataclass
class CaseResult:
    seed: int
    backend: str
    outcome: str
    family: str = "general"
    ops: str = ""
    error_type: str = ""
    error: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        text = f"seed {self.seed} on {self.backend}: {self.outcome}"
        if self.error:
            text += f" ({self.error_type}: {self.error})"
        return f"{text}\n  model: {self.ops}"


def _options(backend: str) -> dict:
    """optimize() keywords: the backend, one verification draw, fp32, and no compile cache where
    this kiln has one (a fuzz build must be fresh and must not fill the user's cache)."""
    opts = {"backend": backend, "verify_draws": 1}
    names = {f.name for f in dataclasses.fields(kiln.CompileOptions)}
    if "cache" in names:
        opts["cache"] = False
    if "accuracy_budget" in names:  # outputs are compared at fp32 tolerance: no layer may be lowered
        opts["precision"] = "fp32"
    return opts


def _plain(value):
    """Output structure with kiln's Outputs (a dict subclass) seen as a dict."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def compare_outputs(got, want) -> list[str]:
    """Problems found comparing a compiled model's outputs with eager's, at fp32 tolerance
    (an independent re-implementation of the allclose rule, not kiln.verify.compare)."""
    tol = TOLERANCE[kiln.Precision.FP32]
    got_leaves, got_spec = pytree.tree_flatten(_plain(got))
    want_leaves, want_spec = pytree.tree_flatten(_plain(want))
    if got_spec != want_spec:
        return [f"output structure {got_spec} differs from eager's {want_spec}"]
    problems = []
    for k, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        if not isinstance(g, torch.Tensor):
            problems.append(f"leaf {k}: got {type(g).__name__}, eager gives a tensor")
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            problems.append(f"leaf {k}: got {g.dtype}{tuple(g.shape)}, eager gives {w.dtype}{tuple(w.shape)}")
            continue
        g64, w64 = g.double(), w.double()
        if not torch.equal(torch.isnan(g64), torch.isnan(w64)):
            problems.append(f"leaf {k}: NaN positions differ")
            continue
        finite = torch.isfinite(w64)
        if not torch.equal(g64[~finite & ~torch.isnan(w64)], w64[~finite & ~torch.isnan(w64)]):
            problems.append(f"leaf {k}: Inf positions differ")
            continue
        diff = (g64 - w64).abs()[finite]
        bound = (tol.atol + tol.rtol * w64.abs())[finite]
        if diff.numel() and bool((diff > bound).any()):
            problems.append(f"leaf {k} {tuple(w.shape)}: max abs error {float(diff.max()):.3g}, "
                            f"worst excess over tolerance {float((diff - bound).max()):.3g}")
    return problems


def _first_line(exc: BaseException, limit: int = 600) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:limit]


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (the exporter's own reason under its banners)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _fresh_batch(model) -> int | None:
    """A batch size other than the example's for the fresh input (1 included: kiln promises a
    dynamic dim serves every size in its range), or None when the batch is static."""
    info = model.fuzz_info
    if not info["dynamic"]:
        return None
    choices = [1, info["batch"] + 1, info["batch"] + 5]
    return choices[info["seed"] % len(choices)]


def make_model(seed: int, family: str = "general"):
    if family == "masked":
        return masked_model(seed)
    return random_model(seed)


def describe_model(model) -> str:
    return getattr(model, "fuzz_label", None) or describe(model)


def fresh_inputs(model, batch: int | None, seed: int):
    """A fresh draw; for the masked family, with padded masks (a fully padded row when the batch
    has two rows or more)."""
    inputs = draw_inputs(model, batch=batch, seed=seed)
    if model.fuzz_info.get("family") != "masked":
        return inputs
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs[0]
    mask = padded_masks(ids.shape[0], ids.shape[1], seed)
    return {"input_ids": ids, "attention_mask": mask} if isinstance(inputs, dict) else (ids, mask)


def run_case(seed: int, backend: str, family: str = "general", probes: bool = True, campaign: bool = False) -> CaseResult:
    """campaign=True adds the probes a CI run leaves out: NaN/Inf inputs (runtimes differ from
    PyTorch on NaN in ways kiln lists rather than fixes) and ids past a range kiln did not find
    (an engine may abort the process: bench/fuzz_long.py runs cases in worker processes)."""
    start = time.perf_counter()
    model, example, dynamic = make_model(seed, family)
    result = CaseResult(seed, backend, "ok", family, describe_model(model))
    result.details["attempt"] = model.fuzz_info["attempt"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = kiln.optimize(model, "cpu-x86", example, dynamic=dynamic, **_options(backend))
    except kiln.VerificationError as exc:
        result.outcome, result.error_type, result.error = "mismatch", type(exc).__name__, _first_line(exc)
    except kiln.KilnError as exc:
        result.outcome, result.error_type, result.error = "kiln_error", type(exc).__name__, _first_line(exc)
        result.details["message"] = str(exc)[:3000]
        cause = exc.__cause__
        if cause is not None:
            result.details["cause"] = f"{type(cause).__name__}: {_first_line(cause, 1000)}"
            root = _root_cause(exc)
            result.details["root_cause"] = f"{type(root).__name__}: {_first_line(root, 1000)}"
    except Exception as exc:  # noqa: BLE001 - any other exception is a kiln bug by definition
        result.outcome, result.error_type, result.error = "crash", type(exc).__name__, _first_line(exc)
        result.details["traceback"] = traceback.format_exc()[-4000:]
    else:
        fresh_batch = _fresh_batch(model)
        fresh = fresh_inputs(model, fresh_batch, seed + 1_000_003)
        result.details["fresh_batch"] = fresh_batch
        try:
            with torch.no_grad():
                want = call(model, fresh)
            got = call(compiled, fresh)
        except kiln.KilnError as exc:  # the compiled model refused an input eager accepts
            result.outcome, result.error_type, result.error = "crash", type(exc).__name__, f"on a fresh input: {_first_line(exc)}"
        except Exception as exc:  # noqa: BLE001
            result.outcome, result.error_type, result.error = "crash", type(exc).__name__, f"on a fresh input: {_first_line(exc)}"
            result.details["traceback"] = traceback.format_exc()[-4000:]
        else:
            problems = compare_outputs(got, want)
            if problems:
                result.outcome, result.error_type = "mismatch", "fresh-input comparison"
                result.error = f"batch {fresh_batch}: " + "; ".join(problems)[:600] if fresh_batch else "; ".join(problems)[:600]
        if result.outcome == "ok" and probes:
            _run_probes(model, compiled, seed, result, campaign)
    result.seconds = time.perf_counter() - start
    return result


def probe_inputs(model, compiled, seed: int, campaign: bool = False) -> list[tuple[str, object, bool]]:
    """(name, inputs, eager_may_refuse) for each probe: integer inputs at their edges and past
    them, NaN/Inf in the float inputs, a batch of one, padded masks (masked family)."""
    info = model.fuzz_info
    base = fresh_inputs(model, None, seed + 2_000_003)
    names = [i.name for i in info["inputs"]]
    ranges = {t.name: t.index_range for t in compiled.input_spec.tensors}
    probes: list[tuple[str, object, bool]] = []

    def replaced(name: str, value: torch.Tensor):
        if isinstance(base, dict):
            return {**base, name: value}
        return tuple(value if n == name else v for n, v in zip(names, base))

    def value_of(name: str) -> torch.Tensor:
        return base[name] if isinstance(base, dict) else base[names.index(name)]

    for spec_info in info["inputs"]:
        current = value_of(spec_info.name)
        if spec_info.is_ids and spec_info.name != "attention_mask":
            high = spec_info.high - 1
            edges = current.clone()
            edges.view(-1)[0], edges.view(-1)[-1] = 0, high
            probes.append((f"{spec_info.name} at 0 and {high}", replaced(spec_info.name, edges), False))
            index_range = ranges.get(spec_info.name)
            if index_range is not None or campaign:
                past = current.clone()
                past.view(-1)[-1] = (index_range[1] if index_range else spec_info.high - 1) + 1
                probes.append((f"{spec_info.name} past its range", replaced(spec_info.name, past), True))
        elif campaign and current.is_floating_point() and current.numel() >= 3:
            odd = current.clone()
            flat = odd.view(-1)
            flat[0], flat[1], flat[2] = float("nan"), float("inf"), float("-inf")
            probes.append((f"{spec_info.name} with NaN and Inf", replaced(spec_info.name, odd), False))
    if info["dynamic"] and info["batch"] != 1:
        probes.append(("batch of one", fresh_inputs(model, 1, seed + 3_000_003), False))
    return probes


def _run_probes(model, compiled, seed: int, result: CaseResult, campaign: bool) -> None:
    for name, inputs, eager_may_refuse in probe_inputs(model, compiled, seed, campaign):
        eager_refused = kiln_refused = None
        try:
            with torch.no_grad():
                want = call(model, inputs)
        except Exception as exc:  # noqa: BLE001 - eager's own refusal (IndexError past a table)
            eager_refused = exc
        try:
            got = call(compiled, inputs)
        except kiln.InputMismatch as exc:
            kiln_refused = exc
        except Exception as exc:  # noqa: BLE001
            result.outcome, result.error_type = "crash", type(exc).__name__
            result.error = f"probe {name}: {_first_line(exc)}"
            result.details["traceback"] = traceback.format_exc()[-4000:]
            return
        if eager_refused is not None or kiln_refused is not None:
            if eager_refused is not None and kiln_refused is not None:
                continue  # both refuse: the compiled model says why, by name
            if kiln_refused is not None:
                result.outcome, result.error_type = "crash", "refused an input eager accepts"
                result.error = f"probe {name}: {_first_line(kiln_refused)}"
            else:
                result.outcome, result.error_type = "crash", "accepted an input eager refuses"
                result.error = f"probe {name}: eager raised {type(eager_refused).__name__}: {_first_line(eager_refused)}"
            return
        problems = compare_outputs(got, want)
        if problems:
            result.outcome, result.error_type = "mismatch", f"probe {name.split(' ', 1)[-1]}"
            result.error = f"probe {name}: " + "; ".join(problems)[:600]
            return
