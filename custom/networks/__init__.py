"""The RETINA network: a TransUNet (ResNetV2 + ViT hybrid encoder, cup decoder, head) and its presets.

One concept a file: :mod:`.resnetv2` (the CNN), :mod:`.vit` (embeddings, transformer, the token
reshapes), :mod:`.decoder`, :mod:`.transunet` (the whole network, presets, the weights' record),
:mod:`.prepare` (fast inference: folded weight standardisation, channels-last, compile, precision).
Configs use ``custom.networks.transunet_from_preset`` as a ``_target_``.
"""

from .decoder import CupDecoder, DecoderBlock
from .prepare import PRECISIONS, autocast_dtype, fold_weight_standardisation, native_bf16, prepare_for_inference
from .resnetv2 import Bottleneck, ResNetV2, StdConv2d
from .transunet import (
    HEADS,
    PRESETS,
    HeadMismatchError,
    TransUNet,
    decode_record,
    encode_record,
    head_mismatch,
    transunet_from_preset,
)
from .vit import PatchEmbeddings, TokenGrid, ViTBlock, ViTEncoder, resample_position_embeddings

__all__ = [
    "HEADS",
    "PRESETS",
    "StdConv2d",
    "Bottleneck",
    "ResNetV2",
    "TokenGrid",
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
    "PRECISIONS",
    "fold_weight_standardisation",
    "prepare_for_inference",
    "native_bf16",
    "autocast_dtype",
]
