"""Validated options for partitioning (one dataclass, keyword-only)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from disco.errors import DiscoError

MAX_NODES = 64


@dataclass(frozen=True, kw_only=True)
class PartitionOptions:
    """How to split a model.

    nodes: number of devices the model is split across (1..64).
    assignment: how channels produced by a channel-mixing layer are given to nodes by default.
        "balanced" gives node k the contiguous block [k*C/N, (k+1)*C/N) (sizes differ by at most one).
    transport_dtype: the dtype channels cross the network in (disco/transport.py: fp32, fp16, bf16, int8, int4);
        the simulation rounds received channels as the network will.
    node_weights: each node's share of the work, e.g. (2, 1, 1) for a node twice as fast as the two others
        (disco/split/balance.py); None or equal weights: equal shares.
    """

    nodes: int
    assignment: str = "balanced"
    transport_dtype: str = "fp32"
    node_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int):
            raise DiscoError(f"nodes must be an integer, got {self.nodes!r}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise DiscoError(f"nodes must be between 1 and {MAX_NODES}, got {self.nodes}")
        if self.assignment != "balanced":
            raise DiscoError(f"unknown assignment {self.assignment!r}; known: 'balanced'")
        from disco.transport import get_transport_dtype  # here: disco.options is read by light imports too

        get_transport_dtype(self.transport_dtype)
        object.__setattr__(self, "node_weights", check_weights(self.node_weights, self.nodes))


MAX_WEIGHT_RATIO = 1e6  # relative weights only: past this ratio shares underflow
MAX_WEIGHT = 1e9  # and their sum must stay finite


def check_weights(weights, nodes: int) -> tuple[float, ...] | None:
    """The validated node weights (None: all equal)."""
    if weights is None:
        return None
    weights = tuple(weights)
    if len(weights) != nodes:
        raise DiscoError(f"node_weights has {len(weights)} entries for {nodes} nodes: give one weight per node")
    for k, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise DiscoError(f"node_weights[{k}] must be a number, got {weight!r}")
        if weight <= 0:
            raise DiscoError(f"node_weights[{k}] is {weight}: a node with no share computes nothing; leave it out of "
                             "the deployment (fewer nodes) instead")
    if max(weights) / min(weights) > MAX_WEIGHT_RATIO:
        raise DiscoError(f"node weights differ by more than {MAX_WEIGHT_RATIO:g}x: the smallest node would get no "
                         "channel of most layers; leave it out of the deployment instead")
    return None if len(set(weights)) == 1 else weights


def parse_weights(text: str) -> tuple[float, ...]:
    """`--node-weights 2,1,1` as numbers (checked against the node count by check_weights)."""
    try:
        weights = tuple(float(part) for part in text.split(","))  # an empty part ("1,,2") is an error, not skipped
    except ValueError:
        raise DiscoError(f"expected one weight per node separated by commas, e.g. 2,1,1; got {text!r}") from None
    if not all(math.isfinite(w) and 0 < w <= MAX_WEIGHT for w in weights):
        raise DiscoError(f"node weights are relative shares in (0, {MAX_WEIGHT:g}]; got {text!r}")
    return weights
