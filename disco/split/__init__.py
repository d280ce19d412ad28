"""Splitting a model across nodes: channel assignments, op rules, graph propagation (torch.fx), the split plan
of every channel-mixing layer, simulation layers and masks. `disco.partition()` is the entry point."""
