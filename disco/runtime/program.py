"""A rank's local sub-network, built from the manifest and the rank's own shard only.

The architecture is rebuilt on the meta device (no weights), captured as a graph (disco/split/capture.py), and the
owner propagation is run with each layer's exported assignment, so every value's layout on this rank is known.
Then each graph node becomes a step: channel-mixing layers exchange channels (mixing.py), norms and reductions
over split elements exchange partial sums (norm.py), data movement becomes a gather (layout.py), operations that
run on one node get their operands moved there, and the rest runs unchanged on the local tensors, with the
tensors of the model it reads taken from the shard.
"""
from __future__ import annotations

import operator
from pathlib import Path

import safetensors.torch
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from disco.errors import DiscoError
from disco.export.manifest import Manifest, verify_shard
from disco.export.trust import build_deployed_model
from disco.models import without_weights
from disco.runtime.comm import Comm
from disco.runtime.fusion import fold_batch_norms
from disco.runtime.layout import Gather, Layout, Narrowing, Redistribution
from disco.runtime.mixing import mixing_step
from disco.runtime.norm import GroupNormStep, LayerNormStep, ReduceStep
from disco.runtime.profiling import StepProfile
from disco.runtime.steps import (BATCH, INPUT, Constant, Exchanging, Input, Local, Move, NativeMove, Nothing,
                                 Operands, Reducing, Resplit, Step)
from disco.split.analysis import GraphAnalysis
from disco.split.assignment import REPLICATED, holds
from disco.split.attention import replace_attention
from disco.split.capture import (BatchAxis, batch_axes, batch_axis, capture_without_weights, graph_digest, shape_at,
                                 static_nodes)
from disco.split.capture import placeholder_values
from disco.split.ops import Rule, rule_of
from disco.split.partitioner import eval_mode
from disco.split.propagate import propagate
from disco.split.rules import index_operands, run_move
from disco.transport import get_transport_dtype

aten = torch.ops.aten
GROUP_NORMS = (aten.group_norm.default, aten.native_group_norm.default)
# movements whose size argument is the result's shape: run natively with this rank's local shape
RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
            aten.view_copy.default, aten.expand_copy.default)


def _meta_model(manifest: Manifest, model_code: str | Path | None) -> nn.Module:
    model = without_weights(lambda: build_deployed_model(manifest.model, model_code))
    return replace_attention(model).eval()


def _chooser(layers: dict):
    def make(overrides):
        def choose(name: str, module: nn.Module, in_assign: torch.Tensor, out_shape, groups: int) -> torch.Tensor:
            plan = layers.get(name)
            if plan is None:
                raise DiscoError(f"the model spec has a layer {name!r} that the manifest does not plan")
            if not torch.equal(plan.in_assign, in_assign.cpu()):
                raise DiscoError(f"layer {name!r} receives its channels on other nodes than the manifest says; the "
                                 "model spec does not rebuild the exported model")
            return plan.out_assign
        return choose
    return make


def _mixing_apply(node: fx.Node):
    """The graph's conv/linear call with any weight, bias (and, for a grouped conv, number of groups)."""
    if node.target is aten.linear.default:
        return lambda x, w, b, groups=None: torch.nn.functional.linear(x, w, b)
    groups_at = 8 if node.target is aten.convolution.default else 6
    rest, kwargs = list(node.args[3:]), dict(node.kwargs)

    def apply(x, w, b, groups=None):
        args, named = list(rest), dict(kwargs)
        if groups is not None:
            if len(node.args) > groups_at:
                args[groups_at - 3] = groups
            else:
                named["groups"] = groups
        return node.target(x, w, b, *args, **named)
    return apply


