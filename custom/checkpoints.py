"""Reading, converting and transferring TransUNet weights.

Our checkpoint format is a plain ``TransUNet.state_dict()``. The authors' released RETINA
checkpoints (BaderLab/RETINA, built on Beckschen/TransUNet) use another key layout; they are
recognised and converted on the fly, so either kind loads wherever a checkpoint is accepted.
Every load goes through ``torch.load(weights_only=True)``: a pickle never executes code.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .errors import CheckpointError
from .networks import decode_record, encode_record, head_mismatch, resample_position_embeddings
from .utils import atomic_path

__all__ = [
    "CheckpointError",
    "convert_reference_state_dict",
    "is_reference_state_dict",
    "read_state_dict",
    "load_weights",
    "transfer_pretrained",
    "freeze_part",
    "require_pretrained",
    "continues_from",
    "save_state_dict",
    "read_checkpoint_meta",
    "TRANSFER_MODES",
    "FREEZE_MODES",
]

logger = logging.getLogger(__name__)

POS_KEY = "embeddings.position_embeddings"
#: the state-dict entry of ``TransUNet.get_extra_state`` (head kind, intensity record)
EXTRA_KEY = "_extra_state"
TRANSFER_MODES = ("encoder", "transformer", "none")
FREEZE_MODES = ("transformer", "none")

# authors' key pattern -> ours (applied in order, first match wins)
_REFERENCE_RULES = [
    (r"^transformer\.embeddings\.hybrid_model\.", "cnn."),
    (r"^transformer\.embeddings\.patch_embeddings\.", "embeddings.patch_embeddings."),
    (r"^transformer\.embeddings\.position_embeddings$", POS_KEY),
    (r"^transformer\.encoder\.encoder_norm\.", "transformer.norm."),
    (r"^transformer\.encoder\.layer\.(\d+)\.attention_norm\.", r"transformer.blocks.\1.norm1."),
    (r"^transformer\.encoder\.layer\.(\d+)\.ffn_norm\.", r"transformer.blocks.\1.norm2."),
    (r"^transformer\.encoder\.layer\.(\d+)\.ffn\.fc1\.", r"transformer.blocks.\1.mlp.linear1."),
    (r"^transformer\.encoder\.layer\.(\d+)\.ffn\.fc2\.", r"transformer.blocks.\1.mlp.linear2."),
    (r"^transformer\.encoder\.layer\.(\d+)\.attn\.query\.", r"transformer.blocks.\1.attn.to_q."),
    (r"^transformer\.encoder\.layer\.(\d+)\.attn\.key\.", r"transformer.blocks.\1.attn.to_k."),
    (r"^transformer\.encoder\.layer\.(\d+)\.attn\.value\.", r"transformer.blocks.\1.attn.to_v."),
    (r"^transformer\.encoder\.layer\.(\d+)\.attn\.out\.", r"transformer.blocks.\1.attn.out_proj."),
    (r"^decoder\.", "decoder."),
]
_WRAPPER_KEYS = ("state_dict", "model", "network", "model_state_dict", "net")


def is_reference_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when ``sd`` uses the authors' key layout (``transformer.embeddings.hybrid_model...``)."""
    return any(k.startswith("transformer.embeddings.") or k.startswith("transformer.encoder.") for k in sd)


def convert_reference_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an authors' state dict to ours.

    The authors' pretraining models hold both ``FinalDecoder`` (the trained reconstruction head) and
    an untrained ``segmentation_head``: the reconstruction head becomes ``head`` then. Keys with no
    counterpart (e.g. a ViT class token) raise :class:`CheckpointError`.
    """
    has_recon = any(k.startswith("FinalDecoder.conv1.") for k in sd)
    head_prefix = "FinalDecoder.conv1." if has_recon else "segmentation_head.0."
    out, unknown = {}, []
    for key, value in sd.items():
        if key.startswith(head_prefix):
            out["head." + key[len(head_prefix):]] = value
            continue
        if key.startswith("segmentation_head.") or key.startswith("FinalDecoder."):
            continue  # the other, unused head
        for pattern, repl in _REFERENCE_RULES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unrecognised keys in reference checkpoint: {', '.join(unknown[:8])}")
    out[EXTRA_KEY] = encode_record({"head": "reconstruction" if has_recon else "segmentation", "input_intensity": None})
    return out


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise CheckpointError(f"{source}: not a TransUNet checkpoint (no state dict of tensors found)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load_problem(exc: BaseException) -> str:
    """The informative line of a ``torch.load`` error (its first line is boilerplate for
    weights-only refusals; the reason is on the ``WeightsUnpickler error:`` line)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
    if reason is not None:
        reason = reason[len("WeightsUnpickler error:"):].strip().split(". Please use")[0]
        return f"refused to unpickle: {reason}"[:200]
    msg = lines[0]
    if msg.isdigit() or len(msg) < 6:  # e.g. a bare pickle opcode from a file that is no pickle at all
        msg = f"{type(exc).__name__}: {msg}"
    return msg[:200]


