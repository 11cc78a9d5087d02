"""Placement support: the cost model placement minimises, host measurement, plan rendering."""
