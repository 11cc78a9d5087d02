"""Artifacts: manifest + engine files, saved as a directory or one zip file."""

from kiln.artifact.load import ArtifactDescription, LoadedArtifact, describe, digest, read
from kiln.artifact.save import check_target, save

__all__ = ["ArtifactDescription", "LoadedArtifact", "check_target", "describe", "digest", "read", "save"]
