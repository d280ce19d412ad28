"""Multi-head attention written with separate q/k/v/out linears, so DISCO can split it by whole heads.

`nn.MultiheadAttention` runs as one fused function, so the partitioner cannot see its projections.
`replace_attention(model)` swaps every (batch-first, self-attention style) instance for `SplitAttention`,
which computes the same function with the same weights (the packed `in_proj_weight` is cut into q, k, v)
and still loads state dicts written for the original module. Its q/k/v linears carry `disco_channel_block
= head_dim`, so the partitioner assigns their outputs in whole heads and softmax(QK^T)V stays local.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from disco.errors import DiscoError
from disco.split.modules import replace_submodule
from disco.split.window_attention import SplitWindowAttention, adopt
from torchvision.models.swin_transformer import ShiftedWindowAttention


class SplitAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise DiscoError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout = dropout
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            projection.disco_channel_block = self.head_dim

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "SplitAttention":
        if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise DiscoError("only batch-first nn.MultiheadAttention with equal q/k/v sizes and no bias_k/"
                             "add_zero_attn can be split")
        twin = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, dropout=mha.dropout)
        return adopt(twin, mha, mha.in_proj_weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the original module's packed keys (in_proj_weight/in_proj_bias) as well as our own."""
        for kind in ("weight", "bias"):
            packed = state_dict.pop(f"{prefix}in_proj_{kind}", None)
            if packed is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), packed.chunk(3)):
                    state_dict[f"{prefix}{name}.{kind}"] = part
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _heads(self, x: torch.Tensor, batch, tokens) -> torch.Tensor:
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batch, tokens = query.shape[0], query.shape[1]
        q = self._heads(self.q_proj(query), batch, tokens)
        k = self._heads(self.k_proj(key), batch, key.shape[1])
        v = self._heads(self.v_proj(value), batch, value.shape[1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, tokens, self.embed_dim)
        return self.out_proj(out), None


def _split_twin(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.MultiheadAttention):
        return SplitAttention.from_multihead(module)
    if isinstance(module, ShiftedWindowAttention) and not hasattr(module, "logit_scale"):
        # Swin V2's cosine attention with a position MLP is left as it is: the captured graph's rules split it
        return SplitWindowAttention.from_torchvision(module)
    return None


def replace_attention(model: nn.Module) -> nn.Module:
    """Swap every nn.MultiheadAttention (ViT) and ShiftedWindowAttention (Swin) in `model`, in place, for
    an equivalent module with separate q/k/v linears (SplitAttention, SplitWindowAttention)."""
    for name, module in list(model.named_modules()):
        twin = _split_twin(module)
        if twin is not None:
            replace_submodule(model, name, twin)
    return model
