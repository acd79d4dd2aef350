"""Per-structure clean-up of a predicted label map: keep the largest connected component,
drop components under a size. Connected components come from connected-components-3d:
MONAI's KeepLargestConnectedComponent and RemoveSmallObjects need scikit-image (not a
dependency) and label the whole volume, where cc3d labels each structure's box only."""

from __future__ import annotations

import numpy as np

from medseg.errors import MedsegError

CONNECTIVITY = 26


def check_postprocess_labels(largest_component: list[int], min_component_ml: dict[int, float],
                             labels: dict[int, str], whose: str) -> None:
    """The ids `predict.largest_component` and `predict.min_component_ml` name must be
    structures of the model (`whose`: "model's", or "dataset's" when training starts)."""
    known = set(labels) - {0}
    for key, ids in (("predict.largest_component", largest_component),
                     ("predict.min_component_ml", list(min_component_ml))):
        unknown = sorted(set(ids) - known)
        if unknown:
            raise MedsegError(f"'{key}' names label(s) {unknown}; the {whose} labels are "
                              f"{sorted(known)}")


def keep_largest_component(labels: np.ndarray, label_ids: list[int]) -> np.ndarray:
    """For each listed label, only its largest 26-connected component stays (the rest
    becomes background). Works in place on a copy restricted to each label's bounding box."""
    import cc3d

    out = labels.copy()
    boxes = _boxes_by_label(out)
    for label_id in label_ids:
        box = boxes.get(label_id)
        if box is None:
            continue
        mask = out[box] == label_id
        keep = cc3d.largest_k(mask, k=1, connectivity=CONNECTIVITY, binary_image=True) > 0
        out[box][mask & ~keep] = 0
    return out


def remove_small_components(labels: np.ndarray, min_voxels: dict[int, int]) -> np.ndarray:
    """For each label, components with fewer than `min_voxels[label]` voxels become
    background."""
    import cc3d

    out = labels.copy()
    boxes = _boxes_by_label(out)
    for label_id, threshold in min_voxels.items():
        box = boxes.get(label_id)
        if box is None or threshold <= 1:
            continue
        mask = out[box] == label_id
        kept = cc3d.dust(mask, threshold=int(threshold), connectivity=CONNECTIVITY,
                         binary_image=True)
        out[box][mask & ~kept.astype(bool)] = 0
    return out


def postprocess(labels: np.ndarray, spacing: tuple[float, float, float],
                largest_component: list[int], min_component_ml: dict[int, float]) -> np.ndarray:
    """Both clean-ups, small components first; sizes in ml use the mask's voxel spacing."""
    if min_component_ml:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        labels = remove_small_components(
            labels, {k: min_voxels(ml, voxel_ml) for k, ml in min_component_ml.items()})
    if largest_component:
        labels = keep_largest_component(labels, largest_component)
    return labels


def min_voxels(ml: float, voxel_ml: float) -> int:
    """The fewest voxels of a component of at least `ml`: a component of exactly `ml` stays,
    though `ml / voxel_ml` lands a rounding error above its whole number of voxels (0.050625
    ml of 1.5 mm voxels is 15.000000000000002 voxels, and 16 removed a 15-voxel one)."""
    return int(np.ceil(ml / voxel_ml * (1 - 1e-9)))


def _boxes_by_label(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Each label's bounding box (one pass over the map; removing one label's components
    leaves the others' boxes as they were)."""
    from scipy import ndimage

    # integer maps as they are: a uint8 mask copied to int64 took 8 more bytes a voxel
    boxes = ndimage.find_objects(labels if labels.dtype.kind in "iu"
                                 else labels.astype(np.int64))
    return {label_id: box for label_id, box in enumerate(boxes, start=1) if box is not None}
