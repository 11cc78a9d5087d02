"""Graph passes: one per module; the order lives in pipeline.py."""
