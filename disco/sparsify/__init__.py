"""Learning which channels cross the network (Sparsifier, SparsifyOptions: disco.sparsify.sparsifier), imported
on first use so that `from disco.sparsify.methods import METHODS` stays light."""
from __future__ import annotations

import importlib

__all__ = ["Sparsifier", "SparsifyOptions"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("disco.sparsify.sparsifier"), name)
    raise AttributeError(f"module 'disco.sparsify' has no attribute {name!r}")
