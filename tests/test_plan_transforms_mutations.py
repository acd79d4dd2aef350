"""Tests written against mutations that survived the rest of the suite: each one fails if the
rule it names is broken (the docstrings say which mutation each kills)."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import synthetic_fingerprint
from monai.transforms import Randomizable

from medseg.check import check_dataset
from medseg.config import AugmentConfig, PlanConfig
from medseg.datasets import load_dataset
from medseg.evaluate import CaseScores
from medseg.phantoms import write_phantom_dataset
from medseg.plan import fingerprint, initial_patch_size, kernels_and_strides, make_plan
from medseg.report import format_table, summarize
from medseg.transforms import IMAGE, LABEL, augmentation, case_dict, preprocessing

# a volume's voxel axes stored in the order (S, R, A): file axis j holds RAS axis PERM[j]
PERM = (2, 0, 1)
PHANTOM_SHAPE = (40, 32, 12)
PHANTOM_SPACING = (3.0, 3.5, 10.0)  # every axis distinct, so any mix-up of axes shows


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def store_transposed(path: Path, z_scale: float = 1.0) -> None:
    """Rewrite a NIfTI file with its voxel axes transposed by PERM and the affine's columns
    permuted to match: the same voxels at the same places, stored in another axis order.
    `z_scale` stretches the S axis (a case with another slice spacing)."""
    stored = nib.load(str(path))
    data = np.asarray(stored.dataobj)
    affine = stored.affine.copy()
    affine[:3, 2] *= z_scale
    moved = affine.copy()
    moved[:3, :3] = affine[:3, list(PERM)]
    save_nifti(np.ascontiguousarray(np.transpose(data, PERM)), moved, path)


def phantom_dataset(root: Path, n: int) -> Path:
    write_phantom_dataset(root, n_train=n, n_test=0, seed=5, shape=PHANTOM_SHAPE,
                          spacing=PHANTOM_SPACING)
    return root


def small_plan(**changes):
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[40, 40, 40]] * 3)
    plan = make_plan(fp, PlanConfig(patch_size=[16, 16, 16], base_filters=4, max_filters=16))
    return dataclasses.replace(plan, **changes)


def quiet_augment(**probs) -> AugmentConfig:
    """Every random transform off unless named."""
    off = dict(flip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, elastic_prob=0.0,
               noise_prob=0.0, smooth_prob=0.0, contrast_prob=0.0, intensity_shift_prob=0.0,
               gamma_prob=0.0)
    return AugmentConfig(**{**off, **probs})


# 1. plan._ras_ordered and check._ras_spacing -------------------------------------------

def test_fingerprint_and_plan_do_not_depend_on_the_stored_axis_order(tmp_path):
    """Kills plan._ras_ordered `ras[world_axis]` -> `ras[voxel_axis]` (file order kept)."""
    plain = phantom_dataset(tmp_path / "plain", 3)
    moved = tmp_path / "moved"
    shutil.copytree(plain, moved)
    for file in sorted(moved.glob("*sTr/*.nii.gz")):
        store_transposed(file)
    assert np.asarray(nib.load(str(next(moved.glob("imagesTr/*")))).dataobj).shape == (
        12, 40, 32)
    fp_plain = fingerprint(load_dataset(plain), progress=False)
    fp_moved = fingerprint(load_dataset(moved), progress=False)
    np.testing.assert_allclose(fp_plain.spacings, [PHANTOM_SPACING] * 3)
    assert fp_plain.shapes == [list(PHANTOM_SHAPE)] * 3
    np.testing.assert_allclose(fp_moved.spacings, fp_plain.spacings)
    assert fp_moved.shapes == fp_plain.shapes
    assert fp_moved.class_voxels == fp_plain.class_voxels
    config = PlanConfig(max_patch_voxels=16 * 16 * 16)  # small enough to shrink the patch
    plan_plain, plan_moved = make_plan(fp_plain, config), make_plan(fp_moved, config)
    assert plan_moved.target_spacing == pytest.approx(plan_plain.target_spacing)
    assert plan_moved.target_spacing == pytest.approx(list(PHANTOM_SPACING))
    assert plan_moved.median_shape == plan_plain.median_shape
    assert plan_moved.patch_size == plan_plain.patch_size
    assert plan_moved.strides == plan_plain.strides


def test_spacing_outliers_are_judged_in_ras_order_whatever_the_stored_axis_order(tmp_path):
    """Kills check._ras_spacing `ras[world_axis]` -> `ras[voxel_axis]`: two cases stored
    transposed would then look like outliers (or hide one), and the message would give the
    spacing in file order."""
    root = phantom_dataset(tmp_path, 4)
    names = sorted(p.name for p in (root / "imagesTr").glob("*.nii.gz"))
    for folder in ("imagesTr", "labelsTr"):
        store_transposed(root / folder / names[2])
        store_transposed(root / folder / names[3], z_scale=2.5)  # S spacing 25 mm
    outliers = [p for p in check_dataset(root).problems if "outlier" in p.message]
    assert [(p.case, p.message) for p in outliers] == [
        (names[3].split(".")[0], "spacing (3, 3.5, 25) mm is an outlier: dataset median "
                                 "(3, 3.5, 10) mm (beyond a factor 2)")]


# 2. foreground oversampling ratios -------------------------------------------------------

def _foreground_centre_rate(plan, label: np.ndarray, foreground_fraction: float, n: int
                            ) -> float:
    """The share of `n` seeded patches whose centre voxel is foreground."""
    chain = augmentation(plan, quiet_augment(), foreground_fraction)
    # the deterministic steps (padding, the class indices) once, as CacheDataset does
    first_random = chain.get_index_of_first(lambda t: isinstance(t, Randomizable))
    cached = chain({IMAGE: torch.from_numpy(label * 10.0), LABEL: torch.from_numpy(label)},
                   end=first_random)
    centre = tuple(p // 2 for p in plan.patch_size)
    hits = 0
    for seed in range(n):
        chain.set_random_state(seed=seed)
        out = chain(dict(cached), start=first_random)[0]
        hits += int(out[LABEL][(0, *centre)] > 0)
    return hits / n


@pytest.mark.parametrize("foreground_fraction", [0.33, 0.9])
def test_patch_centres_are_foreground_at_the_configured_rate(foreground_fraction):
    """Kills the background and foreground ratios of RandCropByLabelClassesd being swapped
    (a foreground share of 1 - foreground_fraction)."""
    plan = small_plan()  # 3 classes, patch 16^3
    label = np.zeros((1, 40, 40, 40), np.float32)
    label[0, 12:15, 12:15, 12:15] = 1
    label[0, 24:27, 24:27, 24:27] = 2
    # MONAI moves a centre into [8, 32] on each axis (the patch must fit): both cubes lie
    # strictly inside that range, so a background centre is never moved onto foreground
    # and a patch's centre voxel is foreground exactly when a foreground class was drawn
    n = 300
    rate = _foreground_centre_rate(plan, label, foreground_fraction, n)
    # hits ~ Binomial(n, p): a 5-sd band is left by chance with probability < 1e-6, while
    # the swapped ratios put the expected rate 1 - p outside it by more than 5 of their sds
    p = foreground_fraction
    sd = math.sqrt(p * (1 - p) / n)
    tolerance = 5 * sd
    assert abs((1 - p) - p) > tolerance + 5 * sd
    assert abs(rate - p) <= tolerance, (rate, p, tolerance)


def test_a_case_with_one_of_four_structures_gets_the_whole_foreground_fraction():
    """MONAI's fixed class ratios drop the classes a case lacks and renormalize: with 1 of
    4 structures present, 0.33 became 0.0825 / (0.67 + 0.0825) = 11 % foreground patches
    (nnU-Net draws the class among those present and keeps 33 %)."""
    plan = small_plan(num_classes=5, labels={k: f"s{k}" for k in range(5)})
    label = np.zeros((1, 40, 40, 40), np.float32)
    label[0, 18:21, 18:21, 18:21] = 3
    n = 400
    rate = _foreground_centre_rate(plan, label, 0.33, n)
    tolerance = 5 * math.sqrt(0.33 * 0.67 / n)
    old = 0.0825 / (0.67 + 0.0825)
    assert abs(old - 0.33) > tolerance + 5 * math.sqrt(old * (1 - old) / n)
    assert abs(rate - 0.33) <= tolerance, (rate, tolerance)


# 3. labels resampled with nearest neighbour ---------------------------------------------

def test_label_is_resampled_with_nearest_neighbour(tmp_path):
    """Kills the label's Spacingd mode "nearest" -> "bilinear" (1 and 3 side by side would
    average to 2 along their border)."""
    from monai import transforms as mt

    rng = np.random.default_rng(3)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    label = np.zeros((16, 12, 10), np.uint8)
    label[2:8, 2:10, 2:8] = 1
    label[8:14, 2:10, 2:8] = 3  # touching label 1 along x
    save_nifti(rng.normal(100, 10, label.shape).astype(np.float32), affine,
               tmp_path / "image.nii.gz")
    save_nifti(label, affine, tmp_path / "label.nii.gz")
    plan = small_plan(target_spacing=[1.3, 1.3, 1.3], labels={0: "bg", 1: "a", 3: "c"},
                      num_classes=4)
    out = preprocessing(plan, with_label=True)(case_dict([tmp_path / "image.nii.gz"],
                                                         tmp_path / "label.nii.gz"))[LABEL]
    assert set(torch.unique(out).tolist()) == {0, 1, 3}
    reference = mt.Compose([
        mt.LoadImaged("label", image_only=True),
        mt.EnsureChannelFirstd("label"),
        mt.Orientationd("label", axcodes="RAS"),
        mt.Spacingd("label", pixdim=[1.3, 1.3, 1.3], mode="nearest"),
    ])({"label": str(tmp_path / "label.nii.gz")})["label"]
    assert out.shape == reference.shape
    np.testing.assert_array_equal(out.numpy(), reference.numpy().astype(np.float32))


# 4. intensity augmentation leaves the label alone ---------------------------------------

def test_intensity_augmentation_never_touches_the_label():
    """Kills RandGaussianNoised(IMAGE) -> RandGaussianNoised(keys) (noise on the label; the
    same for any other intensity transform given the label key)."""
    plan = small_plan()
    shape = (1, 24, 22, 20)
    label = np.zeros(shape, np.float32)
    label[0, 6:14, 5:12, 4:10] = 1
    label[0, 12:18, 12:18, 10:16] = 2
    image = np.arange(label.size, dtype=np.float32).reshape(shape)  # each voxel its index
    loud = quiet_augment(noise_prob=1.0, smooth_prob=1.0, contrast_prob=1.0,
                         intensity_shift_prob=1.0, gamma_prob=1.0)
    for seed in range(3):
        chains = [augmentation(plan, augment, 0.5) for augment in (quiet_augment(), loud)]
        outs = []
        for chain in chains:
            chain.set_random_state(seed=seed)
            outs.append(chain({IMAGE: torch.from_numpy(image.copy()),
                               LABEL: torch.from_numpy(label.copy())})[0])
        quiet, augmented = outs
        # the untouched image gives the crop's corner, so the cropped input label is known
        start = np.unravel_index(int(quiet[IMAGE][0, 0, 0, 0]), shape[1:])
        window = tuple(slice(s, s + p) for s, p in zip(start, plan.patch_size, strict=True))
        np.testing.assert_array_equal(quiet[IMAGE][0].numpy(), image[0][window])
        cropped = torch.from_numpy(np.ascontiguousarray(label[0][window]))[None]
        assert not torch.equal(augmented[IMAGE], quiet[IMAGE])  # the augmentation ran
        assert augmented[LABEL].dtype == cropped.dtype
        assert torch.equal(augmented[LABEL], cropped)


# 5. MR z-score over the nonzero voxels --------------------------------------------------

def test_mr_normalization_is_over_nonzero_voxels_and_keeps_zeros(tmp_path):
    """Kills NormalizeIntensityd(nonzero=True) -> nonzero=False for the MR scheme."""
    rng = np.random.default_rng(4)
    image = np.zeros((20, 18, 16), np.float32)
    image[4:16, 3:15, 2:14] = rng.normal(300.0, 40.0, (12, 12, 12))
    save_nifti(image, np.diag([1.0, 1.0, 1.0, 1.0]), tmp_path / "mr.nii.gz")
    plan = small_plan(modalities=["MR"], normalization=[{"scheme": "zscore_nonzero"}])
    out = preprocessing(plan, with_label=False)(case_dict([tmp_path / "mr.nii.gz"]))[IMAGE]
    out = out[0].numpy()
    assert out.shape == image.shape  # same spacing: no resampling mixes the background in
    inside = image != 0
    assert np.all(out[~inside] == 0)
    assert abs(out[inside].mean()) < 1e-4
    assert abs(out[inside].std() - 1.0) < 1e-3


# 6.-8. plan geometry --------------------------------------------------------------------

def test_median_shape_is_measured_at_the_target_spacing():
    """Kills _median_resampled_shape returning the median shape at the original spacing."""
    fp = synthetic_fingerprint([[1.0, 1.0, 5.0]] * 3, [[200, 200, 40]] * 3)
    plan = make_plan(fp, PlanConfig(target_spacing=[2.0, 2.0, 5.0]))
    assert plan.median_shape == [100, 100, 40]


def test_patch_shrinks_the_physically_longest_axis():
    """Kills initial_patch_size picking the longest axis in voxels instead of in mm: a
    128 x 128 x 256 mm median case (voxels 128, 128, 64 at 1, 1, 4 mm) over a budget of
    128 * 128 * 32 voxels loses slices until it is a 128 mm cube, as nnU-Net's patch that
    follows the spacing's aspect; its rows and columns keep every voxel."""
    assert initial_patch_size([128, 128, 64], [1.0, 1.0, 4.0], 128 * 128 * 32) == [128, 128, 32]
    # the same axes in another order: the rule follows mm, not the axis position
    assert initial_patch_size([64, 128, 128], [4.0, 1.0, 1.0], 128 * 128 * 32) == [32, 128, 128]


