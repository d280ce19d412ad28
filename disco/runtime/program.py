"""A rank's local sub-network, built from the manifest and the rank's own shard only.

The architecture is rebuilt on the meta device (no weights), traced, and the owner propagation is run
with each layer's exported assignment, so every value's local layout on this rank is known. Then each
graph node becomes a step: channel-mixing layers exchange channels (mixing.py), data movement becomes a
gather (layout.py), other modules get their per-channel parameters from the shard, and the rest runs
unchanged on the local tensors.
"""
from __future__ import annotations

import copy
from pathlib import Path

import safetensors.torch
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from disco.errors import DiscoError, UnsupportedOperationError
from disco.export.manifest import Manifest, verify_shard
from disco.export.trust import build_deployed_model
from disco.split.partitioner import eval_mode
from disco.split.attention import replace_attention
from disco.split.propagate import propagate, trace
from disco.split.rules import OpKind, kind_of_node
from disco.runtime.comm import Comm
from disco.runtime.fusion import fold_batch_norms
from disco.runtime.layout import Gather, NarrowOperands, local_shape
from disco.split.assignment import holds
from disco.runtime.mixing import mixing_step
from disco.runtime.norm import NormStep
from disco.runtime.profiling import StepProfile
from disco.runtime.steps import BATCH, INPUT, Constant, Exchanging, Input, Local, Move, Nothing, ShapeQuery, Step
from disco.transport import get_transport_dtype

SHAPE_METHODS = ("size", "dim")


def _meta_model(manifest: Manifest, model_code: str | Path | None) -> nn.Module:
    with torch.device("meta"):
        model = build_deployed_model(manifest.model, model_code)
    return replace_attention(model).eval()


