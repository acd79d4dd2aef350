"""Per-structure scores of one predicted label map against its reference (pure functions).

Dice, IoU, HD95, the Hausdorff distance (HD, the largest surface distance: one far stray
island shows here, where HD95 and ASSD can hide it), average symmetric surface distance
(ASSD) and surface Dice (NSD) at a tolerance in mm, all in physical units (voxel spacing
respected), plus volumes in ml.

Conventions for empty structures (docs/formats.md):

- both masks empty: every score NaN (nothing to score; left out of means and of n), as
  nnU-Net does: a Dice of 1 for each case without the structure would inflate its mean;
- one mask empty: Dice 0, IoU 0, NSD 0; HD95, HD and ASSD inf (counted as failures).

Speed: every structure is cropped to the bounding box of prediction and reference (one
`scipy.ndimage.find_objects` pass over each label map gives all boxes), plus a margin of one
voxel, before edges and surface distances are computed; so the per-structure cost depends on
the structure's size, not the volume's. The definitions are MONAI's, and the tests check the
numbers against DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric and
SurfaceDiceMetric.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import KDTree

SURFACE_METRICS = ("hd95_mm", "hd_mm", "assd_mm", "nsd")
METRICS = ("dice", "iou", "hd95_mm", "hd_mm", "assd_mm", "nsd", "ref_ml", "pred_ml",
           "diff_ml")
FAILED_SCORES = {"dice": 0.0, "iou": 0.0, "hd95_mm": math.inf, "hd_mm": math.inf,
                 "assd_mm": math.inf, "nsd": 0.0, "ref_ml": math.nan, "pred_ml": math.nan,
                 "diff_ml": math.nan}

Spacing = tuple[float, float, float]
# a distance of exactly the tolerance (5 voxels of 0.4 mm at 2 mm) counts as within it,
# whatever the rounding of a float32 header's spacing (0.40000000596 x 5 > 2.0)
TOLERANCE_SLACK_MM = 1e-6
Box = tuple[slice, ...]


def overlap_scores(prediction: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Dice and IoU of two boolean masks from tp/fp/fn counts; both empty NaN, one empty 0.

    Counted here rather than with MONAI's compute_dice/compute_iou: the same numbers (the
    tests cross-check them against DiceMetric), without a torch round trip per structure.
    """
    tp = int(np.count_nonzero(prediction & reference))
    n_pred, n_ref = int(np.count_nonzero(prediction)), int(np.count_nonzero(reference))
    if n_pred + n_ref == 0:
        return {"dice": math.nan, "iou": math.nan}
    return {"dice": 2.0 * tp / (n_pred + n_ref), "iou": tp / (n_pred + n_ref - tp)}


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; both empty gives NaN, one empty gives 0.0."""
    return overlap_scores(prediction.astype(bool), reference.astype(bool))["dice"]


def iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union of two boolean masks; both empty NaN, one empty 0.0."""
    return overlap_scores(prediction.astype(bool), reference.astype(bool))["iou"]


def as_written(spacing: Spacing) -> Spacing:
    """Each spacing to 7 significant digits, a float32's: a NIfTI header's 0.8 mm reads
    0.800000011920929, and volumes and distances would carry that noise in their digits."""
    return tuple(float(f"{value:.7g}") for value in spacing)  # type: ignore[return-value]


def volume_ml(mask: np.ndarray, spacing: Spacing) -> float:
    return voxels_ml(int(np.count_nonzero(mask)), spacing)


def voxels_ml(voxels: int, spacing: Spacing) -> float:
    """The volume of `voxels` voxels of `spacing` (as score_case takes it: see as_written)."""
    return float(voxels) * float(np.prod(spacing)) / 1000.0


