"""Artifacts: manifest + engine files, saved as a directory or one zip file."""

from kiln.artifact.load import digest, load

__all__ = ["digest", "load"]
