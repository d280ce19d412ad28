"""Swin's shifted-window attention written so DISCO can split it by whole heads.

torchvision's `ShiftedWindowAttention` runs one fused function (`shifted_window_attention`) that takes the
packed qkv weight as a tensor, so the partitioner cannot see its projections. `replace_window_attention`
swaps it for `SplitWindowAttention`, the same function with the same weights:

    pad to whole windows -> q, k, v linears (channel-mixing, whole heads) -> `WindowAttention`
    (shift, windows, softmax(QK^T + bias)V per head: local to the node holding the head) -> proj -> crop

`WindowAttention` is a leaf of the traced graph: it works on channels-last [B, H, W, C] tensors and only
mixes channels inside a head, so a node runs it on its own heads with its own columns of the relative
position bias table. Window partitioning (which merges windows into the batch) stays inside it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from disco.errors import DiscoError

MASKED = -100.0  # torchvision's value for attention between tokens from different regions of a shifted window


def adopt(twin: nn.Module, original: nn.Module, weight: torch.Tensor) -> nn.Module:
    """Give a freshly built split twin the original's device, dtype, weights (not on meta) and mode."""
    twin.to(weight.device, weight.dtype)
    if weight.device.type != "meta":
        twin.load_state_dict(original.state_dict())
    twin.train(original.training)
    return twin


