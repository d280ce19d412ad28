"""DISCO: Distributed Inference with Sparse Communications.

The names below are loaded on first use (PEP 562), so that `disco --help`, the launcher of `disco run` and
any light import of a submodule do not pay for torch.fx, torchvision and the training stack."""
from __future__ import annotations

import importlib

from disco.errors import DiscoError, UnsupportedOperationError

__version__ = "0.1.0"

_LAZY = {  # name -> the module that defines it
    "PartitionOptions": "disco.options",
    "DiscoLayer": "disco.split.layers",
    "disco_layers": "disco.split.partitioner",
    "partition": "disco.split.partitioner",
    "set_transport": "disco.split.partitioner",
    "register_op_rule": "disco.split.ops",
    "cost_report": "disco.accounting",
    "Sparsifier": "disco.sparsify",
    "SparsifyOptions": "disco.sparsify",
}

__all__ = ["DiscoError", "UnsupportedOperationError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'disco' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
