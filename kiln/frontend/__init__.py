"""kiln.frontend."""
