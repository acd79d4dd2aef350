import re

import monai
import numpy as np
import pytest
import torch

from medseg.config import AugmentConfig, PlanConfig
from medseg.datasets import load_dataset
from medseg.plan import fingerprint, make_plan
from medseg.transforms import IMAGE, LABEL, augmentation, case_dict, preprocessing


@pytest.fixture(scope="module")
def plan(phantom_dataset):
    return make_plan(fingerprint(load_dataset(phantom_dataset)),
                     PlanConfig(patch_size=[32, 32, 16], base_filters=4, max_filters=16))


def test_preprocessing_resamples_to_plan_spacing_in_ras(plan, phantom_dataset):
    case = load_dataset(phantom_dataset).cases[0]
    data = preprocessing(plan, with_label=True)(case_dict(case.images, case.label))
    image, label = data[IMAGE], data[LABEL]
    assert image.shape[0] == 1 and image.shape[1:] == label.shape[1:]
    assert np.allclose(np.linalg.norm(image.affine[:3, :3].numpy(), axis=0),
                       plan.target_spacing, atol=1e-4)
    from nibabel.orientations import aff2axcodes

    assert aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert set(torch.unique(label).tolist()) <= {0, 1, 2, 3}


def test_ct_normalization_is_clipped_zscore(plan, phantom_dataset):
    case = load_dataset(phantom_dataset).cases[0]
    image = preprocessing(plan, with_label=False)(case_dict(case.images))[IMAGE]
    norm = plan.normalization[0]
    low = (norm["clip"][0] - norm["mean"]) / norm["std"]
    high = (norm["clip"][1] - norm["mean"]) / norm["std"]
    assert float(image.min()) >= low - 1e-4 and float(image.max()) <= high + 1e-4


def test_augmentation_keeps_image_and_label_aligned(plan):
    # an image that is a smooth function of its label: after any spatial augmentation the
    # image, thresholded, must still give the label back
    label = np.zeros((1, 40, 40, 24), np.float32)
    label[0, 8:30, 10:26, 4:20] = 1
    label[0, 14:20, 14:20, 8:14] = 2
    label[0, 30:36, 5:12, 2:10] = 3
    image = label * 10.0
    strong = AugmentConfig(flip_prob=1.0, rotate_prob=1.0, rotate_degrees=30, scale_prob=1.0,
                           noise_prob=0, smooth_prob=0, contrast_prob=0, intensity_shift_prob=0,
                           gamma_prob=0)
    chain = augmentation(plan, strong, foreground_fraction=1.0)
    for seed in range(5):
        chain.set_random_state(seed=seed)
        out = chain({IMAGE: torch.from_numpy(image), LABEL: torch.from_numpy(label)})[0]
        assert tuple(out[IMAGE].shape[1:]) == tuple(plan.patch_size)
        recovered = torch.round(out[IMAGE] / 10.0)
        agreement = (recovered == out[LABEL]).float().mean().item()
        assert agreement > 0.97, agreement


def test_elastic_deformation_moves_image_and_label_together(plan):
    label = np.zeros((1, *plan.patch_size), np.float32)
    label[0, 6:26, 8:24, 3:13] = 1
    image = label * 10.0
    elastic_only = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, elastic_prob=1.0,
                                 noise_prob=0, smooth_prob=0, contrast_prob=0,
                                 intensity_shift_prob=0, gamma_prob=0)
    chain = augmentation(plan, elastic_only, foreground_fraction=1.0)
    moved = 0.0
    for seed in range(3):
        chain.set_random_state(seed=seed)
        out = chain({IMAGE: torch.from_numpy(image), LABEL: torch.from_numpy(label)})[0]
        recovered = torch.round(out[IMAGE] / 10.0)
        assert (recovered == out[LABEL]).float().mean().item() > 0.97
        moved = max(moved, (out[LABEL].numpy() != label).mean())
    assert moved > 0.01  # the deformation did change the label, it was not a no-op


