"""The settings a sweep builds, one per point on its curve, and their text form.

    fp32                  every layer at fp32
    auto                  precision="auto" on kiln's default (tight) budget
    auto:0.995            precision="auto" on Budget(min_cosine=0.995)
    int8 / bf16:0.99      every layer at that precision (verified on the default budget, or the given cosine)
    auto:0.99+prune=0.3   any of the above on the model pruned by kiln.prune at level 0.3 first
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from kiln.budget import Budget
from kiln.errors import OptionsError
from kiln.types import Precision

AUTO = "auto"
# fp32 down to min_cosine 0.99: the curve a user starts from when nothing else is said
DEFAULT_SETTINGS: tuple[str, ...] = ("fp32", "auto", "auto:0.999", "auto:0.995", "auto:0.99")
_FORM = "PRECISION[:MIN_COSINE][+prune=LEVEL], e.g. fp32, auto, auto:0.995, int8:0.99, fp32+prune=0.3"


@dataclass(frozen=True)
class Setting:
    """One point's build: a precision ("auto" or one of kiln.Precision's values), the accuracy
    budget's cosine (None: kiln's default budget) and a pruning level (None: not pruned)."""

    precision: str = "fp32"
    min_cosine: float | None = None
    prune_level: float | None = None

    def __post_init__(self) -> None:
        known = (AUTO, *(p.value for p in Precision))
        if self.precision not in known:
            close = difflib.get_close_matches(str(self.precision), known, n=1)
            raise OptionsError(f"unknown precision {self.precision!r} in a sweep setting", where="sweep.settings",
                               fix=(f"did you mean {close[0]!r}? " if close else "") + f"write {_FORM}")
        if self.min_cosine is not None:
            Budget(min_cosine=self.min_cosine)  # its own check, its own message
            if self.precision == "fp32":
                raise OptionsError("an fp32 setting with a cosine budget: fp32 spends no accuracy", where="sweep.settings",
                                   fix="write fp32, or auto:COSINE to let kiln lower layers within that budget")
        if self.prune_level is not None and not (isinstance(self.prune_level, (int, float))
                                                 and not isinstance(self.prune_level, bool) and 0 < self.prune_level < 1):
            raise OptionsError(f"pruning level must be a fraction in (0, 1), got {self.prune_level!r}", where="sweep.settings",
                               fix="e.g. fp32+prune=0.3 removes 30% of the prunable parameters")

    @classmethod
    def parse(cls, text: str | "Setting") -> "Setting":
        if isinstance(text, Setting):
            return text
        if not isinstance(text, str) or not text.strip():
            raise OptionsError(f"empty or non-text sweep setting {text!r}", where="sweep.settings", fix=f"write {_FORM}")
        build, _, prune = text.strip().partition("+")
        precision, _, cosine = build.partition(":")
        try:
            min_cosine = float(cosine) if cosine else None
            level = None
            if prune:
                key, _, value = prune.partition("=")
                if key.strip() != "prune" or not value:
                    raise ValueError(f"{prune!r} is not prune=LEVEL")
                level = float(value)
        except ValueError as exc:
            raise OptionsError(f"cannot read sweep setting {text!r} ({exc})", where="sweep.settings", fix=f"write {_FORM}") from None
        precision = precision.strip().lower()
        try:
            precision = precision if precision == AUTO else Precision.parse(precision).value  # int4-weight -> int4
        except ValueError:
            pass  # __post_init__ names it with the closest known precision
        return cls(precision, min_cosine, level)

    @property
    def budget(self) -> Budget:
        return Budget() if self.min_cosine is None else Budget(min_cosine=self.min_cosine)

    @property
    def label(self) -> str:
        """For people: "auto cos>=0.995", "fp32 pruned 30%"."""
        text = self.precision + (f" cos>={self.min_cosine:g}" if self.min_cosine is not None else "")
        if self.precision == AUTO and self.min_cosine is None:
            text += " (default budget)"
        return text + (f" pruned {self.prune_level:.0%}" if self.prune_level is not None else "")

    @property
    def slug(self) -> str:
        """For file names: "auto-cos0.995", "fp32-prune0.3"."""
        text = self.precision + (f"-cos{self.min_cosine:g}" if self.min_cosine is not None else "")
        return text + (f"-prune{self.prune_level:g}" if self.prune_level is not None else "")

    def text(self) -> str:
        """The form `parse` reads back."""
        text = self.precision + (f":{self.min_cosine:g}" if self.min_cosine is not None else "")
        return text + (f"+prune={self.prune_level:g}" if self.prune_level is not None else "")

    def option_overrides(self) -> dict:
        """CompileOptions fields this point sets on top of the sweep's own options."""
        return {"precision": self.precision, "accuracy_budget": self.budget}


def parse_settings(settings) -> tuple[Setting, ...]:
    """Settings from a comma-separated string or a sequence of strings and Settings; refuses
    none at all and the same setting twice (two points of one build would only repeat it)."""
    if settings is None:
        settings = DEFAULT_SETTINGS
    items = [s for s in settings.split(",") if s.strip()] if isinstance(settings, str) else list(settings)
    if not items:
        raise OptionsError("a sweep needs at least one setting", where="sweep.settings",
                           fix=f"e.g. {','.join(DEFAULT_SETTINGS)} (the default when none is given)")
    parsed = tuple(Setting.parse(item) for item in items)
    seen: set[Setting] = set()
    for setting in parsed:
        if setting in seen:
            raise OptionsError(f"setting {setting.text()!r} appears twice", where="sweep.settings",
                               fix="give each setting once: each point is built and timed once")
        seen.add(setting)
    return parsed