def read_state_dict(path: Union[str, os.PathLike, Mapping]) -> dict[str, torch.Tensor]:
    """Read a checkpoint (path or mapping) into our key layout.

    Accepts our plain state dicts, the authors' layout, ``module.`` prefixes (DDP) and dicts wrapping
    the state dict under ``state_dict``/``model``/``network``. Loading uses ``weights_only=True``.
    """
    source = "state dict"
    obj = path
    if not isinstance(path, Mapping):
        source = os.fspath(path)
        if not os.path.isfile(source):
            raise CheckpointError(f"{source}: checkpoint file does not exist")
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, truncated zips, code-executing pickles
            raise CheckpointError(f"{source}: not a loadable weights-only checkpoint ({_load_problem(e)})") from None
    sd = _unwrap(obj, source)
    return convert_reference_state_dict(sd) if is_reference_state_dict(sd) else sd


def _fit_position_embeddings(sd: dict, model: nn.Module) -> dict:
    target = model.state_dict().get(POS_KEY)
    pos = sd.get(POS_KEY)
    if target is None or pos is None or pos.shape == target.shape or pos.shape[-1] != target.shape[-1]:
        return sd
    g = int(round(target.shape[1] ** 0.5))
    logger.info("resampling position embeddings %s -> %s", tuple(pos.shape), tuple(target.shape))
    return {**sd, POS_KEY: resample_position_embeddings(pos, (g, g))}


def _mismatches(sd: Mapping, model_sd: Mapping) -> list[str]:
    return [
        f"{k} {tuple(sd[k].shape)} vs {tuple(model_sd[k].shape)}"
        for k in sd
        if k in model_sd and k != EXTRA_KEY and sd[k].shape != model_sd[k].shape
    ]


def read_checkpoint_meta(path: Union[str, os.PathLike, Mapping]) -> dict:
    """The ``_extra_state`` record of our checkpoint (``{"head", "out_channels", "input_intensity"}``), or ``{}``
    for weights that carry none (the authors' releases, checkpoints written before the record existed)."""
    return decode_record(read_state_dict(path).get(EXTRA_KEY))


def _check_head(sd: Mapping, model: nn.Module, source: str) -> None:
    """Refuse weights whose recorded head kind (reconstruction vs segmentation) is not the model's."""
    wanted = getattr(model, "head_kind", None)
    saved = decode_record(sd.get(EXTRA_KEY)).get("head")
    if saved is not None and wanted is not None and saved != wanted:
        raise CheckpointError(f"{source}: {head_mismatch(saved, wanted)}")


def load_weights(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping], strict: bool = True) -> nn.Module:
    """Load a checkpoint into ``model`` (position embeddings resampled to the model's grid).

    Raises :class:`CheckpointError` listing shape mismatches, and with ``strict`` missing or
    unexpected keys.
    """
    source = "state dict" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    sd = _fit_position_embeddings(read_state_dict(checkpoint), model)
    _check_head(sd, model, source)
    model_sd = model.state_dict()
    if EXTRA_KEY in model_sd and EXTRA_KEY not in sd:  # weights without a record: keep the model's
        sd[EXTRA_KEY] = model_sd[EXTRA_KEY]
    problems = _mismatches(sd, model_sd)
    if strict:
        problems += [f"missing {k}" for k in model_sd if k not in sd]
        problems += [f"unexpected {k}" for k in sd if k not in model_sd]
    if problems:
        more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(
            f"{source}: checkpoint does not fit this network ({len(problems)} mismatching keys: "
            f"{'; '.join(problems[:10])}{more}); check preset, img_size and num_classes"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in model_sd}, strict=strict)
    return model


def _selected(key: str, transfer: str) -> bool:
    if key == EXTRA_KEY:  # the record describes the source network (its head, its input), not this one
        return False
    if transfer == "encoder":
        return not (key.startswith("decoder.") or key.startswith("head."))
    return key.startswith("transformer.")


def continues_from(
    path: Optional[Union[str, os.PathLike]],
    transfer: str = "encoder",
    continue_from: Optional[Union[str, os.PathLike]] = None,
) -> Optional[str]:
    """``continue_from`` when a fine-tuning run continues from existing weights instead of transferring, else None.

    That is when ``transfer`` needs the pretrained checkpoint ``path`` but it is not there, and
    ``continue_from`` (the bundle's own ``models/model.pt``) is: a bundle downloaded from the model
    zoo, or served by MONAI Label (which trains on from ``models/model.pt``), without the
    ``retina_pretrain`` bundle beside it. The fine-tuned weights already hold a trained encoder.
    """
    if transfer == "none" or not continue_from or (path and os.path.isfile(os.fspath(path))):
        return None
    return os.fspath(continue_from) if os.path.isfile(os.fspath(continue_from)) else None