class DeploymentGraph:
    """A deployment's model captured and its channel ownership followed with the manifest's plans: the same for
    every rank and every budget level (they share assignments), so ranks of one process build it once. `tensors`: a
    shard (any rank's: the constants whose values the propagation reads, indices, are whole in every shard)."""

    def __init__(self, manifest: Manifest, tensors: dict[str, torch.Tensor], model_code: str | Path | None = None):
        with eval_mode(_meta_model(manifest, model_code)) as meta:
            self.captured, model, example = capture_without_weights(meta, tuple(manifest.input_shape))
        if manifest.graph_digest and graph_digest(self.captured) != manifest.graph_digest:
            raise DiscoError("the model spec captures another graph than the exported model's (other library "
                             "versions?); export again with the versions this node runs")
        self.static = static_nodes(self.captured)
        self.keys = _static_keys(self.captured, self.static)
        provided = {node: tensors[key] for node, key in self.keys.items()
                    if key in tensors and tuple(tensors[key].shape) == tuple(node.meta["val"].shape)}
        values = placeholder_values(self.captured, model, example)
        self.propagator = propagate(self.captured, model, self.static, values, manifest.nodes,
                                    _chooser(manifest.layers), provided=provided, frozen=True)
        self.analysis: GraphAnalysis = self.propagator.analysis
        planned = {call.module for call in self.analysis.mixing}
        if planned != set(manifest.layers):
            raise DiscoError(f"the manifest plans layers the model spec does not call: "
                             f"{sorted(set(manifest.layers) - planned)[:4]}")


def _static_keys(captured, static: set[fx.Node]) -> dict[fx.Node, str]:
    """Each static node's shard key: a parameter's or buffer's name, `static.NODE` for a computed one."""
    keys = {}
    for node in static:
        if node.op == "placeholder":
            keys[node] = captured.roles[node][1]
        elif node.op == "call_function":
            keys[node] = f"static.{node.name}"
    return keys