def test_augmentation_mirrors_only_the_plan_axes(plan):
    import dataclasses

    label = np.zeros((1, *plan.patch_size), np.float32)
    label[0, :4, :4, :4] = 1  # a corner block: every mirror moves it to another corner
    only_x = dataclasses.replace(plan, mirror_axes=[0])
    flips_only = AugmentConfig(flip_prob=1.0, rotate_prob=0, scale_prob=0, noise_prob=0,
                               smooth_prob=0, contrast_prob=0, intensity_shift_prob=0,
                               gamma_prob=0)
    chain = augmentation(only_x, flips_only, foreground_fraction=0.0)
    out = chain({IMAGE: torch.from_numpy(label.copy()), LABEL: torch.from_numpy(label)})[0]
    expected = np.flip(label, axis=1)  # axis 0 of the grid is axis 1 of (C, X, Y, Z)
    np.testing.assert_array_equal(out[LABEL].numpy(), expected)


@pytest.mark.parametrize("shift", [0, 4])
def test_a_case_smaller_than_the_patch_moves_only_with_shift_voxels(plan, shift):
    size = [p - 6 for p in plan.patch_size]
    label = np.zeros((1, *size), np.float32)
    label[0, 5:15, 5:15, 3:8] = 1
    still = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, noise_prob=0,
                          smooth_prob=0, contrast_prob=0, intensity_shift_prob=0, gamma_prob=0,
                          shift_voxels=shift)
    chain = augmentation(plan, still, foreground_fraction=0.5)
    corners = set()
    for seed in range(12):
        chain.set_random_state(seed=seed)
        out = chain({IMAGE: torch.from_numpy(label.copy()), LABEL: torch.from_numpy(label)})[0]
        assert tuple(out[LABEL].shape[1:]) == tuple(plan.patch_size)
        assert int(out[LABEL].sum()) == int(label.sum())  # the structure stays whole
        corners.add(tuple(int(i.min()) for i in torch.nonzero(out[LABEL][0], as_tuple=True)))
    assert (len(corners) > 1) == (shift > 0), corners


def test_float_labels_a_rounding_error_off_are_whole_numbers(plan, phantom_dataset, tmp_path):
    import nibabel as nib

    case = load_dataset(phantom_dataset).cases[0]
    stored = nib.load(case.label)
    noisy = np.asarray(stored.dataobj).astype(np.float32) * np.float32(0.9999999)
    nib.save(nib.Nifti1Image(noisy, stored.affine), tmp_path / "noisy.nii.gz")
    label = preprocessing(plan, with_label=True)(case_dict(case.images,
                                                           tmp_path / "noisy.nii.gz"))[LABEL]
    assert set(torch.unique(label).tolist()) == set(np.unique(stored.dataobj).tolist())


@pytest.mark.parametrize("change", ["past_the_classes", "negative", "fractional"])
def test_a_label_the_plan_cannot_train_is_refused_naming_its_file(plan, phantom_dataset,
                                                                  tmp_path, change):
    """`train --resume --set dataset.path=...` reads its cases again without the
    fingerprint's checks: a value past the classes failed in the loss ("index 7 is out of
    bounds for dimension 1 with size 4", no file named) and a 0.5 was rounded into a class."""
    import nibabel as nib

    from medseg.errors import MedsegError, unwrap_transform_error

    case = load_dataset(phantom_dataset).cases[0]
    stored = nib.load(case.label)
    data = np.asarray(stored.dataobj).astype(np.float32)
    value = {"past_the_classes": plan.num_classes, "negative": -1, "fractional": 0.5}[change]
    data[data == 1] = value
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, stored.affine), bad)
    expected = (r"label has non-integer values \(e.g. 0.5\)" if change == "fractional" else
                rf"label values \[{value}\] are not in the run's label map \(ids 0, 1, ")
    with pytest.raises(RuntimeError) as refusal:  # MONAI's Compose wraps it
        preprocessing(plan, with_label=True)(case_dict(case.images, bad))
    error = unwrap_transform_error(refusal.value)
    assert isinstance(error, MedsegError) and error.path == bad
    assert re.search(expected, str(error)), str(error)


@pytest.mark.parametrize("which", ["contrast_prob", "intensity_shift_prob", "gamma_prob",
                                   "gamma_invert_prob"])