def _window_counts(size: int, window: int) -> int:
    return -(-size // window)


class WindowPad(nn.Module):
    """Zero-pads a channels-last [B, H, W, C] tensor at the bottom/right to whole windows (per channel)."""

    disco_channel_dim = -1

    def __init__(self, window_size: list[int]):
        super().__init__()
        self.window_size = list(window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        pad_h = _window_counts(height, self.window_size[0]) * self.window_size[0] - height
        pad_w = _window_counts(width, self.window_size[1]) * self.window_size[1] - width
        return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class WindowCrop(nn.Module):
    """Crops a padded channels-last tensor back to the height and width of `like` (per channel)."""

    disco_channel_dim = -1

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x[:, :like.shape[1], :like.shape[2], :]


class WindowAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + relative position bias [+ shift mask]) V within (shifted) windows.

    Inputs q, k, v: [B, H, W, C] with H, W whole windows and C = heads x head_dim; the number of heads is
    read from C, so a node passes only its heads (and holds only their bias columns).
    """

    disco_channel_dim = -1

    def __init__(self, window_size: list[int], shift_size: list[int], num_heads: int, head_dim: int,
                 attention_dropout: float = 0.0):
        super().__init__()
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.head_dim, self.attention_dropout = head_dim, attention_dropout
        rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window_size))

    def split_parameters(self, channels: torch.Tensor, node: int) -> dict[str, torch.Tensor]:
        """This module's tensors node `node` needs when its input channels live on `channels`: the bias
        table columns of the heads it holds (heads are whole, so the head's first channel decides)."""
        heads = (channels[::self.head_dim] == node).nonzero().flatten()
        table = self.relative_position_bias_table
        return {"relative_position_bias_table": table.index_select(1, heads.to(table.device)),
                "relative_position_index": self.relative_position_index}

    def _shift(self, height: int, width: int) -> list[int]:
        # a window as large as the map sees all of it: shifting would change nothing but the mask
        sizes = (height, width)
        return [s if w < size else 0 for s, w, size in zip(self.shift_size, self.window_size, sizes)]

    def _to_windows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B * windows, heads, tokens per window, head_dim]."""
        batch, height, width, channels = x.shape
        wh, ww = self.window_size
        x = x.view(batch, height // wh, wh, width // ww, ww, channels // self.head_dim, self.head_dim)
        return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, channels // self.head_dim, wh * ww, self.head_dim)

    def _from_windows(self, x: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
        wh, ww = self.window_size
        heads = x.shape[1]
        x = x.view(batch, height // wh, width // ww, heads, wh, ww, self.head_dim)
        return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, height, width, heads * self.head_dim)

    def _bias(self, heads: int) -> torch.Tensor:
        tokens = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(tokens, tokens, heads).permute(2, 0, 1)

    def _shift_mask(self, height: int, width: int, shift: list[int], device) -> torch.Tensor:
        """[windows, tokens, tokens]: MASKED between tokens that the cyclic shift brought from different
        regions of the map, else 0."""
        region = torch.zeros(height, width, device=device)
        for axis, (size, window, step) in enumerate(zip((height, width), self.window_size, shift)):
            ids = torch.zeros(size, device=device)
            ids[size - window:size - step] = 1
            ids[size - step:] = 2
            region += ids[:, None] * 3 if axis == 0 else ids[None, :]
        wh, ww = self.window_size
        region = region.view(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        different = region[:, None, :] != region[:, :, None]
        return torch.zeros_like(different, dtype=torch.float32).masked_fill(different, MASKED)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = q.shape
        if height % self.window_size[0] or width % self.window_size[1] or channels % self.head_dim:
            raise DiscoError(f"WindowAttention needs whole windows and heads, got {tuple(q.shape)}")
        if channels == 0:  # a node holding none of this block's heads (3 heads on 4 nodes)
            return q
        shift = self._shift(height, width)
        if any(shift):
            q, k, v = (torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2)) for t in (q, k, v))
        q, k, v = (self._to_windows(t) for t in (q, k, v))
        attention = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1) + self._bias(q.shape[1])
        if any(shift):
            mask = self._shift_mask(height, width, shift, q.device).to(attention.dtype)
            windows = mask.shape[0]
            attention = (attention.view(batch, windows, *attention.shape[1:]) + mask[None, :, None]).flatten(0, 1)
        attention = F.dropout(attention.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        out = self._from_windows(attention @ v, batch, height, width)
        return torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2)) if any(shift) else out




def _relative_position_index(window_size: list[int]) -> torch.Tensor:
    """[tokens * tokens]: row of the bias table for each (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size[0]), torch.arange(window_size[1]),
                                        indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rows = (relative[..., 0] + window_size[0] - 1) * (2 * window_size[1] - 1)
    return (rows + relative[..., 1] + window_size[1] - 1).flatten()


class SplitWindowAttention(nn.Module):
    """torchvision ShiftedWindowAttention with separate q/k/v linears (whole heads) and a local core."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise DiscoError(f"dim {dim} is not divisible by num_heads {num_heads}")
        head_dim = dim // num_heads
        self.pad = WindowPad(window_size)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        for projection in (self.q, self.k, self.v):
            projection.disco_channel_block = head_dim
        self.attend = WindowAttention(window_size, shift_size, num_heads, head_dim, attention_dropout)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.dropout = nn.Dropout(dropout)
        self.crop = WindowCrop()

    @classmethod
    def from_torchvision(cls, original: nn.Module) -> "SplitWindowAttention":
        twin = cls(original.qkv.in_features, original.window_size, original.shift_size, original.num_heads,
                   qkv_bias=original.qkv.bias is not None, proj_bias=original.proj.bias is not None,
                   attention_dropout=original.attention_dropout, dropout=original.dropout)
        return adopt(twin, original, original.qkv.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the original module's keys (packed qkv, bias table at the top) as well as our own."""
        for kind in ("weight", "bias"):
            packed = state_dict.pop(f"{prefix}qkv.{kind}", None)
            if packed is not None:
                for name, part in zip("qkv", packed.chunk(3)):
                    state_dict[f"{prefix}{name}.{kind}"] = part
        for key in ("relative_position_bias_table", "relative_position_index"):
            if f"{prefix}{key}" in state_dict:
                state_dict[f"{prefix}attend.{key}"] = state_dict.pop(f"{prefix}{key}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = self.pad(x)
        out = self.attend(self.q(padded), self.k(padded), self.v(padded))
        return self.crop(self.dropout(self.proj(out)), x)
