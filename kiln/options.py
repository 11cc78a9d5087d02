"""CompileOptions: the only knobs optimize() and the CLI accept, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from kiln.budget import Budget
from kiln.errors import OptionsError
from kiln.types import SPARSITY_PATTERNS, Auto, Precision

OBSERVERS = ("minmax", "percentile", "mse")
# How much building a compile may spend to find the fastest engine (like a builder optimization
# level): "fast" builds the one candidate predicted to win; "default" builds only the candidates
# that could still win (what this host measured before rules the others out); "max" builds and
# times every candidate, with autotuning.
EFFORTS = ("fast", "default", "max")
INT4_GROUP_SIZES = (32, 64, 128)
# The form mixture-of-experts blocks are captured in (kiln.frontend.moe): "dispatch" runs each
# expert on its own tokens in PyTorch (one kiln::moe_experts node, in the eager partition on the
# host CPU); "blocked" keeps about the per-expert loop's FLOPs (runs padded to whole blocks) and
# "dense" runs every expert on every token, both in plain matmuls any backend takes; "auto":
# dispatch on a CPU profile, else blocked, else dense, each where it agrees with the block.
MOE_FORMS = ("auto", "dispatch", "blocked", "dense")


@dataclass(frozen=True)
class CompileOptions:
    backend: str | None = None  # force one backend instead of the profile's preference
    select: str | None = None  # "prefer" | "measure"; None takes the profile's
    effort: str = "default"  # "fast" | "default" | "max": how many candidates are built (EFFORTS)
    # "auto": per layer, the cheapest precision the device runs that keeps accuracy_budget;
    # or one of fp32, bf16, fp16, int8, int4-weight, fp8 for every layer that can take it.
    precision: Precision | Auto = Auto.AUTO
    accuracy_budget: Budget = Budget()
    calibration: Any = None  # iterable of example inputs (each like example_inputs); read once, here
    calibration_limit: int = 64  # at most this many calibration samples are read
    # module path prefixes or node names whose linear/conv layers stay fp32 whatever the precision
    # (a head the user's metric is sensitive to); the plan spends the budget on the other layers
    keep_fp32: tuple[str, ...] = field(default=())
    calibration_observer: str = "minmax"  # activation ranges for static int8: minmax | percentile | mse
    int4_group_size: int = 128  # weights per scale for int4 weight-only: 32, 64 or 128
    # "2:4": prune the linear/conv layers that keep accuracy_budget to 2 of every 4 weights, for
    # devices with sparse tensor cores (opt-in: it changes answers, like a lower precision)
    sparsity: str | None = None
    # in "prefer" mode, a backend whose build fails or disagrees with eager makes way for the next
    # one the device lists (recorded) instead of raising
    backend_fallback: bool = False
    verify: bool = True
    verify_draws: int = 2  # fresh random inputs checked besides the example inputs
    seed: int = 0
    measure_seconds: float = 1.0  # timing budget per candidate when measuring
    threads: int | None = None  # intra-op threads; None: the profile's cores, capped by this machine's
    disabled_passes: tuple[str, ...] = field(default=())
    # False skips kiln's fusion passes and its lowering into fused backend ops (each runtime's
    # own built-in optimizer still runs): the baseline that shows what fusion buys.
    fusion: bool = True
    cache: bool = True  # reuse a finished build of the same graph, weights, spec, profile and options
    cache_dir: str | None = None  # None: the user's cache directory (~/.cache/kiln)
    cache_max_gb: float = 4.0  # least recently used entries are evicted past this size
    isolate: bool | None = None  # build candidates in child processes; None: when measuring several
    build_timeout_s: float = 900.0  # per isolated candidate build (and its first verification)
    build_memory_mb: int | None = None  # address-space cap per isolated build; None: no cap
    time_budget_s: float | None = None  # for the whole optimize(); candidates past it are skipped, recorded
    # let backends benchmark kernel variants while building (Inductor max-autotune): slower builds,
    # faster engines; None: only at effort="max"
    autotune: bool | None = None
    # {module path prefix or node name: device}: placement puts those nodes there, whatever it costs
    pin: Mapping[str, str] = field(default_factory=dict)
    eager_fallback: bool = True  # ops no backend supports run eagerly in PyTorch on the host (reported)
    # precision="auto": when no backend builds the lowered plan within the budget, build the model
    # at fp32 (reported) instead of failing
    fp32_fallback: bool = True
    # precision="auto": build fp32 too, time both here and keep the lowered plan only if it is
    # faster; None: when the profile measures backends (its `select: measure`), but not at effort="fast"
    time_against_fp32: bool | None = None
    # progress lines on stderr for a compile from Python; None: when stderr is a terminal and the
    # program configured no logging (then the "kiln" logger is the place to read them)
    progress: bool | None = None
    allow_fallback: bool | None = None  # the old name of backend_fallback, read for one more release
    moe_form: str = "auto"  # mixture-of-experts blocks: "auto" | "dispatch" | "blocked" | "dense" (MOE_FORMS)

    def __post_init__(self) -> None:
        self._read_old_names()
        self._check_precision()
        if self.select not in (None, "prefer", "measure"):
            raise OptionsError(f"unknown selection mode {self.select!r}", where="options.select", fix="use 'prefer' or 'measure'")
        if self.effort not in EFFORTS:
            close = difflib.get_close_matches(str(self.effort), EFFORTS, n=1)
            raise OptionsError(f"unknown effort {self.effort!r}", where="options.effort",
                               fix=f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(EFFORTS)}")
        if not isinstance(self.verify_draws, int) or self.verify_draws < 0:
            raise OptionsError(f"verify_draws must be a non-negative int, got {self.verify_draws!r}", where="options.verify_draws", fix="use 0 or more")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise OptionsError(f"threads must be a positive int, got {self.threads!r}", where="options.threads", fix="use 1 or more, or None")
        if self.measure_seconds <= 0:
            raise OptionsError(f"measure_seconds must be positive, got {self.measure_seconds!r}", where="options.measure_seconds", fix="use e.g. 1.0")
        object.__setattr__(self, "disabled_passes", tuple(self.disabled_passes))
        if not isinstance(self.pin, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.pin.items()):
            raise OptionsError(f"pin must map module paths or node names to device names, got {self.pin!r}", where="options.pin",
                               fix='e.g. pin={"classifier": "cpu"}')
        object.__setattr__(self, "pin", dict(self.pin))
        keep = (self.keep_fp32,) if isinstance(self.keep_fp32, str) else self.keep_fp32
        if not isinstance(keep, (tuple, list)) or not all(isinstance(k, str) and k for k in keep):
            raise OptionsError(f"keep_fp32 must be module paths or node names, got {self.keep_fp32!r}", where="options.keep_fp32",
                               fix='e.g. keep_fp32=("classifier",)')
        object.__setattr__(self, "keep_fp32", tuple(keep))
        for name in ("build_timeout_s", "cache_max_gb"):
            if getattr(self, name) <= 0:
                raise OptionsError(f"{name} must be positive, got {getattr(self, name)!r}", where=f"options.{name}", fix="use a positive number")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise OptionsError(f"time_budget_s must be positive, got {self.time_budget_s!r}", where="options.time_budget_s", fix="use seconds > 0 or None")
        if self.build_memory_mb is not None and (not isinstance(self.build_memory_mb, int) or self.build_memory_mb < 64):
            raise OptionsError(f"build_memory_mb must be an int >= 64, got {self.build_memory_mb!r}", where="options.build_memory_mb", fix="use megabytes, e.g. 8192")

    def _read_old_names(self) -> None:
        if self.allow_fallback is not None:
            warnings.warn("CompileOptions(allow_fallback=...) is now backend_fallback=... (it names which fallback: to the "
                          "next backend; eager_fallback and fp32_fallback name the others); the old name goes in the next release",
                          DeprecationWarning, stacklevel=4)
            object.__setattr__(self, "backend_fallback", bool(self.allow_fallback))
            object.__setattr__(self, "allow_fallback", None)
        if self.select == "prefer" and self.time_against_fp32 is None and self.precision in (Auto.AUTO, "auto"):
            warnings.warn("select='prefer' chooses backends by preference; it also turned off precision='auto''s timing "
                          "against fp32, a second meaning that goes in the next release: pass time_against_fp32=False for that",
                          DeprecationWarning, stacklevel=4)
            object.__setattr__(self, "time_against_fp32", False)

    def backends_for(self, device) -> tuple[str, ...]:
        """The backends tried on `device`: the forced one, else the device's own list, in order."""
        return (self.backend,) if self.backend else tuple(device.backends)

    @property
    def autotunes(self) -> bool:
        """Whether backends search kernel variants at build time: asked for, or effort="max"."""
        return self.autotune if self.autotune is not None else self.effort == "max"

    def times_against_fp32(self, profile_select: str) -> bool:
        """Whether precision="auto" times its lowered plan against fp32 on a profile selecting so:
        by default when the profile measures backends, except at effort="fast" (one build)."""
        if self.time_against_fp32 is not None:
            return self.time_against_fp32
        return profile_select == "measure" and self.effort != "fast"

    def _check_precision(self) -> None:
        if isinstance(self.precision, str):
            if self.precision.lower() == "auto":
                object.__setattr__(self, "precision", Auto.AUTO)
            else:
                try:
                    object.__setattr__(self, "precision", Precision.parse(self.precision))
                except ValueError as exc:
                    raise OptionsError(str(exc), where="options.precision", fix="use 'auto', or e.g. 'fp32' or 'bf16'") from None
        if not isinstance(self.precision, (Precision, Auto)):
            raise OptionsError(f"precision must be a string or kiln.Precision, got {type(self.precision).__name__}",
                               where="options.precision", fix="use 'auto', or e.g. 'fp32' or 'bf16'")
        if self.precision is Precision.TF32:
            raise OptionsError("tf32 is a GPU math mode kiln does not assign per layer", where="options.precision",
                               fix="use 'fp32', 'bf16' or 'auto'")
        if not isinstance(self.accuracy_budget, Budget):
            raise OptionsError(f"accuracy_budget must be a kiln.Budget, got {type(self.accuracy_budget).__name__}",
                               where="options.accuracy_budget", fix="use kiln.Budget(min_cosine=0.999) or kiln.Budget(max_rel_error=0.02)")
        if self.moe_form not in MOE_FORMS:
            raise OptionsError(f"unknown mixture-of-experts form {self.moe_form!r}", where="options.moe_form",
                               fix=f"use one of {', '.join(MOE_FORMS)}")
        if self.calibration_observer not in OBSERVERS:
            raise OptionsError(f"unknown calibration observer {self.calibration_observer!r}", where="options.calibration_observer",
                               fix=f"use one of {', '.join(OBSERVERS)}")
        if self.int4_group_size not in INT4_GROUP_SIZES:
            raise OptionsError(f"int4_group_size must be one of {INT4_GROUP_SIZES}, got {self.int4_group_size!r}",
                               where="options.int4_group_size", fix="use 32, 64 or 128")
        if isinstance(self.calibration_limit, bool) or not isinstance(self.calibration_limit, int) or self.calibration_limit < 1:
            raise OptionsError(f"calibration_limit must be a positive int, got {self.calibration_limit!r}",
                               where="options.calibration_limit", fix="use e.g. 64")
        object.__setattr__(self, "calibration", _read_calibration(self.calibration, self.calibration_limit))
        if self.sparsity is not None and self.sparsity not in SPARSITY_PATTERNS:
            close = difflib.get_close_matches(str(self.sparsity), SPARSITY_PATTERNS, n=1)
            raise OptionsError(f"unknown sparsity pattern {self.sparsity!r}", where="options.sparsity",
                               fix=f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(SPARSITY_PATTERNS)}, or None")

    @property
    def auto(self) -> bool:
        return self.precision is Auto.AUTO

    @classmethod
    def build(cls, base: "CompileOptions | None" = None, **overrides) -> "CompileOptions":
        """`base` with `overrides` applied; an unknown name is an error with a close match."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(names)}"
                raise OptionsError(f"unknown option {key!r}", where="optimize()", fix=hint)
        return dataclasses.replace(base or cls(), **overrides)

    # Fields that change how kiln builds, not what it builds; left out of the cache key.
    NOT_IN_CACHE_KEY = ("verify", "verify_draws", "seed", "cache", "cache_dir", "cache_max_gb", "isolate",
                        "build_timeout_s", "build_memory_mb", "allow_fallback", "progress")

    def cache_fields(self) -> dict:
        """The options that shape the build; calibration and the metric's dataset by content."""
        data = {k: v for k, v in self.to_dict().items() if k not in self.NOT_IN_CACHE_KEY}
        data["calibration"] = None if self.calibration is None else content_digest(self.calibration)
        if self.accuracy_budget.dataset is not None:
            data["accuracy_budget"]["dataset"] = content_digest(self.accuracy_budget.dataset)
        return data

    def cache_bypass_reason(self) -> str | None:
        """Why a build with these options cannot be cached, or None."""
        if self.accuracy_budget.metric is not None:
            return "the accuracy budget has a metric function, whose behaviour kiln cannot hash; the compile cache was bypassed"
        return None

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["precision"] = self.precision.value
        data["disabled_passes"] = list(self.disabled_passes)
        data["pin"] = dict(sorted(self.pin.items()))
        data["keep_fp32"] = sorted(self.keep_fp32)
        data["accuracy_budget"] = self.accuracy_budget.to_dict()
        data["calibration"] = None if self.calibration is None else f"{len(self.calibration)} samples"
        return data


