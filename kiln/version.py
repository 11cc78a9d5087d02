"""kiln's version, in a module nothing else has to be imported for (manifests and cache keys read it)."""

__version__ = "0.1.0"
