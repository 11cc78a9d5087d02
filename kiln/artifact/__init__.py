"""Artifacts: manifest + engine files, saved as a directory or one zip file."""

from kiln.artifact.load import load

__all__ = ["load"]
