"""TransUNet for 2D grayscale electron microscopy (the RETINA network).

A hybrid encoder (ResNetV2 CNN with weight-standardised convolutions, then a pre-norm ViT on the
1/16 feature map) and a "cup" decoder with skip connections from the CNN, ending in a
segmentation head (logits) or a reconstruction head (pretraining). Composed from named blocks:

    ResNetV2 -> PatchEmbeddings -> ViTEncoder -> CupDecoder -> head

The ViT blocks are MONAI's ``SABlock`` (attention through ``scaled_dot_product_attention``) and
``MLPBlock``; the CNN's weight-standardised convolution and the decoder are written here because
MONAI has no equivalent with the reference's numerics (GroupNorm eps, zero-padded skips).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, SABlock
from torch import nn

__all__ = [
    "PRESETS",
    "StdConv2d",
    "Bottleneck",
    "ResNetV2",
    "PatchEmbeddings",
    "ViTBlock",
    "ViTEncoder",
    "DecoderBlock",
    "CupDecoder",
    "TransUNet",
    "transunet_from_preset",
    "resample_position_embeddings",
    "head_mismatch",
    "HeadMismatchError",
    "encode_record",
    "decode_record",
]

HEADS = ("segmentation", "reconstruction")

PRESETS: dict[str, dict] = {
    # width of the authors' released fine-tuning code and fine-tuned checkpoints
    "retina": dict(hidden_size=192, num_heads=12, mlp_dim=768, num_layers=12),
    # ViT-B/16 hybrid: what the authors' released pretraining script builds
    "vit_b": dict(hidden_size=768, num_heads=12, mlp_dim=3072, num_layers=12),
    # tests and demos on a CPU
    "tiny": dict(
        hidden_size=32,
        num_heads=4,
        mlp_dim=64,
        num_layers=2,
        cnn_units=(1, 1, 1),
        cnn_width=32,
        decoder_channels=(64, 32, 16, 8),
    ),
}


class StdConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel over (cin, kh, kw), eps 1e-5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        tokens = self.patch_embeddings(x).flatten(2).transpose(1, 2)
        pos = self.position_embeddings
        if h != self.grid or w != self.grid:
            pos = resample_position_embeddings(pos, (h, w))
        return self.dropout(tokens + pos)


def resample_position_embeddings(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Interpolate square-grid position embeddings (1, g*g, C) to (1, grid[0]*grid[1], C), bicubic."""
    n, c = pos.shape[1], pos.shape[2]
    g = int(math.sqrt(n))
    if g * g != n:
        raise ValueError(f"position embeddings of {n} tokens do not form a square grid")
    if grid[0] == g and grid[1] == g:
        return pos
    img = pos.reshape(1, g, g, c).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(int(grid[0]), int(grid[1])), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, int(grid[0]) * int(grid[1]), c)


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
        self.conv_more = _conv_bn_relu(hidden_size, head_channels)
        cins = [head_channels] + list(decoder_channels[:-1])
        skips = [skip_channels[i] if i < min(n_skip, len(skip_channels)) else 0 for i in range(len(decoder_channels))]
        self.blocks = nn.ModuleList([DecoderBlock(ci, co, s) for ci, co, s in zip(cins, decoder_channels, skips)])

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], features: list[torch.Tensor]) -> torch.Tensor:
        b, _, c = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            skip = features[i] if i < self.n_skip and i < len(features) else None
            x = block(x, skip)
        return x


