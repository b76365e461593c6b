"""The RETINA fine-tuning loss: 0.5 x (class-weighted) cross-entropy + 0.5 x soft Dice.

MONAI's :class:`~monai.losses.DiceCELoss` computes exactly this sum, except that its ``weight``
rescales both terms. The reference implementation (BaderLab/RETINA, after TransUNet) weights
the cross-entropy only and averages an unweighted Dice over all classes, background included.
:class:`CEWeightedDiceCELoss` keeps DiceCELoss and moves the class weights to the
cross-entropy term.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from monai.losses import DiceCELoss
from torch import nn

__all__ = ["CEWeightedDiceCELoss"]


class CEWeightedDiceCELoss(DiceCELoss):
    """``lambda_ce`` x CE(weight) + ``lambda_dice`` x Dice, class weights on the CE term only.

    Multi-class (``input`` with C > 1 channels, targets of class indices ``(B, 1, H, W)``):
    ``to_onehot_y=True, softmax=True``; ``class_weights`` has C values (background first).
    Binary (one logit channel, float 0/1 targets): ``sigmoid=True``; the CE term is then
    BCE-with-logits and class weights are not accepted.

    Args:
        class_weights: per-class weights of the cross-entropy, or None (unweighted).
        kwargs: any :class:`~monai.losses.DiceCELoss` argument except ``weight``.
    """

    def __init__(self, class_weights: Optional[Union[Sequence[float], torch.Tensor]] = None, **kwargs):
        if "weight" in kwargs:
            raise TypeError("pass class_weights (cross-entropy only), not weight")
        super().__init__(**kwargs)
        self.class_weights = None
        if class_weights is not None and len(class_weights) > 0:
            weight = torch.as_tensor(class_weights, dtype=torch.float32)
            if weight.ndim != 1 or bool((weight < 0).any()):
                raise ValueError(f"class_weights must be a flat list of non-negative numbers, got {class_weights}")
            self.class_weights = weight
            reduction = self.cross_entropy.reduction
            label_smoothing = self.cross_entropy.label_smoothing
            self.cross_entropy = nn.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=label_smoothing)

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
