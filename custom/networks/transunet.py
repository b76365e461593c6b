"""TransUNet for 2D grayscale electron microscopy (the RETINA network), and its presets.

A hybrid encoder (:class:`~custom.networks.resnetv2.ResNetV2`, then a pre-norm ViT on the 1/16
feature map, :mod:`custom.networks.vit`) and a "cup" decoder with skip connections from the CNN
(:mod:`custom.networks.decoder`), ending in a segmentation head (logits) or a reconstruction head
(pretraining)::

    ResNetV2 -> PatchEmbeddings -> ViTEncoder -> CupDecoder -> head

The state dict carries what the weights are for (``get_extra_state``: head kind, output channels,
the intensity record of ``custom.intensity``), so a pretraining checkpoint is never taken for a
segmentation one.
"""

from __future__ import annotations

import json
from typing import Sequence

import torch
from torch import nn

from custom.errors import HeadMismatchError

from .decoder import CupDecoder
from .resnetv2 import ResNetV2
from .vit import PatchEmbeddings, ViTEncoder

__all__ = [
    "HEADS",
    "PRESETS",
    "TransUNet",
    "transunet_from_preset",
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
