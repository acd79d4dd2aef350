"""Dice + cross-entropy that leaves out nnU-Net's 'ignore' voxels (sparse annotations).

MONAI's DiceCELoss takes no mask. Its parts do: MaskedDiceLoss masks the softmax and the
one-hot target, and torch's cross-entropy skips `ignore_index`; this module only joins them
as DiceCELoss joins DiceLoss and CrossEntropyLoss (each weighted 1). The target goes to
MaskedDiceLoss one-hot already: given class indices, it masks them before its own one-hot,
which turns every ignored voxel into background (a perfect prediction then lost 0.25).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from monai.networks.utils import one_hot

_SKIPPED = -100  # torch's default ignore_index


class DiceCELossIgnoring(torch.nn.Module):
    """DiceCELoss(to_onehot_y=True, softmax=True) over the voxels whose target is not
    `ignore_label`. A batch with no annotated voxel gives the Dice term alone (a mean
    cross-entropy over no voxel is NaN)."""

    def __init__(self, ignore_label: int, batch: bool, include_background: bool,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        self.label_smoothing = label_smoothing
        self.dice = MaskedDiceLoss(include_background=include_background, softmax=True,
                                   batch=batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        annotated = target != self.ignore_label
        classes = torch.where(annotated, target, torch.zeros_like(target))
        dice = self.dice(logits, one_hot(classes, logits.shape[1]), mask=annotated)
        if not bool(annotated.any()):  # cross-entropy's mean over no voxel is NaN
            return dice + 0.0 * logits.sum()
        skipped = torch.where(annotated, target, torch.full_like(target, _SKIPPED))
        cross_entropy = F.cross_entropy(logits, skipped[:, 0].long(), ignore_index=_SKIPPED,
                                        label_smoothing=self.label_smoothing)
        return dice + cross_entropy
