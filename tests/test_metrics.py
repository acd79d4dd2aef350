import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.metrics import (
    METRICS,
    dice,
    edges,
    iou,
    label_values,
    score_case,
    score_structure,
    structure_boxes,
    surface_scores,
    volume_ml,
)


def cube(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_dice_of_offset_cubes_is_hand_worked():
    # two 4^3 cubes offset by one voxel along x overlap in 3 x 4 x 4 = 48 voxels
    a = cube((10, 10, 10), (2, 2, 2), 4)
    b = cube((10, 10, 10), (3, 2, 2), 4)
    assert dice(a, b) == pytest.approx(2 * 48 / (64 + 64))
    assert iou(a, b) == pytest.approx(48 / 80)


def test_dice_conventions_for_empty_masks():
    empty = np.zeros((4, 4, 4), dtype=bool)
    full = np.ones((4, 4, 4), dtype=bool)
    # nothing to score (nnU-Net's convention): left out of means rather than counted as 1
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty))
    assert dice(full, empty) == 0.0
    assert dice(empty, full) == 0.0
    assert iou(full, empty) == 0.0


def test_volume_uses_physical_spacing():
    mask = cube((10, 10, 10), (0, 0, 0), 5)  # 125 voxels
    assert volume_ml(mask, (2.0, 2.0, 4.0)) == pytest.approx(125 * 16 / 1000)


def test_surface_metrics_of_cubes_offset_along_the_thick_axis():
    # 4^3 cubes, spacing 1 x 1 x 3 mm, offset by one voxel (3 mm) along z. Each cube has 56
    # edge voxels (64 minus the 2^3 core). From either cube's edge to the other's: 36 edge
    # voxels lie on the other edge (0 mm), the 4 core voxels of the face entering the other
    # cube are 1 mm (one in-plane voxel) from its side, and the 16 voxels of the face outside
    # it are 3 mm from its face.
    a = cube((10, 10, 12), (2, 2, 2), 4)
    b = cube((10, 10, 12), (2, 2, 3), 4)
    scores = surface_scores(b, a, (1.0, 1.0, 3.0), tolerance_mm=2.0)
    assert scores["hd95_mm"] == pytest.approx(3.0)  # 95th percentile of 36x0, 4x1, 16x3
    assert scores["assd_mm"] == pytest.approx((4 * 1 + 16 * 3) / 56)
    assert scores["nsd"] == pytest.approx((36 + 4) / 56)  # within 2 mm
    assert surface_scores(b, a, (1.0, 1.0, 3.0), tolerance_mm=3.0)["nsd"] == 1.0


def test_surface_metrics_of_cubes_offset_along_a_thin_axis():
    # the same offset of one voxel along x (1 mm): 36 edge voxels at 0 mm and 20 at 1 mm
    a = cube((10, 10, 12), (2, 2, 2), 4)
    b = cube((10, 10, 12), (3, 2, 2), 4)
    scores = score_structure(b, a, (1.0, 1.0, 3.0), tolerance_mm=0.5)
    assert scores["dice"] == pytest.approx(0.75)
    assert scores["hd95_mm"] == pytest.approx(1.0)
    assert scores["assd_mm"] == pytest.approx(20 / 56)
    assert scores["nsd"] == pytest.approx(36 / 56)
    assert scores["ref_ml"] == pytest.approx(64 * 3 / 1000)
    assert scores["diff_ml"] == pytest.approx(0.0)


def test_surface_dice_of_a_cube_inside_a_larger_one():
    # a 2^3 cube (all 8 voxels are edge) in the middle of a 6^3 one (152 edge voxels), 2 mm
    # voxels: every inner voxel is 2 voxels (4 mm) from the outer faces; of the outer edge
    # only the 4 central voxels of each face (24) are as close to the inner cube, the rest
    # are further. So NSD at 4 mm is (8 + 24) / (8 + 152), and below 4 mm it is 0.
    inner = cube((12, 12, 12), (5, 5, 5), 2)
    outer = cube((12, 12, 12), (3, 3, 3), 6)
    assert surface_scores(inner, outer, (2.0, 2.0, 2.0), 4.0)["nsd"] == pytest.approx(0.2)
    assert surface_scores(inner, outer, (2.0, 2.0, 2.0), 3.9)["nsd"] == 0.0
    assert surface_scores(inner, outer, (2.0, 2.0, 2.0))["hd95_mm"] > 4.0
    assert dice(inner, outer) == pytest.approx(2 * 8 / (8 + 216))


