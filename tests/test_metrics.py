import numpy as np
import pytest

from medseg.metrics import dice, score_case, volume_ml


def cube(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_dice_of_offset_cubes_is_hand_worked():
    # two 4^3 cubes offset by one voxel along x overlap in 3 x 4 x 4 = 48 voxels
    a = cube((10, 10, 10), (2, 2, 2), 4)
    b = cube((10, 10, 10), (3, 2, 2), 4)
    assert dice(a, b) == pytest.approx(2 * 48 / (64 + 64))


def test_dice_conventions_for_empty_masks():
    empty = np.zeros((4, 4, 4), dtype=bool)
    full = np.ones((4, 4, 4), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert dice(full, empty) == 0.0
    assert dice(empty, full) == 0.0


def test_volume_uses_physical_spacing():
    mask = cube((10, 10, 10), (0, 0, 0), 5)  # 125 voxels
    assert volume_ml(mask, (2.0, 2.0, 4.0)) == pytest.approx(125 * 16 / 1000)


def test_score_case_per_label():
    reference = np.zeros((10, 10, 10), dtype=np.int64)
    reference[cube((10, 10, 10), (1, 1, 1), 3)] = 1
    reference[cube((10, 10, 10), (6, 6, 6), 3)] = 2
    prediction = reference.copy()
    prediction[prediction == 2] = 0
    scores = score_case(prediction, reference, {0: "bg", 1: "a", 2: "b"}, (1.0, 1.0, 1.0))
    assert scores["a"]["dice"] == 1.0
    assert scores["b"]["dice"] == 0.0
    assert scores["b"]["ref_ml"] == pytest.approx(0.027)
    assert scores["b"]["diff_ml"] == pytest.approx(-0.027)
    assert "bg" not in scores
