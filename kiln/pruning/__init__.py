"""Structured pruning by magnitude (opt-in; `kiln.optimize` never prunes): `kiln.prune` and
`kiln.prune_levels` return smaller dense copies of a model. See magnitude.py for the level's
meaning and units.py for the structures recognised."""

from kiln.pruning.magnitude import NothingToPrune, PruneFailed, PrunedModel, prune, prune_levels
from kiln.pruning.units import KINDS

__all__ = ["prune", "prune_levels", "PrunedModel", "NothingToPrune", "PruneFailed", "KINDS"]
