"""Per-node shards and the manifest that describes a deployment (`disco export`)."""
from disco.export.manifest import Manifest, ModelSpec
from disco.export.from_run import export_run
from disco.export.shards import export

__all__ = ["Manifest", "ModelSpec", "export", "export_run"]
