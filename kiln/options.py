"""CompileOptions: the only knobs optimize() and the CLI accept, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Mapping

from kiln.errors import OptionsError
from kiln.types import Precision


@dataclass(frozen=True)
class CompileOptions:
    backend: str | None = None  # force one backend instead of the profile's preference
    select: str | None = None  # "prefer" | "measure"; None takes the profile's
    precision: Precision = Precision.FP32
    allow_fallback: bool = False  # in "prefer" mode, a failed build moves on (recorded) instead of raising
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
    autotune: bool = False  # let backends benchmark kernel variants while building (Inductor max-autotune): slower builds, faster engines
    # {module path prefix or node name: device}: placement puts those nodes there, whatever it costs
    pin: Mapping[str, str] = field(default_factory=dict)
    eager_fallback: bool = True  # ops no backend supports run eagerly in PyTorch on the host (reported)

    def __post_init__(self) -> None:
        if isinstance(self.precision, str):
            try:
                object.__setattr__(self, "precision", Precision.parse(self.precision))
            except ValueError as exc:
                raise OptionsError(str(exc), where="options.precision", fix="use fp32") from None
        if self.precision is not Precision.FP32:
            raise OptionsError(f"precision {self.precision.value!r} is not available in this version of kiln",
                               where="options.precision", fix="use precision='fp32'")
        if self.select not in (None, "prefer", "measure"):
            raise OptionsError(f"unknown selection mode {self.select!r}", where="options.select", fix="use 'prefer' or 'measure'")
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
        for name in ("build_timeout_s", "cache_max_gb"):
            if getattr(self, name) <= 0:
                raise OptionsError(f"{name} must be positive, got {getattr(self, name)!r}", where=f"options.{name}", fix="use a positive number")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise OptionsError(f"time_budget_s must be positive, got {self.time_budget_s!r}", where="options.time_budget_s", fix="use seconds > 0 or None")
        if self.build_memory_mb is not None and (not isinstance(self.build_memory_mb, int) or self.build_memory_mb < 64):
            raise OptionsError(f"build_memory_mb must be an int >= 64, got {self.build_memory_mb!r}", where="options.build_memory_mb", fix="use megabytes, e.g. 8192")

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
                        "build_timeout_s", "build_memory_mb")

    def cache_fields(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_IN_CACHE_KEY}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["precision"] = self.precision.value
        data["disabled_passes"] = list(self.disabled_passes)
        data["pin"] = dict(sorted(self.pin.items()))
        return data
