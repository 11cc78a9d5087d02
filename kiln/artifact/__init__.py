"""Artifacts: manifest + engine files, saved as a directory or one zip file."""

from kiln.artifact.load import LoadedArtifact, digest, read
from kiln.artifact.save import save

__all__ = ["LoadedArtifact", "digest", "read", "save"]
