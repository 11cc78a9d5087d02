"""Running compiled models, and loading them from artifacts."""

from kiln.runtime.compiled_model import CompiledModel, Outputs, load

__all__ = ["CompiledModel", "Outputs", "load"]
