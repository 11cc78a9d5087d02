"""CompileOptions: the only knobs optimize() and the CLI accept, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

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

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["precision"] = self.precision.value
        data["disabled_passes"] = list(self.disabled_passes)
        return data
