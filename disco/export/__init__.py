"""Per-node shards and the manifest that describes a deployment (`disco export`; docs/method.md 8). Exporting a
training run folder lives with training (disco.training.export_run); this package needs no training code.

`export` (the shard writer, which needs the split and accounting stack) is loaded on first use, so that
reading a manifest (`disco.export.manifest`, a leaf) stays light."""
from __future__ import annotations

from disco.export.manifest import Manifest, ModelSpec

__all__ = ["Manifest", "ModelSpec", "export"]


def __getattr__(name: str):
    if name == "export":
        from disco.export.shards import export
        return export
    raise AttributeError(f"module 'disco.export' has no attribute {name!r}")