class LocalProgram:
    """Runs this rank's part of the model; `forward(x, comm)` returns the rank's local outputs.

    `layers`: the plans to run (default: the manifest's; a deployment with nested budgets has one program per
    budget, disco/runtime/levels.py). `fold`: fold BatchNorms into their convs (a program per budget does not:
    each budget has its own statistics, and folded weights would be stored once per budget). `graph`: the
    deployment's graph when several ranks or levels share it (default: built here)."""

    def __init__(self, manifest: Manifest, tensors: dict[str, torch.Tensor], rank: int,
                 device: torch.device = torch.device("cpu"), model_code: str | Path | None = None,
                 layers: dict | None = None, fold: bool = True, graph: DeploymentGraph | None = None):
        self.manifest, self.rank, self.device = manifest, rank, device
        self.layers = manifest.layers if layers is None else layers
        self.tensors = {k: v.to(device) for k, v in tensors.items()}
        self.transport = get_transport_dtype(manifest.transport_dtype)
        graph = graph if graph is not None else DeploymentGraph(manifest, tensors, model_code)
        self.captured, self.static, self.keys = graph.captured, graph.static, graph.keys
        self.propagator, self.analysis = graph.propagator, graph.analysis
        self.mixing = {call.node: call for call in self.analysis.mixing}
        self.exchanges = {e.node: e for e in self.analysis.exchanges}
        steps = [step for step in map(self._step, self.captured.graph_module.graph.nodes) if step is not None]
        # a conv's BatchNorm scales its weight rows: one pass less per layer
        self.steps = fold_batch_norms(steps, self._norm_tensors) if fold else steps
        self.output_node = next(n for n in self.captured.graph_module.graph.nodes if n.op == "output")
        self.profile: StepProfile | None = None
        self._output_layout()

    # --- building ---------------------------------------------------------------------------------
    def _norm_tensors(self, node: fx.Node) -> list[torch.Tensor | None]:
        """This rank's weight, bias, running mean and variance of a BatchNorm node (from its shard)."""
        return [self.tensors.get(self.keys.get(a)) if isinstance(a, fx.Node) else None for a in node.args[1:5]]

    def _layout(self, owner: torch.Tensor, axis: BatchAxis | None) -> Layout:
        return Layout.of(owner, self.rank, axis)

    def _step(self, node: fx.Node) -> Step | None:
        p = self.propagator
        if node.op == "output" or node.op == "get_attr":
            return None
        if node in self.static:
            return self._constant(node)
        if node.op == "placeholder":
            return Input(node)
        operands = self._operands(node)
        step = self._core_step(node, operands)
        if node in p.result_changes:
            before, after = p.result_changes[node]
            move = Redistribution(node.name, before, after, self.rank, self.manifest.nodes, batch_axis(node),
                                  node.meta["val"].dtype)
            step = Resplit(node, step, move.to(self.device))
        return step

    def _constant(self, node: fx.Node) -> Step | None:
        users = [u for u in node.users if u not in self.static]
        if not users:
            return None
        key = self.keys.get(node)
        if key in self.tensors:
            return Constant(node, self.tensors[key])
        if all(self._is_layer_parameter(node, u) for u in users):
            return None  # a layer's weight or bias: its plan's blocks are in the shard instead
        raise DiscoError(f"the shard lacks tensor {key!r}: it does not belong to this manifest; export again")

    def _is_layer_parameter(self, node: fx.Node, user: fx.Node) -> bool:
        return user.name in self.mixing and node in user.args[1:3]

    def _operands(self, node: fx.Node) -> Operands:
        p = self.propagator
        tensor_operands = p.tensor_operands(node)
        operands = Operands.of(node, tensor_operands)
        for position, target in p.operand_changes.get(node, {}).items():
            source = tensor_operands[position]
            operands.moves[position] = Redistribution(f"{source.name} for {node.name}", self._owner(source), target,
                                                      self.rank, self.manifest.nodes, batch_axis(source),
                                                      source.meta["val"].dtype).to(self.device)
        return operands

    def _owner(self, node: fx.Node) -> torch.Tensor:
        if node in self.static:
            placement = self.analysis.statics.get(self.keys.get(node))
            return placement.owner if placement is not None else self.propagator.owner_of(node)
        return self.propagator.owners[node]

    def _output_layouts(self, node: fx.Node) -> list[Layout]:
        owners = [o for o in tree_leaves(self.propagator.owners[node]) if isinstance(o, torch.Tensor)]
        return [self._layout(o, axis) for o, axis in zip(owners, batch_axes(node))]

    def _core_step(self, node: fx.Node, operands: Operands) -> Step:
        p = self.propagator
        if node in p.executors:
            if self.rank == p.executors[node]:
                return Local(node, operands)
            return self._nothing(node, operands)
        if node.name in self.mixing:
            return self._mixing(node, operands)
        if node.name in self.exchanges:
            return self._exchange(node, operands)
        rule = rule_of(node.target) if node.target is not operator.getitem else Rule.SHAPE
        layouts = self._output_layouts(node)
        if rule is Rule.MOVE:
            return self._move(node, operands, layouts)
        if layouts and not any(layout.anything for layout in layouts):
            return self._nothing(node, operands)
        if rule in (Rule.POINTWISE, Rule.NORM, Rule.MIXING):
            self._narrow(node, operands, layouts)
        if node.target in GROUP_NORMS and self._holds_part(layouts):
            return self._group_norm(node, operands)  # whole groups here, but fewer than the graph's count
        return Local(node, operands)

    def _nothing(self, node: fx.Node, operands: Operands) -> Step:
        value = node.meta.get("val")
        template, spec = tree_flatten(value)
        tensors = [t for t in template if isinstance(t, torch.Tensor)]
        owners = [o for o in tree_leaves(self.propagator.owners[node]) if isinstance(o, torch.Tensor)]
        layouts = [self._layout(o, axis) for o, axis in zip(owners, batch_axes(node))]
        return Nothing(node, operands, layouts, [t.dtype for t in tensors], template, spec)

    def _narrow(self, node: fx.Node, operands: Operands, layouts: list[Layout]) -> None:
        """Cut operands held more widely than the result needs (pointwise: by broadcasting; norms and local
        contractions: their parameters by the channels of their input)."""
        from disco.split.layouts import needs

        if not layouts:
            return
        result = [o for o in tree_leaves(self.propagator.owners[node]) if isinstance(o, torch.Tensor)][0]
        for position, operand in enumerate(self.propagator.tensor_operands(node)):
            if position in operands.moves or (position == 0 and rule_of(node.target) is not Rule.POINTWISE):
                continue
            source = self._owner(operand)
            wanted = self._wanted(node, operand, position, result, needs)
            if wanted is None:
                continue
            narrowing = Narrowing(self._layout(source, None), self._layout(wanted, None))
            if narrowing.needed_any:
                operands.narrowings[position] = narrowing.to(self.device)

    def _wanted(self, node, operand, position, result, needs):
        shape = self._owner(operand).shape
        rule = rule_of(node.target)
        if rule is Rule.POINTWISE:
            return needs(tuple(shape), result)
        if rule is Rule.NORM and len(shape) == 1 and node.target not in (aten.layer_norm.default,
                                                                          aten.native_layer_norm.default):
            aligned = tuple(shape[0] if d == 1 else 1 for d in range(result.dim()))
            return needs(aligned, result).reshape(shape)
        if rule is Rule.NORM:
            return needs(tuple(shape), result)
        return None

    def _move(self, node: fx.Node, operands: Operands, layouts: list[Layout]) -> Step:
        p = self.propagator
        tensor_operands = p.tensor_operands(node)
        indices = index_operands(node)
        sources = [i for i, a in enumerate(tensor_operands) if a not in indices]
        source_nodes = [tensor_operands[i] for i in sources]
        source_layouts = []
        for i in sources:
            owner = operands.moves[i].after if i in operands.moves else None
            a = tensor_operands[i]
            source_layouts.append(owner if owner is not None else
                                  self._layout(self._owner(a), None if a in self.static else batch_axis(a)))

        gather = Gather(node.name, source_nodes, source_layouts, layouts,
                        lambda ids: run_move(p, node, lambda a: ids[a]))
        native = self._native_move(node, source_layouts, layouts, gather, len(sources) == 1 and sources[0])
        if native is not None:
            return NativeMove(node, operands, native)
        return Move(node, operands, gather.to(self.device), sources)

    def _native_move(self, node: fx.Node, sources: list[Layout], outputs: list[Layout], gather: Gather, source):
        """The movement run as itself on the local tensor (a view, a permute: no copy) when that gives, for one
        image, exactly what the gather would pick; a reshape to the local output shape. None: use the gather."""
        if source is False or gather.pads or sources[0].flat or any(o.flat for o in outputs):
            return None
        reshape = node.target in RESHAPES
        if reshape and len(outputs) != 1:
            return None
        operand = self.propagator.tensor_operands(node)[source]
        ids = torch.arange(sources[0].count, dtype=torch.float64).reshape(sources[0].local_shape)

        def call(x, args, kwargs, batch):
            args = list(args)
            args[0] = x
            if reshape:
                args[1] = list(outputs[0].tensor(x.new_empty((batch, outputs[0].count)), batch).shape)
            return node.target(*args, **kwargs)
        try:
            args = fx.node.map_arg(node.args, lambda a: ids if a is operand else self.propagator.value_of(a))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: self.propagator.value_of(a))
            if node.args[0] is not operand:
                return None
            leaves = [t for t in tree_leaves(call(ids, args, kwargs, 1)) if isinstance(t, torch.Tensor)]
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None
        if len(leaves) != len(outputs) or any(
                tuple(leaf.shape) != layout.local_shape or not torch.equal(layout.rows(leaf, 1)[0].long(), index)
                for leaf, layout, index in zip(leaves, outputs, gather.indices)):
            return None
        return call

    def _mixing(self, node: fx.Node, operands: Operands) -> Step:
        call = self.mixing[node.name]
        plan = self.layers[call.module]
        layout = self._output_layouts(node)[0]
        step = mixing_step(call.module, _mixing_apply(node), plan, self.tensors, self.rank, layout, self.transport,
                           call.in_shape)
        return Exchanging(node, operands, _on_device(step, self.device))

    def _exchange(self, node: fx.Node, operands: Operands) -> Step:
        exchange = self.exchanges[node.name]
        x = node.args[0]
        x_owner = self.propagator.owner_of(x)
        holders = sorted(int(k) for k in x_owner.unique().tolist() if k >= 0)
        if exchange.kind == "layer_norm":
            dims = len(node.args[1])
            total = int(torch.tensor(node.args[1]).prod())
            native = node.target is aten.native_layer_norm.default
            eps = node.args[4] if len(node.args) > 4 else 1e-5
            call = LayerNormStep(node.name, holders, self.rank, dims, total, eps, native)
            return Reducing(node, operands, call, [self._position(node, 2), self._position(node, 3)])
        if exchange.kind == "group_norm":
            return self._group_norm(node, operands)
        return self._reduction(node, operands, exchange, holders, x_owner)

    def _group_norm(self, node: fx.Node, operands: Operands) -> Step:
        """A GroupNorm on this rank's channels, with its own groups (the graph's group count is the whole
        tensor's), exchanging partial sums of the groups whose channels span ranks."""
        x_owner = self.propagator.owner_of(node.args[0])
        native = node.target is aten.native_group_norm.default
        groups = node.args[6] if native else node.args[1]
        eps = node.args[7] if native else (node.args[4] if len(node.args) > 4 else 1e-5)
        channels = x_owner.movedim(1, -1).reshape(-1, x_owner.shape[1])[0].long()
        spatial = x_owner[0, 0].numel() if x_owner.dim() > 2 else 1
        call = GroupNormStep(node.name, channels, self.rank, groups, eps, spatial, native).to(self.device)
        params = [self._position(node, 1), self._position(node, 2)] if native else \
            [self._position(node, 2), self._position(node, 3)]
        return Reducing(node, operands, call, params)

    def _holds_part(self, layouts: list[Layout]) -> bool:
        """This rank holds some elements of the value but not all (what it lacks, another rank holds)."""
        return bool(layouts) and layouts[0].anything and layouts[0].count < layouts[0].held.numel()

    def _reduction(self, node, operands, exchange, holders, x_owner) -> Step:
        from disco.split.rules import _reduced_dims

        dims = _reduced_dims(node, x_owner.dim())
        x = node.args[0]
        total = int(torch.tensor([x_owner.shape[d] for d in dims]).prod())
        correction = node.kwargs.get("correction", 1)
        if node.target is aten.var.dim:
            correction = 1 if (node.args[2] if len(node.args) > 2 else True) else 0
        correction = 1 if correction is None else correction

        def kept_shape(batch):
            return tuple(1 if d in dims else s for d, s in enumerate(shape_at(x, batch)))

        def out_shape(batch):
            return shape_at(node, batch)
        call = ReduceStep(node.name, exchange.kind, holders, self.rank, self.manifest.nodes, dims, kept_shape,
                          out_shape, total, correction)
        return Reducing(node, operands, call, [], batch_args=True)

    def _position(self, node: fx.Node, arg_index: int) -> int | None:
        """Operand index of node.args[arg_index] among its tensor operands (None: absent)."""
        arg = node.args[arg_index] if len(node.args) > arg_index else None
        if not isinstance(arg, fx.Node):
            return None
        return self.propagator.tensor_operands(node).index(arg)

    # --- running ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, comm: Comm):
        """This rank's values of the model's outputs for the batch `x` (the whole input)."""
        env: dict = {INPUT: x, BATCH: x.shape[0]}
        for index, step in enumerate(self.steps):
            try:
                if self.profile is None:
                    env[step.node] = step.run(env, comm)
                else:
                    with self.profile.step(index, comm):
                        env[step.node] = step.run(env, comm)
            except DiscoError:
                raise
            except Exception as error:  # say which node of the graph, not only torch's words
                raise DiscoError(f"rank {self.rank}: graph node '{step.node.name}' failed on its local tensors: "
                                 f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                                 ) from error
        if self.profile is not None:
            self.profile.runs += 1
        return fx.node.map_arg(self.output_node.args[0], lambda a: env[a])

    def step_names(self) -> list[str]:
        """Each step's readable name: a layer call's is its layer's (numbered when the layer is called again), any
        other step's its graph node's."""
        names, calls = [], {}
        for step in self.steps:
            call = self.mixing.get(step.node.name)
            if call is None:
                names.append(step.node.name)
                continue
            calls[call.module] = calls.get(call.module, 0) + 1
            names.append(call.module if calls[call.module] == 1 else f"{call.module} (call {calls[call.module]})")
        return names

    def start_profiling(self) -> StepProfile:
        """From now on, time every step of every forward (disco run --profile)."""
        self.profile = StepProfile.for_steps(self.steps, self.step_names())
        return self.profile

    # --- output layout (rank 0 assembles the whole output) ---------------------------------------
    def _output_layout(self) -> None:
        """Computed once: the output's owner maps, and which per-image flat positions each rank holds."""
        outputs = self.output_node.args[0]
        nodes, self.output_spec = tree_flatten(outputs)
        self.output_nodes = [n for n in nodes if isinstance(n, fx.Node)]
        self.output_owners = [self._owner(n) for n in self.output_nodes]
        self.output_axes = [batch_axis(n) for n in self.output_nodes]
        self.output_positions = [[(holds(o, k) if k == 0 else (o == k)).flatten().nonzero().flatten()
                                  for o in self.output_owners] for k in range(self.manifest.nodes)]
        # a rank other than 0 holds replicated output elements too, but sends only its own ones
        self.own_in_held = [(o == self.rank).flatten()[holds(o, self.rank).flatten()].nonzero().flatten()
                            .to(self.device) for o in self.output_owners]
        self.output_layouts = [self._layout(o, axis) for o, axis in zip(self.output_owners, self.output_axes)]

    def output_elements(self, rank: int) -> int:
        """Per image, how many output elements `rank` sends rank 0."""
        return sum(p.numel() for p in self.output_positions[rank])

    def output_part(self, local) -> torch.Tensor:
        """[batch, elements] this rank contributes to the output: its own elements (not replicated ones)."""
        leaves = [t for t in tree_flatten(local)[0] if isinstance(t, torch.Tensor)]
        batch = None
        parts = []
        for leaf, own, layout in zip(leaves, self.own_in_held, self.output_layouts):
            axis = layout.axis
            batch = leaf.shape[axis.dim] // axis.per_image if axis is not None else 1
            rows = layout.rows(leaf, batch)
            parts.append(rows if self.rank == 0 else rows[:, own])
        return torch.cat(parts, dim=1)

    def assemble_output(self, parts: dict[int, torch.Tensor]):
        """On rank 0: the whole output from every rank's `output_part`, in the model's output structure."""
        batch = parts[0].shape[0]
        wholes = [torch.zeros((batch, o.numel()), dtype=parts[0].dtype, device=parts[0].device)
                  for o in self.output_owners]
        for rank, part in parts.items():
            start = 0
            for whole, positions in zip(wholes, self.output_positions[rank]):
                whole[:, positions.to(whole.device)] = part[:, start:start + positions.numel()].to(whole.dtype)
                start += positions.numel()
        shaped = [Layout.of(torch.full(tuple(o.shape), float(REPLICATED)), 0, axis).tensor(w, batch)
                  for w, o, axis in zip(wholes, self.output_owners, self.output_axes)]
        leaves = iter(shaped)
        flat = [next(leaves) if isinstance(n, fx.Node) else n for n in tree_flatten(self.output_node.args[0])[0]]
        return tree_unflatten(flat, self.captured.out_spec) if self.captured.out_spec is not None else flat


def _on_device(step, device: torch.device):
    for key, value in vars(step).items():
        if isinstance(value, torch.Tensor):
            setattr(step, key, value.to(device))
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            setattr(step, key, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            setattr(step, key, [v.to(device) for v in value])
    return step


def load_shard(manifest: Manifest, folder: Path, rank: int) -> dict[str, torch.Tensor]:
    """The rank's shard, verified against the manifest (before any communication)."""
    path = verify_shard(manifest, folder, rank)
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as error:  # a damaged file that still matched its hash cannot happen; report anyway
        raise DiscoError(f"could not read shard {path}: {error}") from error


def load_program(manifest: Manifest, folder: Path, rank: int, device: torch.device,
                 model_code: str | Path | None = None) -> LocalProgram:
    """Verify the rank's shard, load it, build the program of the deployment's plans (its largest budget, when it
    carries several: disco/runtime/levels.py builds one per budget).
    `model_code`: the user's model file, for deployments of a model that is not registered (export/trust.py)."""
    return LocalProgram(manifest, load_shard(manifest, folder, rank), rank, device, model_code)
