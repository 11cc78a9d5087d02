"""Artifacts: manifest + engine files, saved as a directory or one zip file."""

from kiln.artifact.load import LoadedArtifact, digest, read
from kiln.artifact.save import check_target, save

__all__ = ["LoadedArtifact", "check_target", "digest", "read", "save"]
