"""Errors DISCO raises for input it cannot handle; each message says what to change."""


class DiscoError(ValueError):
    """Base class: bad input or a model DISCO cannot split."""


class UnsupportedOperationError(DiscoError):
    """The partitioner met an operation whose effect on channel ownership it does not know."""

    def __init__(self, node_name: str, op: str, reason: str):
        self.node_name = node_name
        self.op = op
        super().__init__(f"cannot partition graph node '{node_name}' ({op}): {reason}")