def surface_scores(prediction: np.ndarray, reference: np.ndarray, spacing: Spacing,
                   tolerance_mm: float = 2.0) -> dict[str, float]:
    """HD95, HD and ASSD in mm, and surface Dice at `tolerance_mm`, of two boolean masks.

    Same definitions as MONAI's HausdorffDistanceMetric(percentile=95) and (percentile=None),
    SurfaceDistanceMetric(symmetric=True) and SurfaceDiceMetric (edges are the mask voxels
    removed by one binary erosion; distances from each edge voxel to the nearest edge voxel
    of the other mask, by a KD-tree over physical coordinates, as MONAI does on CPU). Written
    out here so that the edges and both distance sets are computed once for all three
    metrics, on the structure's bounding box: MONAI's functions would redo them per metric
    and spend most of their time on per-call crop transforms (about 10 ms per structure).
    """
    prediction, reference = prediction.astype(bool, copy=False), reference.astype(bool, copy=False)
    pred_any, ref_any = bool(prediction.any()), bool(reference.any())
    if not pred_any and not ref_any:
        return dict.fromkeys(SURFACE_METRICS, math.nan)
    if not pred_any or not ref_any:
        return {"hd95_mm": math.inf, "hd_mm": math.inf, "assd_mm": math.inf, "nsd": 0.0}
    box = _union_box(prediction, reference, margin=1)
    pred_edges, ref_edges = edges(prediction[box]), edges(reference[box])
    scale = np.asarray(spacing, dtype=np.float64)
    pred_to_ref = _edge_distances(pred_edges, ref_edges, scale)
    ref_to_pred = _edge_distances(ref_edges, pred_edges, scale)
    return _distance_summary(pred_to_ref, ref_to_pred, tolerance_mm)


def score_structure(prediction: np.ndarray, reference: np.ndarray, spacing: Spacing,
                    tolerance_mm: float = 2.0, surface: bool = True) -> dict[str, float]:
    """Every metric of METRICS for one structure (boolean masks on the same grid)."""
    pred_ml, ref_ml = volume_ml(prediction, spacing), volume_ml(reference, spacing)
    scores = overlap_scores(prediction, reference)
    if surface:
        scores.update(surface_scores(prediction, reference, spacing, tolerance_mm))
    else:
        scores.update(dict.fromkeys(SURFACE_METRICS, math.nan))
    scores.update({"ref_ml": ref_ml, "pred_ml": pred_ml, "diff_ml": pred_ml - ref_ml})
    return scores


def present_or_all(names: list[str], absent) -> list[str]:
    """The structures some case has (the summary's rows and headline means), or all of them
    when none is: a table without rows would say nothing."""
    return [name for name in names if name not in set(absent)] or list(names)


