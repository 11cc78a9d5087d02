"""Structured pruning by magnitude: `prune(model, example_inputs, level)` removes whole
attention heads, FFN neurons and expanded conv channels with the smallest norms from a copy
of the model, slicing the layers into smaller dense ones (no masks: the work goes away on
every backend). Opt-in only; `optimize` never prunes.

Level: the fraction of *prunable* parameters to remove (those owned by the units of the
requested kinds; embeddings, norms outside the units, and the residual width are not
prunable). Each layer loses the same fraction of its units, rounded, keeping at least one:
ranking per layer rather than globally, because without retraining a global ranking compares
norms of layers whose scales differ (LayerNorm- and BatchNorm-scaled weights) and empties the
layers with small weights first, which breaks the model long before the level says it should.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from kiln.errors import KilnError, OptionsError
from kiln.pruning.units import KINDS, LOOKS_FOR, UnitGroup, find_units

FineTune = Callable[[nn.Module], None]


class NothingToPrune(KilnError):
    """The model has none of the structures kiln prunes."""


class PruneFailed(KilnError):
    """The pruned model no longer runs on the example inputs."""


@dataclass
class PrunedModel:
    model: nn.Module  # a new module; the user's model is untouched
    level: float  # requested fraction of prunable parameters removed
    removed: dict[str, int]  # units removed per kind, totals
    per_layer: list[tuple[str, str, int, int]]  # (layer path, kind, kept, total)
    parameters_before: int
    parameters_after: int
    prunable_before: int = 0  # parameters the units of the requested kinds own
    prunable_removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # near-misses: (path, why not pruned)

    @property
    def fraction_removed(self) -> float:
        """The fraction of prunable parameters actually removed (per-layer rounding moves it off `level`)."""
        return self.prunable_removed / self.prunable_before if self.prunable_before else 0.0

    def describe(self) -> str:
        removed = ", ".join(f"{n} {kind}" for kind, n in self.removed.items()) or "nothing"
        lines = [f"pruned level {self.level:.2f}: removed {removed}",
                 f"prunable parameters {self.prunable_before:,} -> {self.prunable_before - self.prunable_removed:,} "
                 f"({self.fraction_removed:.1%} removed)",
                 f"model parameters {self.parameters_before:,} -> {self.parameters_after:,} "
                 f"({1 - self.parameters_after / max(self.parameters_before, 1):.1%} fewer)"]
        for kind in self.removed:
            rows = [(k, t) for _, kd, k, t in self.per_layer if kd == kind]
            lines.append(f"  {kind}: {len(rows)} layers, kept {sum(k for k, _ in rows)} of {sum(t for _, t in rows)}"
                         f" (per layer {min(k for k, _ in rows)}..{max(k for k, _ in rows)})")
        lines += [f"  not pruned: {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "fraction_removed": self.fraction_removed, "removed": dict(self.removed),
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "prunable_before": self.prunable_before, "prunable_removed": self.prunable_removed,
                "per_layer": [list(row) for row in self.per_layer], "skipped": [list(s) for s in self.skipped]}


def prune(model: nn.Module, example_inputs: Any, level: float = 0.3, *, parts: Sequence[str] = KINDS,
          fine_tune: FineTune | None = None) -> PrunedModel:
    """A pruned copy of `model` with `level` of its prunable parameters removed, layer by layer.

    `example_inputs` (a tuple of positional inputs, or one tensor) are run through the pruned
    copy to check it still works. `fine_tune(model)`, if given, is called on the pruned copy
    before it is returned (e.g. a few steps of training to recover accuracy)."""
    return prune_levels(model, example_inputs, [level], parts=parts, fine_tune=fine_tune)[0]


def prune_levels(model: nn.Module, example_inputs: Any, levels: Sequence[float], *, parts: Sequence[str] = KINDS,
                 fine_tune: FineTune | None = None) -> list[PrunedModel]:
    """Pruned copies at increasing `levels`, progressively: each level prunes the previous
    level's (fine-tuned) copy further, so `fine_tune` runs between levels. Without `fine_tune`
    each result equals `prune(model, ..., level)` (the magnitude order is the same)."""
    kinds = _check_parts(parts)
    for level in levels:
        _check_level(level)
    if list(levels) != sorted(levels):
        raise OptionsError(f"levels {list(levels)} are not increasing", where="prune_levels(levels=...)",
                           fix="list the levels from least to most pruned, e.g. [0.1, 0.3, 0.5]")
    found = find_units(model, kinds)
    if not found.groups:
        looked = "; ".join(f"{k}: {LOOKS_FOR[k]}" for k in kinds)
        near = "".join(f"\n  near miss {p}: {why}" for p, why in found.skipped)
        raise NothingToPrune(f"no prunable structure in {type(model).__name__} (looked for {looked}){near}",
                             where="prune(parts=...)",
                             fix="prune a model with these layouts, or ask for other parts")
    before = _parameter_count(model)
    current, results = model, []
    for level in levels:
        current = copy.deepcopy(current)
        kept = _prune_groups(current, found.groups, level)
        if fine_tune is not None:
            fine_tune(current)
        _check_runs(current, example_inputs, level)
        results.append(_result(current, level, found, kept, before))
    return results


def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = [p.strip() for p in parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in KINDS]
    if unknown or not parts:
        raise OptionsError(f"unknown prune parts {unknown or list(parts)}", where="prune(parts=...)",
                           fix=f"choose from {', '.join(KINDS)}")
    return tuple(p for p in KINDS if p in parts)


def _check_level(level: Any) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level < 1.0:
        raise OptionsError(f"prune level {level!r} is not a fraction in [0, 1)", where="prune(level=...)",
                           fix="give the fraction of prunable parameters to remove, e.g. 0.3 (at least one "
                               "head, neuron or channel per layer always stays)")


def _units_to_keep(total: int, level: float) -> int:
    return max(1, total - int(level * total + 0.5))


@torch.no_grad()
def _prune_groups(model: nn.Module, groups: list[UnitGroup], level: float) -> dict[str, int]:
    """Decide every group's kept units on the unmodified weights, then rewrite: a group's
    rewrite can touch a tensor another group scores (an output projection, say)."""
    decisions = []
    kept_now: dict[str, int] = {}
    for group in groups:
        scores = group.score(model)
        keep = _units_to_keep(group.units, level)
        # The strongest `keep` units, in their original order so the layer's layout is kept.
        chosen = torch.sort(torch.topk(scores, min(keep, len(scores)), largest=True, sorted=False).indices).values
        decisions.append((group, chosen, len(scores)))
        kept_now[group.path + ":" + group.kind] = len(chosen)
    for group, chosen, present in decisions:
        if len(chosen) < present:
            group.keep(model, chosen)
    return kept_now


def _check_runs(model: nn.Module, example_inputs: Any, level: float) -> None:
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        with torch.no_grad():
            model(*args)
    except Exception as exc:
        raise PruneFailed(f"the model pruned at level {level} fails on the example inputs: {type(exc).__name__}: {exc}",
                          where="prune", fix="prune fewer parts (parts=...) and report the layout to kiln") from exc


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _result(model: nn.Module, level: float, found, kept: dict[str, int], before: int) -> PrunedModel:
    removed: dict[str, int] = {}
    per_layer, prunable, prunable_removed = [], 0, 0
    for group in found.groups:
        n = kept[group.path + ":" + group.kind]
        per_layer.append((group.path, group.kind, n, group.units))
        removed[group.kind] = removed.get(group.kind, 0) + group.units - n
        prunable += group.units * group.params_per_unit
        prunable_removed += (group.units - n) * group.params_per_unit
    removed = {kind: removed[kind] for kind in KINDS if kind in removed}
    return PrunedModel(model=model, level=level, removed=removed, per_layer=per_layer, parameters_before=before,
                       parameters_after=_parameter_count(model), prunable_before=prunable,
                       prunable_removed=prunable_removed, skipped=list(found.skipped))
