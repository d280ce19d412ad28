from disco.data.datasets import DataSpec, load_dataset

__all__ = ["DataSpec", "load_dataset"]
