"""A rank's local sub-network, built from the manifest and the rank's own shard only.

The deployment's graph (deployment_graph.py: the model captured without weights, every value's owner followed with
the manifest's plans) is read as this rank sees it (rank_graph.py), each graph node becomes a step (step_builder.py),
and the program runs the steps in graph order. Which output elements the rank sends rank 0, and rank 0's assembly of
them, are output.py's.
"""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import fx

from disco.errors import DiscoError
from disco.export.manifest import Manifest, verify_shard
from disco.runtime.comm import Comm
from disco.runtime.deployment_graph import DeploymentGraph
from disco.runtime.fusion import fold_batch_norms
from disco.runtime.output import OutputLayout
from disco.runtime.profiling import StepProfile
from disco.runtime.rank_graph import RankGraph
from disco.runtime.step_builder import build_steps
from disco.runtime.steps import BATCH, INPUT
from disco.transport import get_transport_dtype


class LocalProgram:
    """Runs this rank's part of the model; `forward(x, comm)` returns the rank's local outputs.

    `plans`: the plans to run (default: the manifest's; a deployment with nested budgets has one program per
    budget, disco/runtime/levels.py). `fold`: fold BatchNorms into their convs (a program per budget does not:
    each budget has its own statistics, and folded weights would be stored once per budget). `graph`: the
    deployment's graph when several ranks or levels share it (default: built here)."""

    def __init__(self, manifest: Manifest, tensors: dict[str, torch.Tensor], rank: int,
                 device: torch.device = torch.device("cpu"), model_code: str | Path | None = None,
                 plans: dict | None = None, fold: bool = True, graph: DeploymentGraph | None = None):
        self.manifest, self.rank, self.device = manifest, rank, device
        self.plans = manifest.plans if plans is None else plans
        self.tensors = {k: v.to(device) for k, v in tensors.items()}
        graph = graph if graph is not None else DeploymentGraph(manifest, tensors, model_code)
        self.captured, self.analysis = graph.captured, graph.analysis
        rank_graph = RankGraph(graph, self.plans, self.tensors, rank, manifest.nodes, device,
                               get_transport_dtype(manifest.transport_dtype))
        self.mixing_calls = rank_graph.mixing_calls
        steps = build_steps(rank_graph)
        # a conv's BatchNorm scales its weight rows: one pass less per layer
        self.steps = fold_batch_norms(steps, rank_graph.norm_tensors) if fold else steps
        self.output_graph_node = next(n for n in rank_graph.graph_nodes() if n.op == "output")
        self.outputs = OutputLayout(rank_graph, self.output_graph_node, self.captured.out_spec)
        self.profile: StepProfile | None = None

    # --- running ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, comm: Comm):
        """This rank's values of the model's outputs for the batch `x` (the whole input)."""
        env: dict = {INPUT: x, BATCH: x.shape[0]}
        for index, step in enumerate(self.steps):
            try:
                if self.profile is None:
                    env[step.graph_node] = step.run(env, comm)
                else:
                    with self.profile.step(index, comm):
                        env[step.graph_node] = step.run(env, comm)
            except DiscoError:
                raise
            except Exception as error:  # say which graph node, not only torch's words
                raise DiscoError(f"rank {self.rank}: graph node '{step.graph_node.name}' failed on its local "
                                 f"tensors: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}") from error
        if self.profile is not None:
            self.profile.runs += 1
        return fx.node.map_arg(self.output_graph_node.args[0], lambda a: env[a])

    def step_names(self) -> list[str]:
        """Each step's readable name: a layer call's is its layer's (numbered when the layer is called again), any
        other step's its graph node's."""
        names, calls = [], {}
        for step in self.steps:
            call = self.mixing_calls.get(step.graph_node.name)
            if call is None:
                names.append(step.graph_node.name)
                continue
            calls[call.module] = calls.get(call.module, 0) + 1
            names.append(call.module if calls[call.module] == 1 else f"{call.module} (call {calls[call.module]})")
        return names

    def start_profiling(self) -> StepProfile:
        """From now on, time every step of every forward (disco run --profile)."""
        self.profile = StepProfile.for_steps(self.steps, self.step_names())
        return self.profile

    # --- the output (rank 0 assembles the whole output: output.py) ---------------------------------------
    def output_elements(self, rank: int) -> int:
        """Per image, how many output elements `rank` sends rank 0."""
        return self.outputs.elements(rank)

    def output_part(self, local) -> torch.Tensor:
        """[batch, elements] this rank contributes to the output: its own elements (not replicated ones)."""
        return self.outputs.part(local)

    def assemble_output(self, parts: dict[int, torch.Tensor]):
        """On rank 0: the whole output from every rank's `output_part`, in the model's output structure."""
        return self.outputs.assemble(parts)


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
