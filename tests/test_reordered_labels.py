"""A label that stores its image's voxels in another axis order or direction (one converter
writes rows top-down, another bottom-up) is the same grid: check passes it, the fingerprint
pairs the right voxels, and training's preprocessing puts it where the straight label goes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import past_folds

from medseg.check import check_dataset
from medseg.config import PlanConfig
from medseg.datasets import load_dataset
from medseg.errors import MedsegError
from medseg.plan import fingerprint, make_plan
from medseg.transforms import IMAGE, LABEL, case_dict, preprocessing

SHAPE = (12, 10, 8)
AFFINE = np.array([[2.0, 0, 0, -10], [0, 1.5, 0, 20], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def flipped_y(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored with the second axis reversed (and its affine to match)."""
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, data.shape[1] - 1
    return np.ascontiguousarray(data[:, ::-1]), affine @ flip


def transposed(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    swap = np.eye(4)[[1, 0, 2, 3]]
    return np.ascontiguousarray(data.transpose(1, 0, 2)), affine @ swap


def write(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return f"./{path.parent.name}/{path.name}"


def dataset(root: Path, store) -> Path:
    rng = np.random.default_rng(3)
    entries = []
    for k in range(3):
        image = rng.normal(100, 10, SHAPE).astype(np.float32)
        label = np.zeros(SHAPE, np.uint8)
        label[2 + k:7, 1:4, 2:6] = 1  # asymmetric along every axis
        label[3:5, 6:9, 1:3] = 2
        image[label == 1] += 200
        image[label == 2] += 400
        entries.append({"image": write(root / "imagesTr" / f"c{k}.nii.gz", image, AFFINE),
                        "label": write(root / "labelsTr" / f"c{k}.nii.gz",
                                       *store(label, AFFINE))})
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "a", "2": "b"}, "modality": {"0": "MR"},
        "training": entries}), encoding="utf-8")
    return root


@pytest.mark.parametrize("store", [flipped_y, transposed])
def test_a_reordered_label_is_the_same_grid_everywhere(tmp_path, store):
    straight = dataset(tmp_path / "straight", lambda d, a: (d, a))
    other = dataset(tmp_path / "other", store)
    assert past_folds(check_dataset(other).problems) == ()
    fp_straight = fingerprint(load_dataset(straight), progress=False)
    fp_other = fingerprint(load_dataset(other), progress=False)
    assert fp_other.class_voxels == fp_straight.class_voxels
    assert fp_other.intensity == fp_straight.intensity  # foreground voxels paired alike
    plan = make_plan(fp_straight, PlanConfig())
    chain = preprocessing(plan, with_label=True)
    for name in ("c0", "c2"):
        a = chain(case_dict([straight / "imagesTr" / f"{name}.nii.gz"],
                            straight / "labelsTr" / f"{name}.nii.gz"))
        b = chain(case_dict([other / "imagesTr" / f"{name}.nii.gz"],
                            other / "labelsTr" / f"{name}.nii.gz"))
        assert np.array_equal(a[IMAGE].numpy(), b[IMAGE].numpy())
        assert np.array_equal(a[LABEL].numpy(), b[LABEL].numpy())
        assert a[LABEL].numpy().max() == 2


def test_a_label_on_another_grid_is_still_refused(tmp_path):
    shifted = dataset(tmp_path / "shifted",
                      lambda d, a: (d, a + np.array([[0, 0, 0, 1.0]] + [[0] * 4] * 3)))
    rows = [p.message for p in past_folds(check_dataset(shifted).problems)]
    assert len(rows) == 3 and all("affines differ by up to 1 mm" in m for m in rows)
    with pytest.raises(MedsegError, match="label c0.nii.gz is not on the image's grid"):
        fingerprint(load_dataset(shifted), progress=False)