def leave_out_ignored(prediction: np.ndarray, reference: np.ndarray, ignore_label: int | None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Both maps with the voxels the reference labels `ignore_label` (nnU-Net's 'ignore':
    no one annotated them) set to background in both (copies; the inputs without one): a
    prediction there is neither a true nor a false positive, as in nnU-Net's scores.
    Surface metrics then see the annotated part's boundary."""
    if ignore_label is None:
        return prediction, reference
    ignored = reference == ignore_label
    if not ignored.any():
        return prediction, reference
    return np.where(ignored, 0, prediction), np.where(ignored, 0, reference)


def score_case(prediction: np.ndarray, reference: np.ndarray, labels: dict[int, str],
               spacing: Spacing, tolerance_mm: float = 2.0, surface: bool = True
               ) -> dict[str, dict[str, float]]:
    """Scores (METRICS) of every foreground label, keyed by label name.

    `surface=False` skips HD95, ASSD and NSD (NaN), e.g. for quick validation during training.
    """
    spacing = as_written(spacing)
    ids = sorted(k for k in labels if k > 0)
    pred_boxes = structure_boxes(prediction, ids)
    ref_boxes = structure_boxes(reference, ids)
    empty = np.zeros((1,) * prediction.ndim, dtype=bool)
    scores = {}
    for label_id in ids:
        box = _merge_boxes(pred_boxes[label_id], ref_boxes[label_id], prediction.shape)
        if box is None:  # absent from both: score two empty masks
            pred_mask = ref_mask = empty
        else:
            pred_mask, ref_mask = prediction[box] == label_id, reference[box] == label_id
        scores[labels[label_id]] = score_structure(pred_mask, ref_mask, spacing, tolerance_mm,
                                                   surface)
    return scores


def is_present(scores: dict[str, float]) -> bool:
    """Whether a structure's scores say it is in the reference or the prediction."""
    return any(math.isfinite(scores[k]) and scores[k] > 0 for k in ("ref_ml", "pred_ml"))


# find_objects makes a list as long as the largest id: beyond this, ids are numbered 1..n first
_DIRECT_BOX_IDS = 1 << 16


def structure_boxes(label_map: np.ndarray, ids: list[int]) -> dict[int, Box | None]:
    """Bounding box (slices) of every label id in one pass; None where the label is absent
    (and for ids below 1, which are not structures)."""
    wanted = sorted({k for k in ids if k > 0})
    if not wanted:
        return {k: None for k in ids}
    data = label_map if label_map.dtype.kind in "iu" else label_map.astype(np.int64)
    if data.dtype.kind == "i" and data.size and data.min() < 0:
        data = np.where(data < 0, 0, data)  # find_objects ignores 0; negative ids are not labels
    if wanted[-1] < _DIRECT_BOX_IDS:
        found = ndimage.find_objects(data, max_label=wanted[-1])
        boxes = {k: found[k - 1] for k in wanted}
    else:
        # ids the map's type can hold, in that type (searchsorted would compare uint64 ids
        # beyond 2^53 as float64, which merges neighbours)
        info = np.iinfo(data.dtype)
        held = [k for k in wanted if info.min <= k <= info.max]
        found = ndimage.find_objects(_numbered(data, np.asarray(held, dtype=data.dtype)),
                                     max_label=len(held)) if held else []
        boxes = dict(zip(held, found, strict=True))
    return {k: boxes.get(k) for k in ids}


def _numbered(data: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The map with the sorted ids `wanted` numbered 1..n and every other value 0 (a label id
    of 2e9 would otherwise make find_objects list 2e9 boxes)."""
    position = np.searchsorted(wanted, data)
    hit = wanted[np.minimum(position, len(wanted) - 1)] == data
    return np.where(hit, position + 1, 0).astype(np.int32)


def label_values(label_map: np.ndarray) -> set[int]:
    """The distinct values of an integer label map."""
    return set(label_counts(label_map))


def label_counts(label_map: np.ndarray) -> dict[int, int]:
    """Voxels of each value of an integer label map (bincount when small ids allow, O(n))."""
    if label_map.size == 0:
        return {}
    low, high = int(label_map.min()), int(label_map.max())
    if low >= 0 and high < 1 << 20:
        counts = np.bincount(label_map.ravel())
        return {int(k): int(counts[k]) for k in np.flatnonzero(counts)}
    values, counts = np.unique(label_map, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _distance_summary(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray,
                      tolerance_mm: float) -> dict[str, float]:
    """HD95 as MONAI computes it (95th percentile of each directed set, the larger one), HD
    (the largest distance of either set), ASSD (mean of both sets together) and NSD (share
    of both edge sets within tolerance)."""
    hd95 = max(float(np.percentile(pred_to_ref, 95)), float(np.percentile(ref_to_pred, 95)))
    both = np.concatenate([pred_to_ref, ref_to_pred])
    return {"hd95_mm": hd95, "hd_mm": float(both.max()), "assd_mm": float(both.mean()),
            "nsd": float(np.count_nonzero(both <= tolerance_mm + TOLERANCE_SLACK_MM))
            / both.size}


def edges(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (outside the array counts as
    outside): `mask & ~scipy.ndimage.binary_erosion(mask)`, as MONAI takes edges, done with
    six shifted ANDs, which is several times faster than the general erosion."""
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for start in (0, 2):
            neighbour = [slice(1, n + 1) for n in mask.shape]
            neighbour[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(neighbour)]
    return mask & ~interior


def _edge_distances(source: np.ndarray, target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Distance (mm) from every `source` edge voxel to the nearest `target` edge voxel. Voxels
    on both edges are 0 mm away; only the others are looked up in a KD-tree of `target`."""
    shared = np.count_nonzero(source & target)
    others = np.argwhere(source & ~target) * scale
    if others.size == 0:
        return np.zeros(shared)
    found = KDTree(np.argwhere(target) * scale, leafsize=32).query(others, k=1)[0]
    return np.concatenate([np.zeros(shared), found])


def _union_box(a: np.ndarray, b: np.ndarray, margin: int) -> Box:
    """Bounding box of a | b, grown by `margin` voxels within the array."""
    union = a | b
    (box,) = ndimage.find_objects(union.view(np.uint8))  # no copy: bool is one byte
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                 for s, n in zip(box, union.shape, strict=True))


def _merge_boxes(a: Box | None, b: Box | None, shape: tuple[int, ...], margin: int = 1
                 ) -> Box | None:
    """Union of two boxes (either may be None) grown by `margin` voxels within `shape`."""
    boxes = [box for box in (a, b) if box is not None]
    if not boxes:
        return None
    return tuple(slice(max(min(bx[i].start for bx in boxes) - margin, 0),
                       min(max(bx[i].stop for bx in boxes) + margin, shape[i]))
                 for i in range(len(shape)))
