"""Budget: how much accuracy a user lets kiln spend on lower precisions.

A budget holds any of three limits, each checked per output and per example the model is
verified on, each row of a batched output on its own (the worst case counts, not the average):

- `min_cosine`: cosine similarity between kiln's output and eager PyTorch's;
- `max_rel_error`: relative L2 error ||got - eager|| / ||eager||;
- `metric` + `dataset`: the user's own score, `metric(predict, dataset) -> float` (higher is
  better); the compiled model may lose at most `max_metric_drop` of eager's score.

`Budget()` with no limit set is kiln's default, the tight budget: cosine >= 0.9999 and
relative error <= 1e-2, which only float types that round like bf16 or fp16 usually meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kiln.errors import OptionsError

DEFAULT_MIN_COSINE = 0.9999
DEFAULT_MAX_REL_ERROR = 1e-2


@dataclass(frozen=True)
class Budget:
    min_cosine: float | None = None
    max_rel_error: float | None = None
    metric: Callable[[Callable, Any], float] | None = None
    dataset: Any = None  # an iterable of example inputs for `metric`; consumed once
    max_metric_drop: float = 0.01

    def __post_init__(self) -> None:
        if self.min_cosine is None and self.max_rel_error is None and self.metric is None:
            object.__setattr__(self, "min_cosine", DEFAULT_MIN_COSINE)
            object.__setattr__(self, "max_rel_error", DEFAULT_MAX_REL_ERROR)
        if self.min_cosine is not None and not (_number(self.min_cosine) and -1 <= self.min_cosine <= 1):
            raise OptionsError(f"min_cosine must be a number in [-1, 1], got {self.min_cosine!r}",
                               where="accuracy_budget.min_cosine", fix="use e.g. Budget(min_cosine=0.999)")
        if self.max_rel_error is not None and not (_number(self.max_rel_error) and self.max_rel_error > 0):
            raise OptionsError(f"max_rel_error must be a positive number, got {self.max_rel_error!r}",
                               where="accuracy_budget.max_rel_error", fix="use e.g. Budget(max_rel_error=0.02)")
        if (self.metric is None) != (self.dataset is None):
            given, missing = ("metric", "dataset") if self.metric is not None else ("dataset", "metric")
            raise OptionsError(f"{given} was given without {missing}", where=f"accuracy_budget.{missing}",
                               fix="pass both: Budget(metric=fn, dataset=iterable of inputs); fn(predict, dataset) -> score")
        if self.metric is not None and not callable(self.metric):
            raise OptionsError(f"metric must be callable, got {type(self.metric).__name__}", where="accuracy_budget.metric",
                               fix="pass a function metric(predict, dataset) -> float, higher is better")
        if not (_number(self.max_metric_drop) and self.max_metric_drop >= 0):
            raise OptionsError(f"max_metric_drop must be a non-negative number, got {self.max_metric_drop!r}",
                               where="accuracy_budget.max_metric_drop", fix="use e.g. 0.01 (one point of accuracy)")
        if self.dataset is not None and not isinstance(self.dataset, tuple):
            try:
                object.__setattr__(self, "dataset", tuple(self.dataset))  # an iterator is read once, here
            except TypeError:
                raise OptionsError(f"dataset must be iterable, got {type(self.dataset).__name__}",
                                   where="accuracy_budget.dataset", fix="pass a list or a DataLoader of model inputs") from None

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.max_rel_error is not None:
            parts.append(f"relative L2 error <= {self.max_rel_error:g}")
        if self.metric is not None:
            parts.append(f"{getattr(self.metric, '__name__', 'metric')} drop <= {self.max_metric_drop:g}")
        return " and ".join(parts)

    def allows(self, cosine: float, rel_error: float, metric_drop: float | None = None) -> bool:
        if self.min_cosine is not None and not cosine >= self.min_cosine:
            return False
        if self.max_rel_error is not None and not rel_error <= self.max_rel_error:
            return False
        if self.metric is not None and metric_drop is not None and not metric_drop <= self.max_metric_drop:
            return False
        return True

    def tightened(self, fraction: float, cosine_fraction: float | None = None) -> "Budget":
        """The same budget with only `fraction` of each allowance: the error 1 - cosine (or
        `cosine_fraction` of it), the relative error and the metric drop. Planning spends this
        much, leaving headroom for inputs the plan was not measured on."""
        cosine_fraction = fraction if cosine_fraction is None else cosine_fraction
        return Budget(None if self.min_cosine is None else 1 - (1 - self.min_cosine) * cosine_fraction,
                      None if self.max_rel_error is None else self.max_rel_error * fraction,
                      self.metric, self.dataset, self.max_metric_drop * fraction)

    def to_dict(self) -> dict:
        """JSON-safe; the metric by name and the dataset by size (see CompileOptions.cache_fields)."""
        return {"min_cosine": self.min_cosine, "max_rel_error": self.max_rel_error,
                "metric": None if self.metric is None else getattr(self.metric, "__qualname__", repr(self.metric)),
                "dataset": None if self.dataset is None else len(self.dataset), "max_metric_drop": self.max_metric_drop}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
