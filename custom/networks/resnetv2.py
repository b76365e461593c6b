"""The hybrid encoder's CNN: a ResNetV2 with weight-standardised convolutions and GroupNorm.

MONAI has no equivalent with the reference's numerics (weight standardisation eps 1e-5, GroupNorm
eps 1e-6, an unpadded max-pool whose smaller outputs are zero-padded before they serve as skips).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StdConv2d", "Bottleneck", "ResNetV2"]


class StdConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel over (cin, kh, kw), eps 1e-5.

    Training standardises at every forward (the gradient flows through it). For inference
    :meth:`fold` computes the standardised weight once into the non-persistent buffer
    ``folded_weight`` (not in the state dict, so checkpoints are unchanged); eval-mode forwards use
    it. ``train()`` and loading weights drop it, so a stale fold is never used.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(_drop_fold)  # new weights: the fold is stale

    def standardised_weight(self) -> torch.Tensor:
        """The weight (cout, cin, kh, kw) standardised per output channel."""
        var, mean = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return (self.weight - mean) / torch.sqrt(var + 1e-5)

    def fold(self, dtype: Optional[torch.dtype] = None) -> None:
        """Keep the standardised weight for eval-mode forwards (in place when one is kept already).

        ``dtype``: keep it in that dtype (the autocast dtype inference runs in: autocast caches the
        casts of parameters only, so a folded fp32 buffer would be cast again at every call).
        """
        # a normal tensor even inside inference_mode, so eval forwards outside it may still need gradients
        with torch.inference_mode(False), torch.no_grad():
            w = self.standardised_weight().to(dtype or self.weight.dtype)
            kept = self.folded_weight
            if (kept is not None and kept.shape == w.shape and kept.dtype == w.dtype and kept.device == w.device
                    and not kept.is_inference()):
                kept.copy_(w)  # same tensor: a compiled graph that captured it stays valid
            else:
                self.folded_weight = w

    def unfold(self) -> None:
        """Drop the folded weight (forwards standardise again)."""
        self.folded_weight = None

    def train(self, mode: bool = True):
        if mode:
            self.unfold()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self.folded_weight
        if folded is None or self.training:
            return F.conv2d(x, self.standardised_weight(), self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        if folded.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            folded = folded.to(x.dtype)  # a fold kept in bf16, used outside autocast
        return F.conv2d(x, folded, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _drop_fold(module: StdConv2d, incompatible_keys) -> None:
    module.unfold()


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels, eps=1e-6)


class Bottleneck(nn.Module):
    """ResNetV2 bottleneck unit: (B, cin, H, W) -> (B, cout, H/stride, W/stride).

    conv1x1-GN-ReLU, conv3x3(stride)-GN-ReLU, conv1x1-GN, plus the (projected) shortcut, ReLU.
    """

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1):
        super().__init__()
        self.gn1 = _gn(cmid)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn2 = _gn(cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False)
        self.gn3 = _gn(cout)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        self.gn_proj: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride=stride, bias=False)
            self.gn_proj = nn.GroupNorm(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.downsample is not None and self.gn_proj is not None:
            residual = self.gn_proj(self.downsample(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)


def _stage(cin: int, cout: int, cmid: int, units: int, stride: int) -> nn.Sequential:
    layers = [(f"unit{i + 1}", Bottleneck(cin if i == 0 else cout, cout, cmid, stride if i == 0 else 1)) for i in range(units)]
    return nn.Sequential(OrderedDict(layers))


class ResNetV2(nn.Module):
    """The hybrid encoder's CNN: (B, 3, H, W) -> features (B, 16w, H/16, W/16) and skips.

    Skips, deepest first: stage-2 output (8w ch, H/8), stage-1 output (4w ch, H/4), root output
    (w ch, H/2), where w is ``width``. A stage output smaller than its nominal size (the unpadded
    max-pool makes 224 -> 55) is zero-padded at the bottom/right before it is used as a skip.
    """

    def __init__(self, units: Sequence[int] = (3, 4, 9), width: int = 64):
        super().__init__()
        w = width
        self.root = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(3, w, 7, stride=2, padding=3, bias=False),
                gn=_gn(w),
                relu=nn.ReLU(inplace=True),
            )
        )
        self.pool = nn.MaxPool2d(3, stride=2, padding=0)
        stages = []
        cin = w
        for i, n in enumerate(units):
            cout, cmid = w * 4 * 2**i, w * 2**i
            stages.append((f"block{i + 1}", _stage(cin, cout, cmid, n, 1 if i == 0 else 2)))
            cin = cout
        self.body = nn.Sequential(OrderedDict(stages))
        self.out_channels = cin
        self.skip_channels = [w * 4 * 2 ** (len(units) - 2 - i) for i in range(len(units) - 1)] + [w]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, w = x.shape[-2], x.shape[-1]
        x = self.root(x)
        features = [x]
        x = self.pool(x)
        n = len(self.body)
        for i, stage in enumerate(self.body):
            x = stage(x)
            if i < n - 1:
                scale = 4 << i
                th, tw = h // scale, w // scale
                features.append(F.pad(x, [0, tw - x.shape[-1], 0, th - x.shape[-2]]))
        return x, features[::-1]
