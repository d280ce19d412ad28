"""Follow channel ownership through a captured graph (capture.py) while running it on one example image.

`propagate(...)` runs the graph once, operation by operation, and carries beside every activation its owner map
(assignment.py). Each operation has a rule (ops.py, rules/); a rule either splits the operation (the result's
owners, and what crosses the network: a layer's channels, partial sums of a norm) or asks for the layout of an
operand to change. A layout change is made for free when the operand comes (through data movement) from a
channel-mixing layer whose output channels can be re-assigned (reassign.py): the propagation runs again with that
assignment. Otherwise the operand is moved (a Redistribution, counted) - and an operation that no rule splits runs
on one node with its operands gathered there (the general fallback). Nothing is refused that could be captured,
except a model that mixes the images of a batch.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_leaves

from disco.errors import DiscoError
from disco.split import reassign
from disco.split.analysis import Fallback, GraphAnalysis, MixingCall, Redistribution, ValueRecord
from disco.split.capture import Captured
from disco.split.layouts import held_counts, replicated, representable, transfers
from disco.split.needs import narrow_constants, place_statics
from disco.split.ops import Rule, op_name, rule_of
from disco.split.reassign import Reassign
from disco.split.rules import RULES, fallback
from disco.split.weights import layer_of_weight

# moves that only view their input: no memory of their own (activation accounting)
VIEWS = ("view", "_unsafe_view", "permute", "expand", "slice", "select", "unsqueeze", "squeeze", "alias", "t",
         "transpose", "unbind", "split_with_sizes", "split", "diagonal", "as_strided", "detach", "narrow")

# choose_output(layer name, module, in_assign, out_shape, conv_groups) -> out_assign of a channel-mixing layer
OutputChooser = Callable[[str, nn.Module, torch.Tensor, torch.Size, int], torch.Tensor]


def describe(graph_node: fx.Node) -> str:
    return f"{op_name(graph_node.target)}" if graph_node.op == "call_function" else graph_node.op


class OwnerPropagator(fx.Interpreter):
    """Runs the captured graph and computes an owner map for every value (see the module docstring)."""

    def __init__(self, captured: Captured, model: nn.Module, static: set[fx.Node], nodes: int,
                 choose_output: OutputChooser, overrides: dict[str, torch.Tensor] | None = None,
                 provided: dict[fx.Node, torch.Tensor] | None = None, node_weights=None,
                 fixed: dict[str, torch.Tensor] | None = None, frozen: bool = False):
        super().__init__(captured.graph_module, garbage_collect_values=True)
        self.captured, self.model, self.static, self.nodes = captured, model, static, nodes
        self.choose_output, self.node_weights = choose_output, node_weights
        self.overrides = overrides or {}
        self.fixed = fixed or {}  # channels of re-assigned layers that some operation asked for
        self.frozen = frozen
        self.provided = provided or {}  # values of static graph nodes given from outside (a rank's shard)
        self.owners: dict[fx.Node, object] = {}
        self.kept: dict[fx.Node, object] = {}  # static and non-tensor values, for replaying data movement
        self.layer_outputs: dict[fx.Node, MixingCall] = {}
        self.first_inputs: dict[str, torch.Tensor] = {}  # a layer's input assignment at its first call
        self.weight_layers: dict[fx.Node, str | None] = {}  # weight operand -> its layer (layer_of), once found
        self.reassigns: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.request_depends: dict[str, frozenset[str]] = {}  # layers each re-assignment was decided on
        self.upstream: dict[fx.Node, frozenset[str]] = {}  # layers a value's layout depends on
        self.current_graph_node: fx.Node | None = None  # the operation whose rule runs now
        self.operand_changes: dict[fx.Node, dict[int, torch.Tensor]] = {}  # graph node -> {operand: target owner}
        self.result_changes: dict[fx.Node, tuple] = {}  # graph node -> (owner of its result before, after a re-split)
        self.executors: dict[fx.Node, int] = {}  # graph nodes run whole on one node -> that node
        self.analysis = GraphAnalysis(nodes=nodes, batch=1)
        self._pending: list = []
        self._index = {graph_node: i for i, graph_node in enumerate(captured.graph_module.graph.nodes)}
        self.extra_traceback = False

    # --- driving -----------------------------------------------------------------------------------
    def analyse(self, *values) -> GraphAnalysis:
        with torch.no_grad():
            self.run(*values)
        if self.reassigns:
            raise Reassign(self.reassigns)
        narrow_constants(self)
        self.analysis.statics = place_statics(self)
        self._recount_memory()
        return self.analysis

    def run_node(self, graph_node: fx.Node):
        value = self._value_of(graph_node)
        if graph_node in self.static or not any(isinstance(t, torch.Tensor) for t in tree_leaves(value)):
            self.kept[graph_node] = value
        if graph_node.op == "output":
            self._record_output(graph_node)
        elif graph_node not in self.static:
            self._pending, self.current_graph_node = [], graph_node
            owner = self._owner_of(graph_node, value)
            owner = self._commit(graph_node, value, owner)
            self.owners[graph_node] = owner
            self._record_memory(graph_node, value, owner)
            self._track_upstream(graph_node)
        return value

    def _value_of(self, graph_node: fx.Node):
        """The operation's value: given from outside (a rank's shard), else computed."""
        if graph_node in self.provided:
            if graph_node.op == "placeholder":
                next(self.args_iter)  # the placeholder's own value is replaced, but it must be consumed
            return self.provided[graph_node]
        try:
            return super().run_node(graph_node)
        except DiscoError:
            raise
        except Exception as error:  # the model itself fails on this input
            raise DiscoError(f"the model fails on the example input at graph node '{graph_node.name}' "
                             f"({describe(graph_node)}): "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error

    def _track_upstream(self, graph_node: fx.Node) -> None:
        """The layers whose assignments a value's layout follows from: a layer's output starts afresh (its own
        assignment), except a grouped conv's, whose groups follow their inputs."""
        inherited = frozenset().union(*(self.upstream.get(a, frozenset()) for a in graph_node.all_input_nodes))
        call = self.layer_outputs.get(graph_node)
        if call is None:
            self.upstream[graph_node] = inherited
        else:
            self.upstream[graph_node] = frozenset({call.module}) | (inherited if call.conv_groups > 1
                                                                   else frozenset())

    def index_of(self, graph_node: fx.Node) -> int:
        return self._index[graph_node]

    # --- operands ----------------------------------------------------------------------------------
    def tensor_operands(self, graph_node: fx.Node) -> list[fx.Node]:
        """The operation's tensor operands in argument order (their positions number operand changes)."""
        return [a for a in tree_flatten((graph_node.args, graph_node.kwargs))[0]
                if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]

    def owner_of(self, a: fx.Node) -> torch.Tensor:
        """The owner map of an operand (a static one: every node has it)."""
        if a in self.static:
            return replicated(a.meta["val"].shape if a not in self.kept else self.kept[a].shape)
        owner = self.owners[a]
        return owner

    def shape_of(self, a: fx.Node) -> torch.Size:
        if a in self.kept and isinstance(self.kept[a], torch.Tensor):
            return self.kept[a].shape
        return self.owner_of(a).shape

    def dynamic(self, graph_node: fx.Node) -> list[fx.Node]:
        return [a for a in self.tensor_operands(graph_node) if a not in self.static]

    def value_of(self, a):
        """A static or non-tensor value kept from the run (data movement is replayed on them)."""
        return self.kept[a]

    # --- rules -------------------------------------------------------------------------------------
    def _owner_of(self, graph_node: fx.Node, value):
        if graph_node.op == "placeholder":
            return replicated(value.shape)  # the input: node 0 sends it to every node
        if graph_node.target is operator.getitem:
            source = self.owners[graph_node.args[0]]
            return source[graph_node.args[1]]
        rule = rule_of(graph_node.target)
        if rule is Rule.SHAPE or not any(isinstance(t, torch.Tensor) for t in tree_leaves(value)):
            return value
        owner = RULES[rule](self, graph_node, value)
        if owner is None:
            self._pending = []
            return fallback(self, graph_node, value, self._no_rule(graph_node, rule))
        if rule is not Rule.MOVE and not self.reassigns and not (self._representable(owner) and all(
                self._representable(o) for _, o in self._operands_as_run(graph_node))):
            self._pending = []
            return fallback(self, graph_node, value, "its operands or result would be split along several dims")
        return owner

    @staticmethod
    def _no_rule(graph_node: fx.Node, rule: Rule) -> str:
        """Why the fallback runs an operation no rule splits; for one without any rule, how to give it one."""
        reason = f"no rule splits {describe(graph_node)}"
        if rule is Rule.FALLBACK:
            reason += "; give it one with disco.register_op_rule(op, rule)"
        return reason

    def _operands_as_run(self, graph_node: fx.Node):
        """(operand, owner map) of each dynamic operand as the operation will see it (after pending moves)."""
        moved = {item[2]: item[3] for item in self._pending if isinstance(item, tuple) and item[0] == "operand"}
        operands = self.tensor_operands(graph_node)
        return [(a, moved.get(i, self.owner_of(a))) for i, a in enumerate(operands) if a not in self.static]

    def _representable(self, owner) -> bool:
        """Each node's part is the value narrowed along one dim (else only data movement can follow it)."""
        return all(representable(o, self.nodes) for o in tree_leaves(owner) if isinstance(o, torch.Tensor))

    # --- what rules record (kept only when the rule's result stands) ----------------------------------
    def record(self, item) -> None:
        self._pending.append(item)

    def change_operand(self, graph_node: fx.Node, position: int, target: torch.Tensor, reason: str) -> torch.Tensor:
        """Move operand `position` of the operation to layout `target` before it runs; returns `target`."""
        self._pending.append(("operand", graph_node, position, target, reason))
        return target

    def run_on(self, graph_node: fx.Node, executor: int) -> None:
        """The operation runs whole on one node (its operands are moved there first)."""
        self._pending.append(("executor", graph_node, executor))

    def change_result(self, graph_node: fx.Node, target: torch.Tensor, reason: str) -> None:
        self._pending.append(("result", graph_node, target, reason))

    def _commit(self, graph_node: fx.Node, value, owner):
        for item in self._pending:
            if not isinstance(item, tuple):
                self._append(item)
            elif item[0] == "executor":
                self.executors[item[1]] = item[2]
            elif item[0] == "operand":
                _, changed, position, target, reason = item
                operand = self.tensor_operands(changed)[position]
                self.operand_changes.setdefault(changed, {})[position] = target
                self._redistribution(changed, position, self.owner_of(operand), target, operand, reason)
            else:
                _, changed, target, reason = item
                self.result_changes[changed] = (owner, target)
                self._redistribution(changed, None, owner, target, changed, reason)
                owner = target
        self._pending = []
        return owner

    def _append(self, item) -> None:
        if isinstance(item, Fallback):
            self.analysis.fallbacks.append(item)
        elif isinstance(item, MixingCall):
            self.analysis.mixing.append(item)
        else:
            getattr(self.analysis, {"Exchange": "exchanges", "Products": "products"}[type(item).__name__]).append(item)

    def _redistribution(self, graph_node: fx.Node, position, source, target, value_node, reason: str) -> None:
        value = value_node.meta["val"]
        moved = transfers(source.broadcast_to(target.shape) if source.shape != target.shape else source, target,
                          self.nodes)
        self.analysis.redistributions.append(Redistribution(graph_node.name, position, target, moved,
                                                            value.element_size(), reason))

    # --- layers: which module a weight belongs to, and re-assigning one instead of moving data ---------------
    def layer_of(self, weight: fx.Node) -> str | None:
        """The module whose `weight` parameter a static operand is computed from (alone), or None."""
        if weight not in self.weight_layers:
            self.weight_layers[weight] = layer_of_weight(self.captured, self.model, self.static, weight)
        return self.weight_layers[weight]

    def pullback(self, graph_node: fx.Node, target: torch.Tensor) -> bool:
        """Ask for value `graph_node` to have owner map `target` by re-assigning a layer (reassign.py); True
        when such a re-assignment was asked for (the propagation runs again)."""
        return reassign.pullback(self, graph_node, target)

    # --- bookkeeping for memory and outputs ------------------------------------------------------------
    def elements_per_node(self, owner) -> list[int]:
        counts = [0] * self.nodes
        for leaf in tree_leaves(owner):
            if isinstance(leaf, torch.Tensor):
                counts = [c + h for c, h in zip(counts, held_counts(leaf, self.nodes))]
        return counts

    def _record_memory(self, graph_node: fx.Node, value, owner) -> None:
        if not isinstance(value, torch.Tensor) or op_name(graph_node.target).rpartition(".")[2] in VIEWS:
            return
        last_use = max((self._index[u] for u in graph_node.users), default=self._index[graph_node])
        self.analysis.values.append(ValueRecord(self._index[graph_node], graph_node.name,
                                                self.elements_per_node(owner), value.element_size(), last_use))

    def _record_output(self, graph_node: fx.Node) -> None:
        owner = fx.node.map_arg(graph_node.args[0], lambda a: self.owner_of(a))
        self.output_owner = owner
        self.analysis.output_elements_per_node = self.elements_per_node(owner)
        self.analysis.output_elements = sum(t.numel() for t in tree_leaves(owner) if isinstance(t, torch.Tensor))
        self.analysis.input_elements = int(self.owner_of(self.captured.input_graph_node).numel())

    def _recount_memory(self) -> None:
        """Values narrowed after the run (needs.py) hold less on each node than first counted."""
        by_name = {graph_node.name: graph_node for graph_node in self.graph.nodes}
        for record in self.analysis.values:
            record.elements_per_node = self.elements_per_node(self.owners[by_name[record.graph_node]])


def propagate(captured: Captured, model: nn.Module, static: set[fx.Node], values: list, nodes: int,
              choose_output: Callable[[dict], OutputChooser], provided: dict | None = None,
              node_weights=None, frozen: bool = False) -> OwnerPropagator:
    """Run the owner propagation until no layer needs re-assigning; `choose_output(overrides)` makes the
    chooser of a run."""
    overrides: dict[str, torch.Tensor] = {}
    fixed: dict[str, torch.Tensor] = {}
    while True:  # each run fixes more channels of some layer for good, so this ends
        propagator = OwnerPropagator(captured, model, static, nodes, choose_output(overrides), overrides, provided,
                                     node_weights, fixed, frozen)
        try:
            propagator.analyse(*values)
            return propagator
        except Reassign as reassignment:
            for layer, (vector, constrained) in reassignment.vectors.items():
                overrides[layer], fixed[layer] = vector, constrained
