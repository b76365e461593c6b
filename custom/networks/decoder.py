"""The TransUNet "cup" decoder: tokens back to a feature map, then bilinear x2 blocks with CNN skips."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vit import TokenGrid

__all__ = ["DecoderBlock", "CupDecoder"]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Bilinear x2 upsampling (align_corners), concat skip, two conv-BN-ReLU: (B, cin, h, w) -> (B, cout, 2h, 2w)."""

    def __init__(self, cin: int, cout: int, skip_channels: int = 0):
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + skip_channels, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CupDecoder(nn.Module):
    """Tokens (B, h*w, hidden) on an (h, w) grid plus CNN skips -> (B, decoder_channels[-1], 16h, 16w)."""

    def __init__(
        self,
        hidden_size: int,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        skip_channels: Sequence[int] = (512, 256, 64),
        n_skip: int = 3,
        head_channels: int = 512,
    ):
        super().__init__()
        self.n_skip = n_skip
        self.tokens = TokenGrid()
        self.conv_more = _conv_bn_relu(hidden_size, head_channels)
        cins = [head_channels] + list(decoder_channels[:-1])
        skips = [skip_channels[i] if i < min(n_skip, len(skip_channels)) else 0 for i in range(len(decoder_channels))]
        self.blocks = nn.ModuleList([DecoderBlock(ci, co, s) for ci, co, s in zip(cins, decoder_channels, skips)])

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], features: list[torch.Tensor]) -> torch.Tensor:
        x = self.tokens.to_map(tokens, grid)
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            skip = features[i] if i < self.n_skip and i < len(features) else None
            x = block(x, skip)
        return x
