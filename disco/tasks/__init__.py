"""The tasks DISCO trains and runs (classification, segmentation, detection, super-resolution). Each module
defines one task (objective, how node 0 describes outputs, data, built-in models); disco/tasks/builtin.py
registers them in disco.tasks.registry without importing them (they import torch)."""
from disco.tasks import builtin  # noqa: F401  (registers the built-in tasks)
