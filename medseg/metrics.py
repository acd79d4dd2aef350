"""Per-structure scores of one predicted label map against its reference (pure functions)."""

from __future__ import annotations

import numpy as np
import torch


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks via MONAI; both empty gives 1.0, one empty gives 0.0."""
    from monai.metrics import compute_dice

    pred = torch.from_numpy(np.ascontiguousarray(prediction, dtype=bool))[None, None]
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=bool))[None, None]
    return float(compute_dice(pred.float(), ref.float(), include_background=True,
                              ignore_empty=False)[0, 0])


def volume_ml(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    return float(mask.sum()) * float(np.prod(spacing)) / 1000.0


def score_case(prediction: np.ndarray, reference: np.ndarray, labels: dict[int, str],
               spacing: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    """Dice and volumes (ml) for every foreground label, keyed by label name."""
    scores = {}
    for label_id, name in sorted(labels.items()):
        if label_id == 0:
            continue
        pred_mask, ref_mask = prediction == label_id, reference == label_id
        pred_ml, ref_ml = volume_ml(pred_mask, spacing), volume_ml(ref_mask, spacing)
        scores[name] = {"dice": dice(pred_mask, ref_mask), "ref_ml": ref_ml,
                        "pred_ml": pred_ml, "diff_ml": pred_ml - ref_ml}
    return scores