class TransUNet(nn.Module):
    """TransUNet (R50-ViT hybrid) for 2D grayscale EM.

    Args:
        img_size: training image size (multiple of 16); sets the position-embedding grid.
        in_channels: 1 (grayscale, repeated to the CNN's 3 channels) or 3.
        out_channels: segmentation classes (1 for binary); ignored by the reconstruction head (1).
        head: ``"segmentation"`` (3x3 conv to logits) or ``"reconstruction"`` (3x3 conv to 1, linear).
        hidden_size, num_heads, mlp_dim, num_layers: ViT sizes.
        cnn_units: bottleneck units per CNN stage; cnn_width: root channels (64 in R50).
        decoder_channels: channels of the four decoder blocks; n_skip: skips used (3).
        dropout_rate: embedding and MLP dropout.

    Shapes: (B, in_channels, H, W) with H, W multiples of 16 -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        img_size: int = 224,
        in_channels: int = 1,
        out_channels: int = 1,
        head: str = "segmentation",
        hidden_size: int = 192,
        num_heads: int = 12,
        mlp_dim: int = 768,
        num_layers: int = 12,
        cnn_units: Sequence[int] = (3, 4, 9),
        cnn_width: int = 64,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        n_skip: int = 3,
        dropout_rate: float = 0.1,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if len(cnn_units) != 3 or len(decoder_channels) != 4:
            raise ValueError("cnn_units needs 3 stages and decoder_channels 4 blocks")
        self.img_size = img_size
        self.in_channels = in_channels
        self.head_kind = head
        self.out_channels = 1 if head == "reconstruction" else out_channels
        self.cnn = ResNetV2(cnn_units, cnn_width)
        self.embeddings = PatchEmbeddings(self.cnn.out_channels, hidden_size, img_size // 16, dropout_rate)
        self.transformer = ViTEncoder(hidden_size, num_heads, mlp_dim, num_layers, dropout_rate)
        self.decoder = CupDecoder(hidden_size, decoder_channels, self.cnn.skip_channels, n_skip)
        self.head = nn.Conv2d(decoder_channels[-1], self.out_channels, kernel_size=3, padding=1)
        # how images were mapped to this network's input (custom.intensity); saved with the weights
        self.input_intensity = None

    # The state dict carries what the weights are for (torch's documented extra-state hook), so a
    # pretraining checkpoint is never taken for a segmentation one and every checkpoint knows its input.
    # It is JSON in a uint8 tensor: tools that treat every state-dict value as a tensor keep working.
    @torch.jit.unused
    def get_extra_state(self) -> torch.Tensor:
        """``{"head", "out_channels", "input_intensity"}`` as :func:`encode_record`, the ``_extra_state`` entry."""
        return encode_record(
            {"head": self.head_kind, "out_channels": self.out_channels, "input_intensity": self.input_intensity}
        )

    @torch.jit.unused
    def set_extra_state(self, state) -> None:
        """Restore ``input_intensity``; refuse weights trained for the other head (same keys and shapes)."""
        record = decode_record(state)
        head = record.get("head", self.head_kind)
        if head != self.head_kind:
            raise HeadMismatchError(head_mismatch(head, self.head_kind))
        if record.get("input_intensity") is not None:
            self.input_intensity = dict(record["input_intensity"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        feats, skips = self.cnn(x)
        grid = (feats.shape[-2], feats.shape[-1])
        tokens = self.transformer(self.embeddings(feats))
        return self.head(self.decoder(tokens, grid, skips))


def encode_record(record: dict) -> torch.Tensor:
    """A JSON-ready dict as a 1D uint8 tensor (its UTF-8 JSON text)."""
    return torch.tensor(list(json.dumps(record, sort_keys=True).encode("utf-8")), dtype=torch.uint8)


def decode_record(value) -> dict:
    """Inverse of :func:`encode_record`; a dict is returned as it is, anything unreadable as ``{}``."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.ndim == 1:
        try:
            out = json.loads(bytes(value.tolist()).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {}
        return out if isinstance(out, dict) else {}
    return {}


class HeadMismatchError(ValueError):
    """Weights trained for another head (reported by ``custom.errors`` as a checkpoint error)."""


def head_mismatch(saved: str, wanted: str) -> str:
    """Why weights of head ``saved`` cannot serve a network with head ``wanted`` (one line)."""
    what = {"reconstruction": "a pretraining (reconstruction) checkpoint",
            "segmentation": "a fine-tuned segmentation checkpoint"}
    use = {"segmentation": "use the retina_finetune bundle's models/model.pt (or pass it as a pretrained_path "
                           "for fine-tuning)",
           "reconstruction": "use the retina_pretrain bundle's models/model.pt"}
    return f"the weights are {what.get(saved, saved)}, not {what.get(wanted, wanted)}; {use.get(wanted, '')}"


def transunet_from_preset(preset: str = "retina", **overrides) -> TransUNet:
    """Build a :class:`TransUNet` from a named preset (``PRESETS``), any argument overridable."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return TransUNet(**{**PRESETS[preset], **overrides})
