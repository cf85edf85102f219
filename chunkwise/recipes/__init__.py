"""Recipes: `train`, `eval`, `verify`, the probes, the run directory and atomic checkpoints."""
