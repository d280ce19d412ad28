from disco.sparsify.sparsifier import Sparsifier, SparsifyOptions

__all__ = ["Sparsifier", "SparsifyOptions"]
