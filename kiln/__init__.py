"""kiln: a model compiler for inference. A trained PyTorch model in; a verified engine out."""

__version__ = "0.1.0"
