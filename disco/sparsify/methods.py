"""How communication groups are chosen (SparsifyOptions.method, `disco train --method`): "learned" is DISCO
(gradient importance per byte, docs/method.md 4), "gates" learned gate scores trained through a straight-through
estimator (a dropped group can come back), "random" the baseline on the same schedule. Apart from the
Sparsifier so that `--help` and option checks read it without importing torch."""
METHODS = ("learned", "gates", "random")
