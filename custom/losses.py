"""The RETINA fine-tuning loss: 0.5 x (class-weighted) cross-entropy + 0.5 x soft Dice.

MONAI's :class:`~monai.losses.DiceCELoss` computes exactly this sum, except that its ``weight``
rescales both terms. The reference implementation (BaderLab/RETINA, after TransUNet) weights
the cross-entropy only and averages an unweighted Dice over all classes, background included.
:class:`CEWeightedDiceCELoss` keeps DiceCELoss and moves the class weights to the
cross-entropy term.

Sparse labels: with ``ignore_index`` (e.g. 255, the value of unlabelled voxels) those voxels add
nothing to either term (zero gradient there): MONAI's DiceLoss masks them itself, the
cross-entropy skips them (``ignore_index`` of :class:`torch.nn.CrossEntropyLoss`; a masked mean for BCE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

__all__ = ["PAPER", "CEWeightedDiceCELoss"]

#: the reference's weighting (0.5 each) and Dice over the whole batch; DiceCELoss's defaults otherwise
PAPER = {"lambda_dice": 0.5, "lambda_ce": 0.5, "batch": True}


class CEWeightedDiceCELoss(DiceCELoss):
    """``lambda_ce`` x CE(weight) + ``lambda_dice`` x Dice, class weights on the CE term only.

    Multi-class (``input`` with C > 1 channels, targets of class indices ``(B, 1, H, W)``):
    ``to_onehot_y=True, softmax=True, squared_pred=True``; ``class_weights`` has C values
    (background first). Binary (one logit channel, float 0/1 targets): ``sigmoid=True``; the CE
    term is then BCE-with-logits and class weights are not accepted. ``num_classes`` picks these
    switches (the configs' one place for them); keywords given explicitly still win.

    Args:
        num_classes: the network's output channels (1: binary), or None (set the switches yourself).
        class_weights: per-class weights of the cross-entropy, or None (unweighted).
        ignore_index: the label value of unlabelled voxels (not a class: ``>= max(2, num_classes)``), or
            None (every voxel is labelled: DiceCELoss exactly).
        kwargs: any :class:`~monai.losses.DiceCELoss` argument except ``weight`` (defaults: :data:`PAPER`,
            then DiceCELoss's own, e.g. ``smooth_nr=smooth_dr=1e-5``, ``include_background=True``).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int | None = None,
        **kwargs,
    ):
        if "weight" in kwargs:
            raise TypeError("pass class_weights (cross-entropy only), not weight")
        if ignore_index is not None:  # a class value would be neither learned nor scored: ConfigError
            from custom.io.validation import check_ignore_index

            check_ignore_index(ignore_index, None if num_classes is None else max(2, int(num_classes)))
        if num_classes is not None:
            multi = int(num_classes) > 1
            switches = {"sigmoid": not multi, "softmax": multi, "to_onehot_y": multi, "squared_pred": multi}
            kwargs = {**switches, **kwargs}
        kwargs = {**PAPER, **kwargs}
        super().__init__(**kwargs)
        self.class_weights = None
        if class_weights is not None and len(class_weights) > 0:
            weight = torch.as_tensor(class_weights, dtype=torch.float32)
            if weight.ndim != 1 or bool((weight < 0).any()):
                raise ValueError(f"class_weights must be a flat list of non-negative numbers, got {class_weights}")
            self.class_weights = weight
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        if self.ignore_index is not None:
            # DiceCELoss (MONAI 1.6) does not pass ignore_index on to its DiceLoss, which supports it
            self.dice.ignore_index = self.ignore_index
        if self.class_weights is not None or self.ignore_index is not None:
            ce = self.cross_entropy
            self.cross_entropy = nn.CrossEntropyLoss(
                weight=self.class_weights, reduction=ce.reduction, label_smoothing=ce.label_smoothing,
                ignore_index=-100 if self.ignore_index is None else self.ignore_index,
            )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.class_weights is not None:
            if input.shape[1] == 1:
                raise ValueError("class_weights need a multi-class network (num_classes > 1); drop them for binary")
            if input.shape[1] != self.class_weights.numel():
                raise ValueError(
                    f"class_weights has {self.class_weights.numel()} values but the network predicts "
                    f"{input.shape[1]} classes"
                )
            self.cross_entropy.to(input.device)
        return super().forward(input, target)

    def ce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits ``(B, C, ...)`` and class indices ``(B, 1, ...)``; 0 when every voxel is ignored
        (PyTorch's mean over no voxel is NaN)."""
        if self.ignore_index is not None and not bool((target != self.ignore_index).any()):
            return input.sum() * 0.0
        return super().ce(input, target)

    def bce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits of ``(B, 1, ...)`` logits and 0/1 targets, averaged over the labelled voxels only."""
        if self.ignore_index is None:
            return super().bce(input, target)
        valid = (target != self.ignore_index).to(input.dtype)
        # BCEWithLogitsLoss has no ignore value: a masked mean (0 where nothing is labelled)
        loss = F.binary_cross_entropy_with_logits(input, target.to(input.dtype) * valid, reduction="none")
        return (loss * valid).sum() / valid.sum().clamp_min(1.0)
