"""The pre-LN transformer block both towers share, on packed (T, D) hidden states.

Parameter names and shapes are OpenCLIP's (`ln_1`, `attn.in_proj_weight`, `attn.out_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`), so a state dict converts by renaming prefixes only. LayerNorm and the MLP
are token-wise; attention is the only place that sees sequence boundaries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megapgs.models.attention import attention
from megapgs.models.partitioned import modifying
from megapgs.packed import Packed


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * width, width)))  # as nn.MHA
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x_TD: torch.Tensor, packed: Packed, causal: bool, backend: str) -> torch.Tensor:
        T, D = x_TD.shape
        qkv_T3HD = F.linear(x_TD, self.in_proj_weight, self.in_proj_bias).view(T, 3, self.heads, D // self.heads)
        q_THd, k_THd, v_THd = qkv_T3HD.unbind(1)
        out_THd = attention(q_THd, k_THd, v_THd, packed, causal, backend)
        return self.out_proj(out_THd.reshape(T, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_width)

    def forward(self, x_TD: torch.Tensor, packed: Packed, causal: bool, backend: str) -> torch.Tensor:
        x_TD = x_TD + self.attn(self.ln_1(x_TD), packed, causal, backend)
        return x_TD + self.mlp(self.ln_2(x_TD))


class Transformer(nn.Module):
    """A stack of blocks; `grad_checkpointing` recomputes each block's activations in backward."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.backend = "sdpa_padded"  # set by the model builder (resolve_backend), once
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_width) for _ in range(layers))
        self.init_weights(width, layers)

    def init_weights(self, width: int, layers: int) -> None:
        # OpenCLIP's text-tower scheme (std shrinking with depth for the residual projections)
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.resblocks:  # one block at a time whole, under zero.Init (models/partitioned.py)
            with modifying(block.parameters()):
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x_TD: torch.Tensor, packed: Packed) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x_TD = checkpoint(block, x_TD, packed, self.causal, self.backend, use_reentrant=False)
            else:
                x_TD = block(x_TD, packed, self.causal, self.backend)
        return x_TD
