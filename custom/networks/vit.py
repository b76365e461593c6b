"""The hybrid encoder's transformer: patch and position embeddings, pre-norm ViT blocks, and the
token <-> feature-map reshapes (einops) between the CNN, the ViT and the decoder.

The ViT blocks are MONAI's ``SABlock`` (attention through ``scaled_dot_product_attention``) and
``MLPBlock``, with the reference's dropout and LayerNorm eps (MONAI's ``TransformerBlock`` differs).
The reshapes are einops ``Rearrange`` layers, which TorchScript compiles (einops' functions it does not).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from monai.networks.blocks import MLPBlock, SABlock
from torch import nn

__all__ = ["TokenGrid", "PatchEmbeddings", "resample_position_embeddings", "ViTBlock", "ViTEncoder"]


class TokenGrid(nn.Module):
    """Feature maps (B, C, h, w) <-> tokens (B, h*w, C), row-major over the grid; no parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = Rearrange("b c h w -> b (h w) c")
        self.channels_first = Rearrange("b n c -> b c n")

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h*w, C)."""
        return self.flatten(x)

    def to_map(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, h*w, C) -> (B, C, h, w) for ``grid`` = (h, w)."""
        return self.channels_first(tokens).unflatten(2, [grid[0], grid[1]])

    def resample(self, pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Square-grid position embeddings (1, g*g, C) bicubically interpolated to (1, grid[0]*grid[1], C)."""
        n = pos.shape[1]
        g = int(math.sqrt(n))
        if g * g != n:
            raise ValueError(f"position embeddings of {n} tokens do not form a square grid")
        if grid[0] == g and grid[1] == g:
            return pos
        img = F.interpolate(self.to_map(pos, (g, g)), size=(int(grid[0]), int(grid[1])), mode="bicubic",
                            align_corners=False)
        return self.to_tokens(img)


_GRID = TokenGrid()


def resample_position_embeddings(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Interpolate square-grid position embeddings (1, g*g, C) to (1, grid[0]*grid[1], C), bicubic
    (:meth:`TokenGrid.resample`; what loading weights of another training grid uses)."""
    return _GRID.resample(pos, grid)


class PatchEmbeddings(nn.Module):
    """1x1 patch embedding of the CNN map plus learned position embeddings.

    (B, cin, h, w) -> tokens (B, h*w, hidden). Position embeddings are stored for the training grid
    ``grid`` x ``grid`` and bicubically interpolated when the input grid differs.
    """

    def __init__(self, in_channels: int, hidden_size: int, grid: int, dropout_rate: float = 0.1):
        super().__init__()
        self.grid = grid
        self.patch_embeddings = nn.Conv2d(in_channels, hidden_size, kernel_size=1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid, hidden_size))
        self.dropout = nn.Dropout(dropout_rate)
        self.tokens = TokenGrid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        tokens = self.tokens.to_tokens(self.patch_embeddings(x))
        pos = self.position_embeddings
        if h != self.grid or w != self.grid:
            pos = self.tokens.resample(pos, (h, w))
        return self.dropout(tokens + pos)


class ViTBlock(nn.Module):
    """Pre-LayerNorm transformer block (B, N, C) -> (B, N, C): x + attn(norm1(x)), x + mlp(norm2(x)).

    MONAI's ``TransformerBlock`` shares one dropout rate between attention and MLP and uses
    LayerNorm eps 1e-5; the reference has attention dropout 0, MLP dropout 0.1 and eps 1e-6.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, dropout_rate: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = SABlock(
            hidden_size,
            num_heads,
            dropout_rate=0.0,
            qkv_bias=True,
            use_combined_linear=False,
            use_flash_attention=True,
        )
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate=dropout_rate, act="GELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """``num_layers`` ViT blocks and a final LayerNorm: (B, N, C) -> (B, N, C)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, num_layers: int, dropout_rate: float = 0.1):
        super().__init__()
        self.blocks = nn.ModuleList(
            [ViTBlock(hidden_size, num_heads, mlp_dim, dropout_rate) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
