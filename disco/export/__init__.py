"""Per-node shards and the manifest that describes a deployment (`disco export`). Exporting a training run
folder lives with training (disco.training.export_run); this package needs no training code."""
from disco.export.manifest import Manifest, ModelSpec
from disco.export.shards import export

__all__ = ["Manifest", "ModelSpec", "export"]
