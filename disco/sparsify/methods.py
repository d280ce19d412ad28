"""How communication groups are chosen (SparsifyOptions.method, `disco train --method`): "learned" is DISCO
(importance per byte, docs/method.md 4), "random" the baseline on the same schedule. Apart from the
Sparsifier so that `--help` and option checks read it without importing torch."""
METHODS = ("learned", "random")
