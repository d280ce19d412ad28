"""DISCO: Distributed Inference with Sparse Communications."""
from disco.errors import DiscoError, UnsupportedOperationError
from disco.options import PartitionOptions
from disco.split.layers import DiscoLayer
from disco.split.partitioner import disco_layers, partition

__all__ = ["DiscoError", "DiscoLayer", "PartitionOptions", "UnsupportedOperationError", "disco_layers",
           "partition"]
__version__ = "0.1.0"

from disco.accounting import cost_report  # noqa: E402  (needs the partition package loaded first)

from disco.sparsify import Sparsifier, SparsifyOptions  # noqa: E402

__all__ += ["Sparsifier", "SparsifyOptions", "cost_report"]