def _read_calibration(calibration: Any, limit: int) -> tuple | None:
    """Materialise at most `limit` samples: an iterator is consumed once, at option time."""
    if calibration is None or (isinstance(calibration, tuple) and len(calibration) <= limit and calibration):
        return calibration
    if isinstance(calibration, torch.Tensor):
        raise OptionsError("calibration is a single tensor; kiln needs an iterable of example inputs",
                           where="options.calibration", fix="pass a list of inputs, e.g. calibration=[x1, x2, ...], or a DataLoader")
    try:
        iterator = iter(calibration)
    except TypeError:
        raise OptionsError(f"calibration must be an iterable of example inputs, got {type(calibration).__name__}",
                           where="options.calibration", fix="pass a list of inputs or a DataLoader yielding them") from None
    samples = []
    for sample in iterator:
        samples.append(sample)
        if len(samples) >= limit:
            break
    if not samples:
        raise OptionsError("calibration yielded no samples", where="options.calibration",
                           fix="pass a non-empty iterable, or leave calibration out")
    return tuple(samples)


def content_digest(value: Any) -> str:
    """sha256 over tensors' bytes, shapes and dtypes and other leaves' reprs, in order."""
    import torch.utils._pytree as pytree

    digest = hashlib.sha256()
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().contiguous().cpu()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()
