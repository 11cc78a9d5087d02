"""Precision assignment: numeric schemes, calibration observers, sensitivity analysis, plans."""
