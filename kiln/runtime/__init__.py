"""Running compiled models."""

from kiln.runtime.compiled_model import CompiledModel, Outputs

__all__ = ["CompiledModel", "Outputs"]
