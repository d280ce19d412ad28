"""Follow channel ownership through a captured graph (capture.py) while running it on one example image.

`propagate(...)` runs the graph once, operation by operation, and carries beside every activation its owner map
(assignment.py). Each operation has a rule (ops.py, rules.py); a rule either splits the operation (the result's
owners, and what crosses the network: a layer's channels, partial sums of a norm) or asks for the layout of an
operand to change. A layout change is made for free when the operand comes (through data movement) from a
channel-mixing layer whose output channels can be re-assigned: the propagation runs again with that assignment.
Otherwise the operand is moved (a Redistribution, counted) - and an operation that no rule splits runs on one node
with its operands gathered there (the general fallback). Nothing is refused that could be captured, except a model
that mixes the images of a batch.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_leaves

from disco.errors import DiscoError
from disco.split.analysis import Fallback, GraphAnalysis, MixingCall, Redistribution, ValueRecord
from disco.split.capture import PARAMETER, Captured
from disco.split.layouts import held_counts, replicated, representable, transfers
from disco.split.ops import Rule, op_name, rule_of

# moves that only view their input: no memory of their own (activation accounting)
VIEWS = ("view", "_unsafe_view", "permute", "expand", "slice", "select", "unsqueeze", "squeeze", "alias", "t",
         "transpose", "unbind", "split_with_sizes", "split", "diagonal", "as_strided", "detach", "narrow")

# choose_output(layer name, module, in_assign, out_shape, conv_groups) -> out_assign of a channel-mixing layer
OutputChooser = Callable[[str, nn.Module, torch.Tensor, torch.Size, int], torch.Tensor]


class Reassign(Exception):
    """Internal: some layers' output assignments should change; the propagation runs again with them.
    `vectors[layer] = (out_assign, channels some operation asked for)`."""

    def __init__(self, vectors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.vectors = vectors
        super().__init__(", ".join(vectors))


def _whole_groups(out_assign: torch.Tensor, groups: int) -> bool:
    """A grouped conv computes each group's outputs on one node (its plan needs the group's inputs there)."""
    per_group = out_assign.reshape(groups, -1)
    return groups == 1 or bool((per_group == per_group[:, :1]).all())


def describe(node: fx.Node) -> str:
    return f"{op_name(node.target)}" if node.op == "call_function" else node.op


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
        self.provided = provided or {}  # values of static nodes given from outside (a rank's shard)
        self.owners: dict[fx.Node, object] = {}
        self.kept: dict[fx.Node, object] = {}  # static and non-tensor values, for replaying data movement
        self.layer_outputs: dict[fx.Node, MixingCall] = {}
        self.first_inputs: dict[str, torch.Tensor] = {}  # a layer's input assignment at its first call
        self.layer_of_weight: dict[fx.Node, str | None] = {}
        self.reassigns: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.request_depends: dict[str, frozenset[str]] = {}  # layers each re-assignment was decided on
        self.upstream: dict[fx.Node, frozenset[str]] = {}  # layers a value's layout depends on
        self._current: fx.Node | None = None
        self.operand_changes: dict[fx.Node, dict[int, torch.Tensor]] = {}  # node -> {operand: target owner}
        self.result_changes: dict[fx.Node, tuple] = {}  # node -> (owner of its result before, after a re-split)
        self.executors: dict[fx.Node, int] = {}  # nodes run whole on one node
        self.analysis = GraphAnalysis(nodes=nodes, batch=1)
        self._pending: list = []
        self._index = {node: i for i, node in enumerate(captured.graph_module.graph.nodes)}
        self.extra_traceback = False

    # --- driving -----------------------------------------------------------------------------------
    def analyse(self, *values) -> GraphAnalysis:
        with torch.no_grad():
            self.run(*values)
        if self.reassigns:
            raise Reassign(self.reassigns)
        from disco.split.needs import narrow_constants, place_statics

        narrow_constants(self)
        self.analysis.statics = place_statics(self)
        self._recount_memory()
        return self.analysis

    def run_node(self, n: fx.Node):
        if n in self.provided:
            if n.op == "placeholder":
                next(self.args_iter)  # the placeholder's own value is replaced, but it must be consumed
            value = self.provided[n]
        else:
            try:
                value = super().run_node(n)
            except DiscoError:
                raise
            except Exception as error:  # the model itself fails on this input
                raise DiscoError(f"the model fails on the example input at graph node '{n.name}' ({describe(n)}): "
                                 f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
        if n in self.static or not any(isinstance(t, torch.Tensor) for t in tree_leaves(value)):
            self.kept[n] = value
        if n.op == "output":
            self._record_output(n)
        elif n not in self.static:
            self._pending, self._current = [], n
            owner = self._owner_of(n, value)
            owner = self._commit(n, value, owner)
            self.owners[n] = owner
            self._record_memory(n, value, owner)
            self._track_upstream(n)
        return value

    def _track_upstream(self, n: fx.Node) -> None:
        """The layers whose assignments a value's layout follows from: a layer's output starts afresh (its own
        assignment), except a grouped conv's, whose groups follow their inputs."""
        inherited = frozenset().union(*(self.upstream.get(a, frozenset()) for a in n.all_input_nodes))
        call = self.layer_outputs.get(n)
        if call is None:
            self.upstream[n] = inherited
        else:
            self.upstream[n] = frozenset({call.module}) | (inherited if call.conv_groups > 1 else frozenset())

    def index_of(self, n: fx.Node) -> int:
        return self._index[n]

    # --- operands ----------------------------------------------------------------------------------
    def tensor_operands(self, n: fx.Node) -> list[fx.Node]:
        """The node's tensor operands in argument order (their positions number operand changes)."""
        return [a for a in tree_flatten((n.args, n.kwargs))[0]
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

    def dynamic(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in self.tensor_operands(n) if a not in self.static]

    def value_of(self, a):
        """A static or non-tensor value kept from the run (data movement is replayed on them)."""
        return self.kept[a]

    # --- rules -------------------------------------------------------------------------------------
    def _owner_of(self, n: fx.Node, value):
        from disco.split import rules

        if n.op == "placeholder":
            return replicated(value.shape)  # the input: node 0 sends it to every node
        if n.target is operator.getitem:
            source = self.owners[n.args[0]]
            return source[n.args[1]]
        rule = rule_of(n.target)
        if rule is Rule.SHAPE or not any(isinstance(t, torch.Tensor) for t in tree_leaves(value)):
            return value
        owner = rules.RULES[rule](self, n, value)
        if owner is None:
            self._pending = []
            return rules.fallback(self, n, value, f"no rule splits {describe(n)}")
        if rule is not Rule.MOVE and not self.reassigns and not (
                self._representable(n, owner) and all(self._representable(a, o) for a, o in self._operands_as_run(n))):
            self._pending = []
            return rules.fallback(self, n, value, "its operands or result would be split along several dims")
        return owner

    def _operands_as_run(self, n: fx.Node):
        """(operand, owner map) of each dynamic operand as the operation will see it (after pending moves)."""
        moved = {item[2]: item[3] for item in self._pending if isinstance(item, tuple) and item[0] == "operand"}
        operands = self.tensor_operands(n)
        return [(a, moved.get(i, self.owner_of(a))) for i, a in enumerate(operands) if a not in self.static]

    def _representable(self, n: fx.Node, owner) -> bool:
        """Each node's part is the value narrowed along one dim (else only data movement can follow it)."""
        return all(representable(o, self.nodes) for o in tree_leaves(owner) if isinstance(o, torch.Tensor))

    # --- what rules record (kept only when the rule's result stands) ----------------------------------
    def record(self, item) -> None:
        self._pending.append(item)

    def change_operand(self, n: fx.Node, position: int, target: torch.Tensor, reason: str) -> torch.Tensor:
        """Move operand `position` of n to layout `target` before n runs; returns `target`."""
        self._pending.append(("operand", n, position, target, reason))
        return target

    def run_on(self, n: fx.Node, executor: int) -> None:
        """n runs whole on one node (its operands are moved there first)."""
        self._pending.append(("executor", n, executor))

    def change_result(self, n: fx.Node, target: torch.Tensor, reason: str) -> None:
        self._pending.append(("result", n, target, reason))

    def _commit(self, n: fx.Node, value, owner):
        for item in self._pending:
            if not isinstance(item, tuple):
                self._append(item)
            elif item[0] == "executor":
                self.executors[item[1]] = item[2]
            elif item[0] == "operand":
                _, node, position, target, reason = item
                operand = self.tensor_operands(node)[position]
                self.operand_changes.setdefault(node, {})[position] = target
                self._redistribution(node, position, self.owner_of(operand), target, operand, reason)
            else:
                _, node, target, reason = item
                self.result_changes[node] = (owner, target)
                self._redistribution(node, None, owner, target, node, reason)
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

    def _redistribution(self, n: fx.Node, position, source, target, value_node, reason: str) -> None:
        value = value_node.meta["val"]
        moved = transfers(source.broadcast_to(target.shape) if source.shape != target.shape else source, target,
                          self.nodes)
        self.analysis.redistributions.append(Redistribution(n.name, position, target, moved,
                                                            value.element_size(), reason))

    # --- layers: which module a weight belongs to -------------------------------------------------------
    def layer_of(self, weight: fx.Node) -> str | None:
        """The module whose `weight` parameter a static operand is computed from (alone), or None."""
        if weight in self.layer_of_weight:
            return self.layer_of_weight[weight]
        found, stack, seen = set(), [weight], set()
        while stack:
            node = stack.pop()
            if node in seen or node not in self.static:
                continue
            seen.add(node)
            if node.op == "placeholder" and self.captured.roles[node][0] == PARAMETER:
                found.add(self.captured.roles[node][1])
            stack.extend(node.all_input_nodes)
        name = found.pop() if len(found) == 1 else None
        layer = None
        if name is not None and name.rpartition(".")[2] == "weight" and "." in name:
            module_name = name.rpartition(".")[0]
            module = self.model.get_submodule(module_name)
            weight_value = getattr(module, "weight", None)
            if isinstance(weight_value, torch.Tensor) and tuple(weight_value.shape) == tuple(weight.meta["val"].shape):
                layer = module_name
        self.layer_of_weight[weight] = layer
        return layer

    # --- re-assigning a layer instead of moving data -----------------------------------------------------
    def pullback(self, n: fx.Node, target: torch.Tensor) -> bool:
        """Ask for value n to have owner map `target` by re-assigning the output channels of the layer it comes
        from through data movement; True when such a re-assignment was asked for (the propagation runs again).
        Never on a deployment's rank (`frozen`): its plans are the exporter's final ones."""
        if self.frozen:
            return False
        chain, current = [], n
        while current not in self.layer_outputs:
            source = self._transparent_source(current)
            if source is None:
                return False
            chain.append(current)
            current = source
        call = self.layer_outputs[current]
        shape = self.owner_of(current).shape
        ids = torch.arange(1, shape.numel() + 1, dtype=torch.float64).reshape(shape)
        values = {current: ids}
        for node in reversed(chain):
            values[node] = self._replay(node, values)
        desired = self._desired_channels(call, values[n], target)
        if desired is None:
            return False
        vector, constrained = desired
        # the layers whose layouts the target was decided on (through the other operands)
        depends = frozenset().union(*(self.upstream.get(a, frozenset()) for a in self.dynamic(self._current)
                                      if a is not n))
        if any(layer in self.reassigns for layer in depends):
            return True  # decided on a layout a pending re-assignment changes: the next run decides again
        for layer in [m for m, deps in self.request_depends.items() if call.module in deps and m != call.module]:
            del self.reassigns[layer], self.request_depends[layer]  # decided on this layer's old layout: stale
        base, fixed = self.reassigns.get(call.module, (self.overrides.get(call.module, call.out_assign),
                                                       self.fixed.get(call.module)))
        if fixed is not None and bool((fixed & constrained & (vector != base)).any()):
            return False  # another operation already asked for these channels elsewhere: no ping-pong
        merged = torch.where(constrained, vector, base)
        if torch.equal(merged, call.out_assign) or not _whole_groups(merged, call.conv_groups):
            return False
        self.reassigns[call.module] = (merged, constrained if fixed is None else fixed | constrained)
        self.request_depends[call.module] = self.request_depends.get(call.module, frozenset()) | depends | {call.module}
        return True

    def _transparent_source(self, n: fx.Node) -> fx.Node | None:
        """The one activation n's value comes from element by element (data movement, or any operation whose
        result keeps its operand's owners: pointwise, norms, softmax...), or None."""
        if n.op != "call_function" or n in self.static:
            return None
        if n.target is operator.getitem:
            source = n.args[0]
            owner = self.owners.get(source)
            if rule_of(source.target) is Rule.MOVE or (isinstance(owner, (tuple, list)) and n.args[1] == 0):
                return source
            return None
        if n in self.operand_changes or n in self.result_changes or n in self.executors:
            return None
        dynamic = self.dynamic(n)
        if len(dynamic) != 1:
            return None
        if rule_of(n.target) is Rule.MOVE:
            return dynamic[0]
        owner = self.owners[n]
        first = owner[0] if isinstance(owner, (tuple, list)) else owner
        source = self.owner_of(dynamic[0])
        if not isinstance(first, torch.Tensor) or source.shape != first.shape or not torch.equal(source, first):
            return None
        return dynamic[0]

    def _replay(self, n: fx.Node, values: dict) -> torch.Tensor:
        """Element ids of the layer's output carried to node n (0: not from the layer)."""
        if n.target is operator.getitem:
            carried = values[n.args[0]]
            return carried if isinstance(carried, torch.Tensor) else carried[n.args[1]]  # output 0 of a norm
        source = self.dynamic(n)[0]
        if rule_of(n.target) is not Rule.MOVE:
            return values[source]

        def arg(a):
            if a is source:  # contiguous: ids carried through a copy that changed strides may not view as the graph's
                return values[source].contiguous()
            if a in self.static:
                return torch.zeros_like(self.kept[a], dtype=torch.float64) \
                    if a not in self.index_operands_of(n) else self.kept[a]
            return self.kept.get(a, a)
        args = fx.node.map_arg(n.args, arg)
        kwargs = fx.node.map_arg(n.kwargs, arg)
        return n.target(*args, **kwargs)

    def index_operands_of(self, n: fx.Node) -> set[fx.Node]:
        from disco.split.rules import index_operands
        return index_operands(n)

    def _desired_channels(self, call: MixingCall, ids: torch.Tensor, target: torch.Tensor):
        """(out_assign with the channels the target constrains set, which channels it constrains), or None."""
        flat_ids, flat_target = ids.flatten().long(), target.broadcast_to(ids.shape).flatten()
        mapped = flat_ids > 0
        if bool((flat_target[mapped] < 0).any()):
            return None  # a replicated target cannot come from one layer's channels
        size = int(call.out_shape.numel())
        low = torch.full((size,), float("inf")).scatter_reduce(0, flat_ids[mapped] - 1, flat_target[mapped], "amin")
        high = torch.full((size,), -1.0).scatter_reduce(0, flat_ids[mapped] - 1, flat_target[mapped], "amax")
        wanted = high >= 0
        if bool((low[wanted] != high[wanted]).any()):
            return None
        dim = call.channel_dim % len(call.out_shape)
        per_channel = high.reshape(call.out_shape).movedim(dim, -1).reshape(-1, call.out_shape[dim])
        vector, constrained = call.out_assign.clone(), torch.zeros(call.out_shape[dim], dtype=torch.bool)
        for channel in range(call.out_shape[dim]):
            column = per_channel[:, channel]
            chosen = column[column >= 0]
            if not chosen.numel():
                continue
            if not bool((chosen == chosen[0]).all()):
                return None
            vector[channel], constrained[channel] = int(chosen[0]), True
        return vector, constrained

    # --- bookkeeping for memory, outputs and statics -------------------------------------------------
    def elements_per_node(self, owner) -> list[int]:
        counts = [0] * self.nodes
        for leaf in tree_leaves(owner):
            if isinstance(leaf, torch.Tensor):
                counts = [c + h for c, h in zip(counts, held_counts(leaf, self.nodes))]
        return counts

    def _record_memory(self, n: fx.Node, value, owner) -> None:
        if not isinstance(value, torch.Tensor) or op_name(n.target).rpartition(".")[2] in VIEWS:
            return
        last_use = max((self._index[u] for u in n.users), default=self._index[n])
        self.analysis.values.append(ValueRecord(self._index[n], n.name, self.elements_per_node(owner),
                                                value.element_size(), last_use))

    def _record_output(self, n: fx.Node) -> None:
        owner = fx.node.map_arg(n.args[0], lambda a: self.owner_of(a))
        self.output_owner = owner
        self.analysis.output_elements_per_node = self.elements_per_node(owner)
        self.analysis.output_elements = sum(t.numel() for t in tree_leaves(owner) if isinstance(t, torch.Tensor))
        self.analysis.input_elements = int(self.owner_of(self.captured.input_node).numel())

    def _recount_memory(self) -> None:
        """Values narrowed after the run (needs.py) hold less on each node than first counted."""
        by_name = {node.name: node for node in self.graph.nodes}
        for record in self.analysis.values:
            record.elements_per_node = self.elements_per_node(self.owners[by_name[record.node]])

    def reads_parameter(self, node: fx.Node) -> bool:
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "placeholder" and self.captured.roles[current][0] == PARAMETER:
                return True
            stack.extend(current.all_input_nodes)
        return False


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
        except Reassign as reassign:
            for layer, (vector, constrained) in reassign.vectors.items():
                overrides[layer], fixed[layer] = vector, constrained
