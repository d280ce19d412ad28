"""Splitting a model across nodes: channel assignments, op rules, graph propagation (torch.fx), the split plan
of every channel-mixing layer, simulation layers and masks. `disco.partition()` is the entry point.

The way through: capture.py (the model as a graph) -> ops.py (the rule of each operation) -> propagate.py (runs
the graph with an owner map beside every value, calling rules/ for each operation; reassign.py re-assigns a layer
instead of moving data; needs.py finds which node reads each element of the model's own tensors) -> analysis.py
(what a run finds) -> plan.py, layers.py, partitioner.py (the split model). Owner maps: assignment.py, layouts.py.
"""