def test_an_axis_exactly_twice_the_finest_spacing_waits_a_level_as_in_nnunet():
    """nnU-Net's get_pool_and_conv_props pools and convolves an axis only while its spacing
    is below twice the finest (`< 2`): at 1, 1, 2 mm the thick axis waits one level, after
    which the feature map is isotropic (2, 2, 2 mm) and every axis pools."""
    kernels, strides = kernels_and_strides([64, 64, 32], [1.0, 1.0, 2.0])
    assert strides[1] == [2, 2, 1]
    assert kernels[0] == [3, 3, 1]
    assert strides[2] == [2, 2, 2] and kernels[1] == [3, 3, 3]
    kernels, strides = kernels_and_strides([64, 64, 32], [1.0, 1.0, 1.99])
    assert strides[1] == [2, 2, 2]  # just below: pooled at once
    assert kernels[0] == [3, 3, 3]


# 9. console table ------------------------------------------------------------------------

def test_table_hd95_column_is_the_median():
    """Kills format_table showing the hd95 mean under "hd95 median mm"."""
    def scores(hd95):
        return {"dice": 0.8, "iou": 0.7, "hd95_mm": hd95, "hd_mm": hd95, "assd_mm": 1.0,
                "nsd": 0.9, "ref_ml": 1.0, "pred_ml": 1.0, "diff_ml": 0.0}

    results = [CaseScores(name, {"liver": scores(hd)})
               for name, hd in (("a", 1.0), ("b", 2.0), ("c", 9.0))]  # mean 4, median 2
    lines = format_table(summarize(results, tolerance_mm=2.0)).splitlines()
    assert "hd95 median mm" in lines[0]
    row = next(line for line in lines if line.startswith("liver "))
    assert row.split()[4] == "2.00", row