def _chooser(layers: dict):
    def choose(name: str, module: nn.Module, in_assign: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        plan = layers.get(name)
        if plan is None:
            raise DiscoError(f"the model spec has a layer {name!r} that the manifest does not plan")
        if not torch.equal(plan.in_assign, in_assign.cpu()):
            raise DiscoError(f"layer {name!r} receives its channels on other nodes than the manifest says; the "
                             "model spec does not rebuild the exported model")
        return plan.out_assign
    return choose


def _has_tensor(value) -> bool:
    return any(isinstance(t, torch.Tensor) for t in tree_flatten(value)[0])


def _to_device(step, device: torch.device):
    for key, value in vars(step).items():
        if isinstance(value, torch.Tensor):
            setattr(step, key, value.to(device))
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            setattr(step, key, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            setattr(step, key, [v.to(device) for v in value])
    return step


class LocalProgram:
    """Runs this rank's part of the model; `forward(x, comm)` returns the rank's local outputs.

    `layers`: the plans to run (default: the manifest's; a deployment with nested budgets has one program per
    budget, disco/runtime/levels.py). `fold`: fold BatchNorms into their convs (a program per budget does not:
    each budget has its own statistics, and folded weights would be stored once per budget)."""

    def __init__(self, manifest: Manifest, tensors: dict[str, torch.Tensor], rank: int,
                 device: torch.device = torch.device("cpu"), model_code: str | Path | None = None,
                 layers: dict | None = None, fold: bool = True):
        self.manifest, self.rank, self.device = manifest, rank, device
        self.layers = manifest.layers if layers is None else layers
        self.tensors = {k: v.to(device) for k, v in tensors.items()}
        self.graph_module = trace(_meta_model(manifest, model_code))
        with eval_mode(self.graph_module):
            example = (torch.empty((1, *manifest.input_shape), device="meta"),)
            propagator = propagate(self.graph_module, example, manifest.nodes, _chooser(self.layers))
        self.owners = propagator.owners
        self.norms = propagator.analysis.norms
        planned = {call.module for call in propagator.analysis.mixing}
        if planned != set(self.layers):
            raise DiscoError(f"the manifest plans layers the model spec does not call: "
                             f"{sorted(set(self.layers) - planned)[:4]}")
        self.transport = get_transport_dtype(manifest.transport_dtype)
        steps = [step for step in map(self._step, self.graph_module.graph.nodes) if step is not None]
        # a conv's BatchNorm scales its weight rows: one pass less per layer
        self.steps = fold_batch_norms(steps) if fold else steps
        self.output_node = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        self.profile: StepProfile | None = None
        self._output_layout()

    # --- building ---------------------------------------------------------------------------------
    def _step(self, node: fx.Node) -> Step | None:
        if node.op == "placeholder":
            return Input(node)
        if node.op == "output":
            return None
        if node.op == "get_attr":
            return Constant(node, self._attribute(node.target))
        if not _has_tensor(self.owners[node]):
            return ShapeQuery(node, self.owners[node.args[0]].shape) if self._is_shape_query(node) else Local(node)
        module = self.graph_module.get_submodule(node.target) if node.op == "call_module" else None
        kind = self._kind(node, module)
        if kind is OpKind.MIXING:
            out_shape = local_shape(self.owners[node], self.rank, node.name)
            step = mixing_step(node.target, module, self.layers[node.target], self.tensors, self.rank,
                               out_shape, self.transport)
            return Exchanging(node, _to_device(step, self.device))
        if kind is OpKind.MOVE:
            return Move(node, _to_device(Gather(node, self.owners, self.rank, module), self.device))
        if kind is OpKind.NORM:
            channels = next(n.channels for n in self.norms if n.node == node.name)
            return Exchanging(node, NormStep(node.target, module, channels, self._local_module(node.target, module),
                                             self.rank))
        if self._holds_nothing(node):
            return Nothing(node, local_shape(self.owners[node], self.rank, node.name))
        if module is not None:
            return Local(node, self._local_module(node.target, module))
        if kind is OpKind.ELEMENTWISE:
            narrowing = NarrowOperands(node, self.owners, self.rank)
            return Local(node, narrow=_to_device(narrowing, self.device) if narrowing.picks else None)
        return Local(node)

    def _holds_nothing(self, node: fx.Node) -> bool:
        owner = self.owners[node]
        return isinstance(owner, torch.Tensor) and owner.dim() > 1 and not bool(holds(owner, self.rank).any())

    @staticmethod
    def _is_shape_query(node: fx.Node) -> bool:
        return ((node.op == "call_method" and node.target in SHAPE_METHODS)
                or (node.op == "call_function" and node.target is getattr and node.args[1] == "shape"))

    @staticmethod
    def _kind(node: fx.Node, module):
        kind = kind_of_node(node, module)
        if kind is None:  # the propagation refused these already; keep the runtime honest anyway
            raise UnsupportedOperationError(node.name, f"{node.op} {node.target}", "unknown to the runtime")
        return kind

    def _attribute(self, target: str) -> torch.Tensor:
        if target not in self.tensors:
            raise DiscoError(f"the shard lacks tensor {target!r}; export again")
        return self.tensors[target]

    def _local_module(self, name: str, module: nn.Module) -> nn.Module:
        """The module with its parameters and buffers replaced by this rank's slices from the shard."""
        if not list(module.parameters(recurse=False)) and not list(module.buffers(recurse=False)):
            return module
        local = copy.copy(module)
        local._parameters = {k: None if v is None else nn.Parameter(self._attribute(f"{name}.{k}"), False)
                             for k, v in module._parameters.items()}
        local._buffers = {k: None if v is None else self._attribute(f"{name}.{k}") for k, v in module._buffers.items()}
        return local

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

    def start_profiling(self) -> StepProfile:
        """From now on, time every step of every forward (disco run --profile)."""
        self.profile = StepProfile.for_steps(self.steps)
        return self.profile

    # --- output layout (rank 0 assembles the whole output) ---------------------------------------
    def _output_layout(self) -> None:
        """Computed once: the output's owner maps, and which per-image flat positions each rank holds."""
        owners, self.output_spec = tree_flatten(fx.node.map_arg(self.output_node.args[0], lambda a: self.owners[a]))
        self.output_owners = [o for o in owners if isinstance(o, torch.Tensor)]
        self.output_positions = [[(holds(o, k) if k == 0 else (o == k)).flatten().nonzero().flatten()
                                  for o in self.output_owners] for k in range(self.manifest.nodes)]
        # a rank other than 0 holds replicated output elements too, but sends only its own ones
        self.own_in_held = [(o == self.rank).flatten()[holds(o, self.rank).flatten()].nonzero().flatten()
                            .to(self.device) for o in self.output_owners]

    def output_elements(self, rank: int) -> int:
        """Per image, how many output elements `rank` sends rank 0."""
        return sum(p.numel() for p in self.output_positions[rank])

    def output_part(self, local) -> torch.Tensor:
        """[batch, elements] this rank contributes to the output: its own elements (not replicated ones)."""
        parts = []
        for leaf, own in zip(_tensor_leaves(local), self.own_in_held):
            flat = leaf.reshape(leaf.shape[0], -1)
            parts.append(flat if self.rank == 0 else flat[:, own])
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
        shaped = [w.reshape(batch, *o.shape[1:]) for w, o in zip(wholes, self.output_owners)]
        return tree_unflatten(shaped, self.output_spec)


def _tensor_leaves(value) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


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
