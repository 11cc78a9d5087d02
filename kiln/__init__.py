"""kiln: a model compiler for inference. A trained PyTorch model in; a verified engine out."""

from kiln.host import shorten_openmp_spin

shorten_openmp_spin()  # before anything imports torch (kiln.host says why)

from kiln.api import PlannedModel, optimize, plan
from kiln.budget import Budget
from kiln.errors import (ArtifactError, BackendError, BackendUnavailable, CaptureError, InputMismatch, KilnError,
                         OptionsError, PassFailed, ProfileError, UnprovenAccuracyWarning, VerificationError)
from kiln.hardware_profiles.schema import Profile
from kiln.options import CompileOptions
from kiln.pruning import NothingToPrune, PrunedModel, prune, prune_levels
from kiln.runtime.compiled_model import CompiledModel, load
from kiln.sweep import Setting, SweepResult, sweep
from kiln.types import Dim, Precision
from kiln.version import __version__

__all__ = ["optimize", "plan", "sweep", "SweepResult", "Setting", "PlannedModel", "load", "Budget", "CompileOptions", "CompiledModel", "Profile", "Precision", "Dim", "KilnError",
           "CaptureError", "ProfileError", "PassFailed", "BackendUnavailable", "BackendError", "InputMismatch",
           "ArtifactError", "VerificationError", "OptionsError", "UnprovenAccuracyWarning",
           "prune", "prune_levels", "PrunedModel", "NothingToPrune"]