def test_intensity_augmentation_draws_per_channel(plan, which):
    """Two channels were scaled, shifted and gamma-corrected by one draw (gamma over their
    joint intensity range), where nnU-Net draws each channel's own."""
    import dataclasses

    rng = np.random.default_rng(0)
    channel = rng.normal(size=(1, *plan.patch_size)).astype(np.float32)
    label = np.zeros((1, *plan.patch_size), np.float32)
    two_channels = dataclasses.replace(plan, in_channels=2, modalities=["MR", "MR"])
    none = {"flip_prob": 0, "rotate_prob": 0, "scale_prob": 0, "noise_prob": 0,
            "smooth_prob": 0, "contrast_prob": 0, "intensity_shift_prob": 0, "gamma_prob": 0}
    chain = augmentation(two_channels, AugmentConfig(**{**none, which: 1.0}),
                         foreground_fraction=0.0)
    chain.set_random_state(seed=1)
    image = torch.from_numpy(np.concatenate([channel, channel]))  # two identical channels
    out = chain({IMAGE: image, LABEL: torch.from_numpy(label)})[0][IMAGE].numpy()
    assert out.shape == (2, *plan.patch_size)
    assert not np.allclose(out[0], out[1])  # each its own draw
    assert not np.allclose(out[0], channel[0])  # and each changed
    assert not np.allclose(out[1], channel[0])


@pytest.mark.parametrize("asked", [{"lowres_prob": 1.0}, {"gamma_invert_prob": 1.0},
                                   {"gamma_prob": 1.0, "gamma_retain_stats": True}],
                         ids=["lowres", "inverted_gamma", "gamma_retaining_stats"])
def test_nnunets_other_intensity_transforms_apply_when_asked(plan, asked):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *plan.patch_size)).astype(np.float32)
    label = np.zeros((1, *plan.patch_size), np.float32)
    none = {"flip_prob": 0, "rotate_prob": 0, "scale_prob": 0, "noise_prob": 0,
            "smooth_prob": 0, "contrast_prob": 0, "intensity_shift_prob": 0, "gamma_prob": 0}
    chain = augmentation(plan, AugmentConfig(**{**none, **asked}), foreground_fraction=0.0)
    chain.set_random_state(seed=2)
    out = chain({IMAGE: torch.from_numpy(image.copy()),
                 LABEL: torch.from_numpy(label)})[0][IMAGE].numpy()
    assert not np.allclose(out, image)
    if "lowres_prob" in asked:  # zoomed out and back: smoother, so a smaller spread
        assert out.std() < 0.95 * image.std()
    else:  # both gammas keep the patch's mean and sd, as nnU-Net's
        assert out.mean() == pytest.approx(image.mean(), abs=1e-4)
        assert out.std() == pytest.approx(image.std(), rel=1e-4)


def test_a_patch_of_thick_slices_is_rotated_and_scaled_in_its_plane_only():
    """nnU-Net's "dummy 2D" augmentation: a tilt would interpolate across thick slices."""
    from medseg.transforms import _spatial_ranges

    augment = AugmentConfig(rotate_degrees=30.0, scale_range=0.2, rotate_prob=0.2,
                            scale_prob=0.2)
    radians = float(np.deg2rad(30.0))
    assert _spatial_ranges([192, 192, 28], augment) == ([0.0, 0.0, radians], [0.2, 0.2, 0.0])
    assert _spatial_ranges([28, 160, 192], augment) == ([radians, 0.0, 0.0], [0.0, 0.2, 0.2])
    assert _spatial_ranges([40, 56, 40], augment) == ([radians] * 3, [0.2] * 3)
    assert _spatial_ranges([28, 28, 192], augment) == (None, [0.0, 0.0, 0.2])  # a rod
    labels = torch.arange(1, 9, dtype=torch.float32).expand(1, 64, 64, 8).clone()
    rotate, scale = _spatial_ranges([64, 64, 8], augment)
    moved = monai.transforms.RandAffine(prob=1.0, rotate_range=rotate, scale_range=scale,
                                        mode="nearest", padding_mode="zeros")
    moved.set_random_state(0)
    out = moved(labels)
    for z in range(8):  # each slice keeps its own label (or the padding), none of another's
        assert set(torch.unique(out[0, :, :, z]).tolist()) <= {0.0, float(z + 1)}