def test_empty_structure_conventions():
    empty = np.zeros((6, 6, 6), dtype=bool)
    some = cube((6, 6, 6), (1, 1, 1), 2)
    both_empty = score_structure(empty, empty, (1.0, 1.0, 1.0))
    assert all(math.isnan(both_empty[k]) for k in ("dice", "iou", "hd95_mm", "hd_mm", "assd_mm",
                                                    "nsd"))
    for pred, ref in ((some, empty), (empty, some)):
        one_empty = score_structure(pred, ref, (1.0, 1.0, 1.0))
        assert one_empty["dice"] == 0.0 and one_empty["iou"] == 0.0 and one_empty["nsd"] == 0.0
        assert math.isinf(one_empty["hd95_mm"]) and math.isinf(one_empty["assd_mm"])


def test_score_case_per_label():
    reference = np.zeros((10, 10, 10), dtype=np.int64)
    reference[cube((10, 10, 10), (1, 1, 1), 3)] = 1
    reference[cube((10, 10, 10), (6, 6, 6), 3)] = 2
    prediction = reference.copy()
    prediction[prediction == 2] = 0
    scores = score_case(prediction, reference, {0: "bg", 1: "a", 2: "b", 3: "c"},
                        (1.0, 1.0, 1.0))
    assert set(scores["a"]) == set(METRICS)
    assert scores["a"]["dice"] == 1.0 and scores["a"]["hd95_mm"] == 0.0
    assert scores["a"]["nsd"] == 1.0
    assert scores["b"]["dice"] == 0.0 and math.isinf(scores["b"]["hd95_mm"])
    assert scores["b"]["ref_ml"] == pytest.approx(0.027)
    assert scores["b"]["diff_ml"] == pytest.approx(-0.027)
    assert all(math.isnan(scores["c"][m]) for m in ("dice", "iou", "hd95_mm", "nsd"))  # absent
    assert "bg" not in scores


def test_structure_boxes_and_label_values():
    label_map = np.zeros((8, 8, 8), dtype=np.int32)
    label_map[1:3, 2:5, 3:4] = 2
    boxes = structure_boxes(label_map, [1, 2])
    assert boxes[1] is None
    assert boxes[2] == (slice(1, 3), slice(2, 5), slice(3, 4))
    assert label_values(label_map) == {0, 2}
    assert label_values(np.array([[[-1, 5_000_000]]])) == {-1, 5_000_000}


def test_edges_are_what_one_binary_erosion_removes():
    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.standard_normal((20, 17, 9)), 1.5) > 0.1
    assert np.array_equal(edges(mask), mask & ~ndimage.binary_erosion(mask))
    assert edges(np.ones((3, 3, 3), bool)).sum() == 26


def random_label_map(rng, shape, n_labels):
    """Smooth random blobs, one label each; the last one touches the volume border."""
    out = np.zeros(shape, np.int64)
    for k in range(1, n_labels + 1):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        out[field > np.percentile(field, 88)] = k
    out[0, :5, :3] = n_labels
    return out


def one_hot(label_map, n_classes):
    tensor = torch.from_numpy(label_map)
    return torch.nn.functional.one_hot(tensor, n_classes).permute(3, 0, 1, 2)[None].float()


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_monai_metrics_on_random_masks(seed):
    from monai.metrics import (
        DiceMetric,
        HausdorffDistanceMetric,
        MeanIoU,
        SurfaceDiceMetric,
        SurfaceDistanceMetric,
    )

    rng = np.random.default_rng(seed)
    shape, spacing, tolerance, n = (36, 30, 18), (0.8, 1.1, 2.5), 2.0, 3
    reference, prediction = random_label_map(rng, shape, n), random_label_map(rng, shape, n)
    labels = {k: f"s{k}" for k in range(n + 1)}
    ours = score_case(prediction, reference, labels, spacing, tolerance)
    pred, ref = one_hot(prediction, n + 1), one_hot(reference, n + 1)
    theirs = {
        "dice": DiceMetric(include_background=False)(pred, ref),
        "iou": MeanIoU(include_background=False)(pred, ref),
        "hd95_mm": HausdorffDistanceMetric(include_background=False, percentile=95)(
            pred, ref, spacing=spacing),
        "hd_mm": HausdorffDistanceMetric(include_background=False)(pred, ref, spacing=spacing),
        "assd_mm": SurfaceDistanceMetric(include_background=False, symmetric=True)(
            pred, ref, spacing=spacing),
        "nsd": SurfaceDiceMetric([tolerance] * n, include_background=False)(
            pred, ref, spacing=spacing),
    }
    for metric, values in theirs.items():
        for k in range(1, n + 1):
            assert ours[f"s{k}"][metric] == pytest.approx(float(values[0, k - 1]), rel=1e-4,
                                                          abs=1e-5), (metric, k)


