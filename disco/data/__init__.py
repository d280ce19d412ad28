"""Data for every task (disco.tasks.data picks the source; datasets, scenes, annotated and superres read it).
Nothing is imported here: `disco.data.X` modules import torch, and importing this package must not."""