QUIET = dict(flip_prob=0, noise_prob=0, smooth_prob=0, contrast_prob=0,
             intensity_shift_prob=0, gamma_prob=0)


def _uniform_case(shape=(96, 96, 96)) -> dict:
    """An image of 1 everywhere (no zero voxel to pad with), its label a block in the
    middle, far enough from the edges for any crop centred in it."""
    label = torch.zeros((1, *shape))
    label[0, 40:56, 40:56, 40:56] = 1
    return {IMAGE: torch.ones((1, *shape)), LABEL: label}


@pytest.mark.parametrize("degrees", [15, 44, 180])
def test_a_rotated_patch_is_cut_from_a_larger_crop_so_its_corners_are_image(plan, degrees):
    """RandAffine rotated an already cut patch: its corners were zero padding (14 % of the
    voxels of a patch at 15 degrees and 15 % scaling), zero being the foreground mean. (At
    large angles the crop's extent peaks between sampled angles.)"""
    rotate_all = AugmentConfig(rotate_prob=1.0, scale_prob=1.0, rotate_degrees=degrees,
                               **QUIET)
    chain = augmentation(plan, rotate_all, foreground_fraction=1.0)
    for seed in range(12):
        chain.set_random_state(seed=seed)
        out = chain(_uniform_case())[0]
        assert tuple(out[IMAGE].shape[1:]) == tuple(plan.patch_size)
        assert float(out[IMAGE].min()) > 0.99, seed


def test_rotating_from_the_larger_crop_resamples_only_the_patch_as_monai_would_all_of_it():
    """AffinePatchd gives RandAffined's output on the whole crop, cut to its centre, voxel
    for voxel and draw for draw (resampling the whole crop cost 3 to 7 times as much)."""
    from medseg.transforms import AffinePatchd

    keys, patch, crop = [IMAGE, LABEL], (24, 28, 14), (40, 44, 30)
    generator = torch.Generator().manual_seed(0)
    case = {IMAGE: torch.randn((1, *crop), generator=generator),
            LABEL: (torch.rand((1, *crop), generator=generator) > 0.7).float()}
    options = dict(prob=0.5, rotate_range=[0.3] * 3, scale_range=[0.15] * 3,
                   mode=["bilinear", "nearest"], padding_mode="zeros")
    ours = AffinePatchd(keys, list(patch), **options).set_random_state(4)
    monais = monai.transforms.RandAffined(keys, **options).set_random_state(4)
    centre = monai.transforms.CenterSpatialCropd(keys, roi_size=patch)
    for _ in range(8):
        a, b = ours(dict(case)), centre(monais(dict(case)))
        for key in keys:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))


def test_a_patch_left_unrotated_is_the_patch_monai_cuts(plan):
    """The larger crop changes nothing for the patches RandAffine leaves alone: the same
    draws give the same voxels as cutting the patch directly."""
    from medseg.transforms import ForegroundOversampledCropd

    case = _uniform_case()
    case[IMAGE] = torch.arange(case[LABEL].numel(), dtype=torch.float32).reshape(
        case[LABEL].shape)
    patch = list(plan.patch_size)
    for crop in ([patch[0] + 20, patch[1] + 30, patch[2] + 40], [90, 90, 60]):
        larger = ForegroundOversampledCropd([IMAGE, LABEL], 0.5, patch, 2, "none",
                                            crop_size=crop)
        direct = ForegroundOversampledCropd([IMAGE, LABEL], 0.5, patch, 2, "none")
        for seed in range(8):
            larger.set_random_state(seed)
            direct.set_random_state(seed)
            big, small = larger(dict(case))[0], direct(dict(case))[0]
            assert tuple(big[IMAGE].shape[1:]) == tuple(crop)
            centre = monai.transforms.CenterSpatialCrop(patch)
            for key in (IMAGE, LABEL):
                assert torch.equal(centre(big[key]).as_tensor(), small[key].as_tensor())