def test_boxes_of_a_huge_label_id_are_found_without_a_list_as_long_as_the_id(monkeypatch):
    """A stray voxel of 2e9 in a prediction made find_objects list 2e9 boxes (a MemoryError
    naming no file, or the machine swapping); large ids are numbered 1..n first."""
    from scipy import ndimage

    from medseg import metrics

    seen = []
    real = ndimage.find_objects

    def recording(data, max_label=0):
        seen.append(max_label)
        assert max_label <= 3, f"find_objects asked for {max_label} boxes"
        return real(data, max_label=max_label)

    monkeypatch.setattr(metrics.ndimage, "find_objects", recording)
    label_map = np.zeros((6, 7, 8), np.int64)
    label_map[1:3, 2:5, 4] = 2_000_000_000
    label_map[4, 6, 0:2] = 1
    boxes = metrics.structure_boxes(label_map, [1, 7, 2_000_000_000, 0])
    assert boxes[2_000_000_000] == (slice(1, 3), slice(2, 5), slice(4, 5))
    assert boxes[1] == (slice(4, 5), slice(6, 7), slice(0, 2))
    assert boxes[7] is None and boxes[0] is None
    assert seen


def test_boxes_of_neighbouring_uint64_ids_beyond_float64_precision_stay_apart():
    from medseg.metrics import structure_boxes

    label_map = np.zeros((3, 3, 3), np.uint64)
    label_map[0, 0, 0], label_map[1, 1, 1] = 2**60, 2**60 + 1
    boxes = structure_boxes(label_map, [2**60, 2**60 + 1, 5])
    assert boxes[2**60 + 1] == (slice(1, 2),) * 3 and boxes[2**60] == (slice(0, 1),) * 3
    assert boxes[5] is None


def test_a_far_stray_voxel_shows_in_the_hausdorff_distance_not_in_hd95():
    """A one-voxel false positive 40 mm away: HD95 and ASSD barely move (the surface has
    hundreds of points), so without the maximum it was invisible in the scores."""
    reference = cube((60, 20, 20), (2, 2, 2), 12)
    prediction = reference.copy()
    prediction[55, 8, 8] = True
    clean = surface_scores(reference, reference, (1.0, 1.0, 1.0))
    stray = surface_scores(prediction, reference, (1.0, 1.0, 1.0))
    assert clean["hd_mm"] == clean["hd95_mm"] == 0.0
    assert stray["hd_mm"] == pytest.approx(55 - 13)  # to the cube's nearest face voxel (x 13)
    assert stray["hd95_mm"] == 0.0 and stray["assd_mm"] < 0.1


def test_volumes_and_distances_of_a_float32_spacing_carry_no_noise():
    """A NIfTI header's 0.8 mm is 0.800000011920929 as read: 1000 voxels were
    0.51200002 ml, and a one-voxel distance 0.80000001 mm."""
    from medseg.metrics import score_case

    reference = np.zeros((12, 12, 12), np.uint8)
    reference[1:11, 1:11, 1:11] = 1
    prediction = np.roll(reference, 1, axis=0)
    spacing = tuple(float(np.float32(0.8)) for _ in range(3))
    scores = score_case(prediction, reference, {0: "background", 1: "s"}, spacing)["s"]
    assert (f"{scores['ref_ml']:.8g}", f"{scores['hd_mm']:.8g}") == ("0.512", "0.8")