def require_pretrained(
    path: Optional[Union[str, os.PathLike]],
    transfer: str = "encoder",
    continue_from: Optional[Union[str, os.PathLike]] = None,
) -> bool:
    """Check, before any data is touched, that ``path`` exists when ``transfer`` needs it (True if usable).

    With ``continue_from`` (the bundle's ``models/model.pt``) an absent ``path`` is fine when that file
    exists: :func:`transfer_pretrained` then continues from it (:func:`continues_from`).
    """
    if transfer == "none" or continues_from(path, transfer, continue_from):
        return True
    own = (
        f", place weights to continue from at {os.path.normpath(os.fspath(continue_from))}" if continue_from else ""
    )
    if not path:
        raise CheckpointError(f"transfer needs a pretrained_path{own}; pass --transfer none to train from scratch")
    if not os.path.isfile(os.fspath(path)):
        raise CheckpointError(
            f"{os.path.normpath(os.fspath(path))}: pretrained checkpoint not found; run the retina_pretrain bundle "
            "first (its demo: python -m monai.bundle run --config_file \"['configs/train.json','configs/demo.json']\" "
            f"in bundles/retina_pretrain), point --pretrained_path at a checkpoint{own}, or pass --transfer none to "
            "train from scratch"
        )
    return True


def freeze_part(model: nn.Module, what: str = "transformer") -> nn.Module:
    """Freeze ``what`` (``"transformer"``: the ViT blocks and final norm; ``"none"``)."""
    if what not in FREEZE_MODES:
        raise CheckpointError(f"freeze must be one of {FREEZE_MODES}, got {what!r}")
    if what == "transformer":
        for p in model.transformer.parameters():
            p.requires_grad_(False)
    return model


def transfer_pretrained(
    model: nn.Module,
    path: Optional[Union[str, os.PathLike]] = None,
    transfer: str = "encoder",
    freeze: str = "transformer",
    continue_from: Optional[Union[str, os.PathLike]] = None,
) -> nn.Module:
    """Copy pretrained encoder weights into a segmentation model and freeze part of it.

    Args:
        model: a :class:`~custom.networks.TransUNet`.
        path: our checkpoint or an authors' one (pretraining or fine-tuning).
        transfer: ``"encoder"`` (everything but decoder and head, as the authors' code),
            ``"transformer"`` (ViT blocks and final norm, as the paper's text) or ``"none"``.
        freeze: ``"transformer"`` (the paper's default) or ``"none"``.
        continue_from: the bundle's own weights (``models/model.pt``). When ``path`` is absent and
            this file exists (:func:`continues_from`), the transfer is skipped and the whole network
            is loaded from it (:func:`load_weights`, strict), with one warning in the log: training
            continues from the bundle's weights, as MONAI Label does (its ``CheckpointLoader`` of the
            same file then loads the same weights again).
    """
    if transfer not in TRANSFER_MODES:
        raise CheckpointError(f"transfer must be one of {TRANSFER_MODES}, got {transfer!r}")
    n_tensors = 0
    own = continues_from(path, transfer, continue_from)
    if own is not None:
        load_weights(model, own)
        freeze_part(model, freeze)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.warning(
            "%s: pretrained checkpoint not found; continuing from the bundle's own weights %s (no %r transfer); "
            "freeze %r: %d of %d parameters trainable",
            os.path.normpath(os.fspath(path)) if path else "pretrained_path", own, transfer, freeze, trainable,
            sum(p.numel() for p in model.parameters()),
        )
        return model
    if transfer != "none":
        require_pretrained(path, transfer, continue_from)
        sd = _fit_position_embeddings(read_state_dict(path), model)
        model_sd = model.state_dict()
        chosen = {k: v for k, v in sd.items() if _selected(k, transfer) and k in model_sd}
        problems = _mismatches(chosen, model_sd)
        missing = [k for k in model_sd if _selected(k, transfer) and k not in sd]
        if problems or missing or not chosen:
            listed = problems + [f"missing {k}" for k in missing]
            more = f" (+{len(listed) - 10} more)" if len(listed) > 10 else ""
            detail = f"{len(listed)} mismatching keys: {'; '.join(listed[:10])}{more}" if listed else "no matching keys"
            raise CheckpointError(
                f"{os.fspath(path)}: cannot transfer {transfer!r} weights ({detail}); check preset and img_size"
            )
        model.load_state_dict(chosen, strict=False)
        n_tensors = len(chosen)
    freeze_part(model, freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "[retina] transfer=%s (%d tensors from %s) freeze=%s: %s of %s parameters trainable",
        transfer, n_tensors, path if transfer != "none" else "-", freeze, f"{trainable:,}", f"{total:,}",
    )
    return model


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> str:
    """Write a state dict atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
    return path
