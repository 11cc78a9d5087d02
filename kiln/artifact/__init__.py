"""kiln.artifact."""
