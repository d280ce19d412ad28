"""One function per rule (ops.py names the rule of every operation): what an operation's result's owners are, and
what it costs to get there.

Each takes the propagator `p`, the graph node and its value on the example, and returns the owner map of the
result (a tuple of them for several outputs), or None when the rule cannot split the operation as its operands lie
(then the general fallback runs it on one node). Layout changes a rule needs go through `p.pullback` (re-assign the
layer the operand comes from: free) or `p.change_operand` (move the data: counted).

One module per family: `elementwise` (POINTWISE, CREATE), `movement` (MOVE), `windows` (WINDOW), `reductions`
(REDUCE), `norms` (NORM), `layer_calls` (MIXING), `products` (CONTRACT, ATTENTION), `fallback`; `common` holds
what they share.
"""
from __future__ import annotations

from disco.split.ops import Rule
from disco.split.rules.elementwise import create, pointwise
from disco.split.rules.fallback import fallback
from disco.split.rules.layer_calls import mixing
from disco.split.rules.movement import move
from disco.split.rules.norms import norm
from disco.split.rules.products import attention, contract
from disco.split.rules.reductions import reduce
from disco.split.rules.windows import window

RULES = {Rule.POINTWISE: pointwise, Rule.MOVE: move, Rule.WINDOW: window, Rule.REDUCE: reduce, Rule.NORM: norm,
         Rule.MIXING: mixing, Rule.CONTRACT: contract, Rule.ATTENTION: attention, Rule.CREATE: create,
         Rule.FALLBACK: lambda p, graph_node, value: None}

__all__ = ["RULES", "fallback"]
