"""The split plan of one channel-mixing layer: the one place that says which node holds, computes, sends and
receives what (docs/method.md 8).

The partitioner builds it (disco/split/partitioner.py); the simulation layer applies it (layers.py), the cost
report counts it (disco/accounting), the shard writer cuts weights by it (disco/export/shards.py), the manifest
serialises it (`to_json` / `from_json`) and the runtime executes it (disco/runtime/mixing.py). None of them
re-derives any of it.

Conventions, all defined here:
- `in_assign[c]`: node of input channel c, REPLICATED (-1) for data every node has; `out_assign[o]`: node of
  output channel o. Node k *holds* input channel c when c is its own or replicated (`holds`).
- A communication group (c -> k) exists when k does not hold c and some output row of k reads c (a grouped
  conv's row reads only its group's channels). `mask[k, c]` keeps (1) or drops (0) it; it may be a float
  tensor that requires grad (the sparsifier's importance is d loss / d mask).
- What node s sends node k: the kept groups (c -> k) with in_assign[c] == s, in increasing channel order.
- Node k's weight blocks: its output rows (increasing), split into the columns of the channels it holds
  ("local", increasing) and the columns it receives ("remote": by source node, then channel; the order in
  which the runtime concatenates what arrives). Grouped convs keep whole rows ("grouped", dropped columns
  zeroed), because the grouped kernel needs every column of a group.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from disco.errors import DiscoError
from disco.split.assignment import holds

WEIGHT_LOCAL, WEIGHT_REMOTE, WEIGHT_GROUPED = "weight.local", "weight.remote", "weight.grouped"


@dataclass(eq=False)
class SplitPlan:
    """How one channel-mixing layer is split across `nodes` (see the module docstring)."""

    nodes: int
    in_assign: torch.Tensor
    out_assign: torch.Tensor
    conv_groups: int = 1
    channel_dim: int = 1  # dim of channels in the layer's input and output activations
    mask: torch.Tensor | None = None  # [nodes, in_channels]; None: every group kept

    def __post_init__(self) -> None:
        # shapes only: a simulation layer builds its plan on every forward, where reading values would make a
        # GPU wait; the values of a plan from outside (a manifest) are checked by from_json
        channels_in, channels_out = self.in_assign.numel(), self.out_assign.numel()
        if channels_in % self.conv_groups or channels_out % self.conv_groups:
            raise DiscoError(f"{channels_in} input / {channels_out} output channels do not split into "
                             f"{self.conv_groups} conv groups")
        if self.mask is not None and tuple(self.mask.shape) != (self.nodes, channels_in):
            raise DiscoError(f"group mask must have shape {(self.nodes, channels_in)}, got {tuple(self.mask.shape)}")

    @property
    def in_channels(self) -> int:
        return self.in_assign.numel()

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.conv_groups

    # --- who holds and computes what ------------------------------------------------------------------
    def held(self) -> torch.Tensor:
        """[nodes, in_channels] bool: channels node k has without communication."""
        node_ids = torch.arange(self.nodes, device=self.in_assign.device)[:, None]
        return holds(self.in_assign[None], node_ids)

    def held_channels(self, node: int) -> torch.Tensor:
        return holds(self.in_assign, node).nonzero().flatten()

    def held_positions(self, node: int) -> torch.Tensor:
        """[in_channels]: where each input channel sits in node's local input (its held channels, increasing),
        -1 where node does not hold it."""
        held = self.held_channels(node).cpu()
        position = torch.full((self.in_channels,), -1, dtype=torch.long)
        position[held] = torch.arange(held.numel())
        return position

    def rows(self, node: int) -> torch.Tensor:
        """Output channels node computes, increasing."""
        return (self.out_assign == node).nonzero().flatten()

    def outputs_per_group(self) -> torch.Tensor:
        """[nodes, conv groups]: how many output channels of each conv group node k computes."""
        group_of_output = torch.arange(self.out_assign.numel(), device=self.out_assign.device)
        group_of_output = group_of_output // max(self.out_assign.numel() // self.conv_groups, 1)
        counts = torch.zeros(self.nodes, self.conv_groups, dtype=torch.long, device=self.out_assign.device)
        counts.index_put_((self.out_assign, group_of_output), torch.ones_like(self.out_assign), accumulate=True)
        return counts

    # --- communication groups -------------------------------------------------------------------------
    def possible_groups(self) -> torch.Tensor:
        """[nodes, in_channels] bool: groups (c -> k) that exist."""
        reads = (self.outputs_per_group() > 0).repeat_interleave(self.in_per_group, dim=1)
        return reads & ~self.held()

    def kept_groups(self) -> torch.Tensor:
        """[nodes, in_channels] bool: existing groups the mask keeps."""
        possible = self.possible_groups()
        return possible if self.mask is None else possible & (self.mask.detach() > 0)

    def keep_matrix(self) -> torch.Tensor:
        """[nodes, in_channels] 0/1: input channels node k uses (held or received). Built with torch.where so a
        mask that requires grad gets d(loss)/d(mask)."""
        if self.mask is None:
            return (self.held() | self.possible_groups()).float()
        return torch.where(self.held(), torch.ones_like(self.mask), self.mask)

    def sends(self) -> list[list[torch.Tensor]]:
        """[src][dst]: the input channels src sends dst (increasing)."""
        return self._send_table

    @cached_property
    def _send_table(self) -> list[list[torch.Tensor]]:  # read by several questions below; a plan is not mutated
        kept = self.kept_groups()
        return [[(kept[dst] & (self.in_assign == src)).nonzero().flatten().cpu() for dst in range(self.nodes)]
                for src in range(self.nodes)]

    def sent_channels(self, groups: torch.Tensor | None = None) -> torch.Tensor:
        """[src, dst] number of channels sent (of the kept groups, or of `groups`, e.g. possible_groups())."""
        groups = self.kept_groups() if groups is None else groups
        matrix = torch.zeros(self.nodes, self.nodes, dtype=torch.long)
        dst, channel = groups.cpu().nonzero(as_tuple=True)
        src = self.in_assign.cpu()[channel]
        matrix.index_put_((src, dst), torch.ones_like(src), accumulate=True)
        return matrix

    def received_channels(self, node: int) -> torch.Tensor:
        """The channels node receives, in the order the runtime concatenates them (source, then channel)."""
        per_source = [row[node] for src, row in enumerate(self.sends()) if src != node]
        return torch.cat(per_source) if per_source else torch.zeros(0, dtype=torch.long)

    def send_positions(self, src: int) -> dict[int, torch.Tensor]:
        """{dst: positions of the channels src sends dst within src's held channels} (non-empty only)."""
        position = self.held_positions(src)
        return {dst: position[channels] for dst, channels in enumerate(self.sends()[src])
                if dst != src and channels.numel()}

    def receive_counts(self, node: int) -> dict[int, int]:
        """{src: number of channels node receives from src}, by source (non-empty only)."""
        return {src: row[node].numel() for src, row in enumerate(self.sends()) if src != node and row[node].numel()}

    # --- weights ----------------------------------------------------------------------------------------
    def input_columns(self) -> torch.Tensor:
        """[out, in_per_group]: the global input channel each weight column reads."""
        out_channels = self.out_assign.numel()
        group_of_output = torch.arange(out_channels, device=self.in_assign.device) // (out_channels // self.conv_groups)
        return group_of_output[:, None] * self.in_per_group + torch.arange(self.in_per_group,
                                                                           device=self.in_assign.device)

    def weight_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The 0/1 mask of `weight` (1 = its row's node holds and uses that column), broadcast over kernel dims."""
        return self._per_weight(self.keep_matrix(), weight)

    def weight_masks(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`weight_mask` split in two: the columns each row's node holds (local) and those it receives (remote,
        which cross the network and so go through the transport dtype's rounding). They add up to weight_mask."""
        held, keep = self.held(), self.keep_matrix()
        remote = torch.where(held, torch.zeros_like(keep), keep)
        return self._per_weight(held.float(), weight), self._per_weight(remote, weight)

    def _per_weight(self, matrix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A [nodes, in_channels] matrix read for each weight entry (its row's node, its column's channel)."""
        rows = matrix[self.out_assign]
        if self.conv_groups > 1:
            rows = rows.gather(1, self.input_columns())
        mask = rows.to(weight.dtype)
        return mask.reshape(mask.shape + (1,) * (weight.dim() - 2))

    def weight_pairs_per_node(self, dense: bool = False) -> torch.Tensor:
        """[nodes]: (output, input) weight pairs each node holds (kept, or every group with dense=True)."""
        used = self.in_per_group if dense else (self.keep_matrix().detach() > 0).reshape(
            self.nodes, self.conv_groups, -1).sum(-1)
        return (self.outputs_per_group() * used).sum(-1)

    def received_weight_pairs_per_node(self) -> torch.Tensor:
        """[nodes]: the kept weight pairs whose input channel node k receives (computed once it has arrived)."""
        received = self.kept_groups().reshape(self.nodes, self.conv_groups, -1).sum(-1)
        return (self.outputs_per_group() * received).sum(-1)

    def weight_blocks(self, weight: torch.Tensor, node: int) -> dict[str, torch.Tensor]:
        """Node's part of `weight` by block name (see the module docstring); grouped convs: one block."""
        rows = self.rows(node).to(weight.device)
        if self.conv_groups > 1:
            return {WEIGHT_GROUPED: (weight * self.weight_mask(weight))[rows]}
        mine = weight[rows]
        return {WEIGHT_LOCAL: mine[:, self.held_channels(node).to(weight.device)],
                WEIGHT_REMOTE: mine[:, self.received_channels(node).to(weight.device)]}

    def group_owners(self) -> torch.Tensor:
        """[conv groups]: the node computing each group's outputs (grouped convs need each group on one node)."""
        owner = self.out_assign.reshape(self.conv_groups, -1)
        if not bool((owner == owner[:, :1]).all()):
            raise DiscoError("a conv group's outputs are split across nodes; each group must sit on one node")
        return owner[:, 0]

    # --- serialisation (the manifest) -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"in_assign": self.in_assign.tolist(), "out_assign": self.out_assign.tolist(),
                "conv_groups": self.conv_groups, "channel_dim": self.channel_dim,
                "sends": [[channels.tolist() for channels in row] for row in self.sends()]}

    @classmethod
    def from_json(cls, raw: dict, nodes: int) -> "SplitPlan":
        """The plan a manifest describes: channels on existing nodes, sends naming only existing groups of the
        right sender."""
        try:
            layout = cls(nodes=nodes, in_assign=torch.tensor(raw["in_assign"], dtype=torch.long),
                         out_assign=torch.tensor(raw["out_assign"], dtype=torch.long),
                         conv_groups=int(raw["conv_groups"]), channel_dim=int(raw["channel_dim"]))
            _check_nodes(layout)
            sends = raw["sends"]
            if len(sends) != nodes or any(len(row) != nodes for row in sends):
                raise DiscoError(f"sends must be a {nodes}x{nodes} table")
            kept = torch.zeros(nodes, layout.in_channels, dtype=torch.bool)
            for src, row in enumerate(sends):
                for dst, channels in enumerate(row):
                    channels = torch.tensor(channels, dtype=torch.long)
                    if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= layout.in_channels
                                             or bool((layout.in_assign[channels] != src).any())):
                        raise DiscoError(f"sends[{src}][{dst}] names channels node {src} does not hold")
                    kept[dst, channels] = True
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise DiscoError(f"malformed layer plan ({error})") from None
        if bool((kept & ~layout.possible_groups()).any()):
            raise DiscoError("sends names channels that no output of the receiving node reads")
        return cls(nodes=nodes, in_assign=layout.in_assign, out_assign=layout.out_assign,
                   conv_groups=layout.conv_groups, channel_dim=layout.channel_dim, mask=kept.float())


def _check_nodes(plan: SplitPlan) -> None:
    if plan.out_assign.numel() and not (0 <= int(plan.out_assign.min()) and int(plan.out_assign.max()) < plan.nodes):
        raise DiscoError(f"output channels assigned outside nodes 0..{plan.nodes - 1}")
    if plan.in_channels and not (-1 <= int(plan.in_assign.min()) and int(plan.in_assign.max()) < plan.nodes):
        raise DiscoError(f"input channels assigned outside nodes 0..{plan.nodes - 1} (or -1, replicated)")
