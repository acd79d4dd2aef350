import numpy as np
import pytest
from helpers import synthetic_fingerprint

from medseg.config import PlanConfig
from medseg.datasets import load_dataset
from medseg.errors import MedsegError
from medseg.plan import (
    Plan,
    fingerprint,
    kernels_and_strides,
    make_plan,
    target_spacing,
)


def test_isotropic_plan_matches_nnunet_hippocampus():
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 5, [[36, 50, 35]] * 5)
    plan = make_plan(fp, PlanConfig(max_patch_voxels=89600))
    assert plan.target_spacing == [1.0, 1.0, 1.0]
    assert plan.patch_size == [40, 56, 40]
    assert plan.num_classes == 3
    assert plan.normalization == [{"scheme": "zscore_nonzero"}]
    factors = np.prod(plan.strides, axis=0)
    assert all(p % f == 0 for p, f in zip(plan.patch_size, factors, strict=True))


def test_anisotropic_axis_gets_the_10th_percentile_and_no_early_pooling():
    spacings = [[0.8, 0.8, s] for s in (3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0)]
    shapes = [[512, 512, 40]] * 10
    assert target_spacing(spacings, shapes)[2] == pytest.approx(np.percentile(
        [s[2] for s in spacings], 10))
    kernels, strides = kernels_and_strides([160, 160, 24], [0.8, 0.8, 5.0])
    assert strides[1] == [2, 2, 1]  # the coarse axis is not pooled at first
    assert kernels[0] == [3, 3, 1]  # nor convolved across


def test_ct_normalization_uses_foreground_statistics():
    fp = synthetic_fingerprint([[1.0, 1.0, 2.0]] * 3, [[64, 64, 32]] * 3, modality="CT")
    plan = make_plan(fp, PlanConfig())
    assert plan.normalization == [{"scheme": "ct", "clip": [-100.0, 300.0], "mean": 80.0,
                                   "std": 50.0}]


def test_workflow_overrides_win():
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[64, 64, 64]] * 3)
    plan = make_plan(fp, PlanConfig(target_spacing=[2.0, 2.0, 2.0], patch_size=[32, 32, 32],
                                    batch_size=4))
    assert plan.target_spacing == [2.0, 2.0, 2.0]
    assert plan.patch_size == [32, 32, 32]
    assert plan.batch_size == 4


def test_indivisible_patch_is_refused_with_a_suggestion():
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[64, 64, 64]] * 3)
    with pytest.raises(MedsegError, match=r"try \[40, 40, 40\]"):
        make_plan(fp, PlanConfig(patch_size=[33, 33, 33]))


def test_mirror_axes_are_planned():
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[40, 40, 40]] * 3)
    assert make_plan(fp, PlanConfig()).mirror_axes == [0, 1, 2]
    assert make_plan(fp, PlanConfig(mirror_axes=[2, 0])).mirror_axes == [0, 2]
    # a plan.json written before mirror axes existed mirrors all three, as it did then
    data = make_plan(fp, PlanConfig()).to_json()
    del data["mirror_axes"]
    assert Plan.from_json(data).mirror_axes == [0, 1, 2]


def test_residual_blocks_are_planned_and_built():
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

    from medseg.model import create_model

    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[32, 32, 32]] * 3)
    plain = make_plan(fp, PlanConfig(base_filters=4))
    residual = make_plan(fp, PlanConfig(base_filters=4, res_block=True))
    assert (plain.res_block, residual.res_block) == (False, True)
    assert isinstance(create_model(plain).input_block, UnetBasicBlock)
    assert isinstance(create_model(residual).input_block, UnetResBlock)
    # a plan.json written before residual blocks existed builds the plain network it had
    data = residual.to_json()
    del data["res_block"]
    assert Plan.from_json(data).res_block is False


def test_plan_json_round_trip():
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[40, 40, 40]] * 3)
    plan = make_plan(fp, PlanConfig())
    assert Plan.from_json(plan.to_json()) == plan


def test_fingerprint_of_phantoms(phantom_dataset):
    fp = fingerprint(load_dataset(phantom_dataset))
    assert len(fp.spacings) == 6
    assert fp.spacings[0] == pytest.approx([4.0, 4.0, 8.0])  # RAS order after any flips
    assert set(fp.class_voxels) == {0, 1, 2, 3}
    stats = fp.intensity[0]
    assert -200 < stats["mean"] < 400 and stats["p00_5"] < stats["p99_5"]


def test_fingerprint_refuses_unknown_label_values(tmp_path):
    import nibabel as nib

    from medseg.phantoms import write_phantom_dataset

    write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(16, 16, 8))
    label_path = tmp_path / "labelsTr" / "phantom_001.nii.gz"
    label = nib.load(label_path)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(data, label.affine), label_path)
    with pytest.raises(MedsegError, match=r"phantom_001.nii.gz: label values \[9\]"):
        fingerprint(load_dataset(tmp_path))
    # a mask resampled with linear interpolation is refused, not truncated
    smooth = data.astype(np.float32)
    smooth[0, 0, 0] = 0.5
    nib.save(nib.Nifti1Image(smooth, label.affine), label_path)
    with pytest.raises(MedsegError, match=r"phantom_001.nii.gz: label has non-integer values "
                                          r"\(e.g. 0.5\)"):
        fingerprint(load_dataset(tmp_path))


def test_fingerprint_refuses_shape_mismatch(tmp_path):
    import nibabel as nib

    from medseg.phantoms import write_phantom_dataset

    write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(16, 16, 8))
    label_path = tmp_path / "labelsTr" / "phantom_000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 9), np.uint8), np.eye(4)), label_path)
    with pytest.raises(MedsegError, match=r"label phantom_000.nii.gz is not on the image's grid: "
                                          r"shape \(16, 16, 9\) differs from \(16, 16, 8\)"):
        fingerprint(load_dataset(tmp_path))


def test_thick_slices_under_a_small_budget_plan_in_finite_time():
    from medseg.plan import initial_patch_size

    patch = initial_patch_size([100, 100, 12], [1.0, 1.0, 12.0], 40000)
    assert patch[2] == 12 and patch[0] * patch[1] * patch[2] <= 40000  # not padded to 16
    assert initial_patch_size([100, 100, 100], [1.0, 1.0, 1.0], 4096) == [16, 16, 16]


def test_small_volumes_get_a_buildable_network():
    from medseg.model import create_model

    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[14, 14, 14]] * 3)
    plan = make_plan(fp, PlanConfig())
    assert plan.patch_size == [16, 16, 16] and len(plan.strides) == 3
    create_model(plan)
    with pytest.raises(MedsegError, match="too small for a U-Net"):
        make_plan(fp, PlanConfig(patch_size=[4, 4, 4]))


def test_negative_label_values_are_refused_without_a_label_map(tmp_path):
    import nibabel as nib

    from medseg.phantoms import make_phantom

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for index in range(2):
        phantom = make_phantom(index, shape=(16, 16, 8))
        label = phantom.label.astype(np.int16)
        label[0, 0, 0] = -1
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine),
                 tmp_path / "images" / f"c{index}.nii.gz")
        nib.save(nib.Nifti1Image(label, phantom.affine), tmp_path / "labels" / f"c{index}.nii.gz")
    with pytest.raises(MedsegError, match=r"c0.nii.gz: label values \[-1\] are negative"):
        fingerprint(load_dataset(tmp_path))


def test_an_axis_out_of_voxels_does_not_stop_the_pooling_of_the_others():
    """A thin slab: its fine third axis runs out of voxels first and kept its fine spacing,
    so the in-plane axes, 'coarser than twice the finest', stopped pooling at 12 voxels."""
    kernels, strides = kernels_and_strides([192, 192, 24], [1.0, 1.0, 1.0])
    bottleneck = np.asarray([192, 192, 24]) // np.prod(strides, axis=0)
    assert bottleneck.tolist() == [6, 6, 6]
    assert all(k == [3, 3, 3] for k in kernels)  # a 3-wide kernel stays 3 wide


def test_axes_of_one_length_get_one_patch_size_and_the_topology_of_the_rounded_patch():
    """A CT's rows and columns were shrunk in turn (patch [128, 160, 48]) and planned before
    rounding up: one pooled 4 times, the other 5."""
    fp = synthetic_fingerprint([[0.8, 0.8, 2.5]] * 5, [[512, 512, 120]] * 5, modality="CT")
    plan = make_plan(fp, PlanConfig())
    assert plan.patch_size[0] == plan.patch_size[1]
    assert [s[0] for s in plan.strides] == [s[1] for s in plan.strides]
    bottleneck = np.asarray(plan.patch_size) // np.prod(plan.strides, axis=0)
    assert (bottleneck < 8).all()  # no axis left with voxels for one more pooling
    assert (np.asarray(plan.patch_size) % np.prod(plan.strides, axis=0) == 0).all()


def test_ct_normalization_of_a_foreground_of_one_intensity_is_bounded():
    """ScaleIntensityRange divides by zero when the percentiles meet and returned the raw
    intensities, unclipped."""
    import torch

    from medseg.plan import _intensity_stats, _normalization
    from medseg.transforms import _normalize

    norm = _normalization("CT", _intensity_stats(np.full(5000, 40.0)))
    image = torch.linspace(-1000, 1000, 512).reshape(1, 8, 8, 8)
    out = _normalize("image", norm)({"image": image})["image"]
    assert torch.equal(torch.as_tensor(out), torch.zeros_like(image))


@pytest.mark.parametrize("key, value, expected", [
    ("target_spacing", "3", "'target_spacing' must be 3 positive numbers (mm), not \"3\""),
    ("target_spacing", [3, 3], "'target_spacing' must be 3 positive numbers"),
    ("target_spacing", [3, -3, 3], "'target_spacing' must be 3 positive numbers"),
    ("patch_size", [24, 24], "'patch_size' must be 3 positive integers, not [24, 24]"),
    ("num_classes", "4", "'num_classes' must be an integer of at least 2, not \"4\""),
    ("num_classes", 2, "label id 2 is beyond 'num_classes' 2"),
    ("filters", [4, 8], "'kernels', 'strides' and 'filters' must have one entry per network"),
    ("normalization", [{"scheme": "ct"}], "'normalization' must be a list of"),
    ("normalization", [{"scheme": "foo"}], "'normalization' must be a list of"),
    ("normalization", [], "'modalities' and 'normalization' must have one entry per channel"),
    ("modalities", [], "'modalities' and 'normalization' must have one entry per channel"),
    ("mirror_axes", [5], "'mirror_axes' must be a list of distinct axes among 0, 1, 2"),
    ("deep_supervision", "yes", "'deep_supervision' must be true or false, not \"yes\""),
    ("network", "unet", "'network' must be 'dynunet' or 'segresnet'"),
    ("batch_size", None, "'batch_size' is missing"),
    ("extra", 1, "unknown key(s) 'extra'"),
    ("labels", {"0": "background", "1": "liver", "2": "liver"},
     "'labels': label names must be unique; repeated: liver"),
])
def test_an_edited_plan_json_is_refused_naming_the_key(tmp_path, key, value, expected):
    """A hand-edited plan.json failed deep in the code (UFuncTypeError, IndexError, KeyError
    'clip', a string-formatting TypeError) or was taken silently (2 spacings, axis 5)."""
    import json

    from medseg.plan import load_plan, save_plan

    path = tmp_path / "plan.json"
    save_plan(make_plan(synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[64, 64, 64]] * 3),
                        PlanConfig()), path)
    assert load_plan(path).num_classes == 3  # as written, it loads
    data = json.loads(path.read_text(encoding="utf-8"))
    if value is None:
        del data[key]
    else:
        data[key] = value
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(MedsegError) as caught:
        load_plan(path)
    assert str(caught.value).startswith(f"{path}: not a plan medseg can read: {expected}")


def test_a_target_spacing_far_finer_than_the_data_is_refused_naming_the_key():
    """0.01 mm for 1 mm voxels made caching try a 151 TB allocation (a RuntimeError, exit 1,
    a run folder left without fold_0)."""
    from medseg.plan import refuse_unaffordable_spacing

    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 4, [[128, 128, 64]] * 4)
    fine = make_plan(fp, PlanConfig(target_spacing=[0.01, 0.01, 0.01]))
    with pytest.raises(MedsegError, match=r"'plan.target_spacing' \[0.01, 0.01, 0.01\] mm would "
                                          r"resample the largest case to 1.05e\+12 voxels"):
        refuse_unaffordable_spacing(fp, fine, memory_bytes=None)  # beyond 2^31 voxels anyway
    half = make_plan(fp, PlanConfig(target_spacing=[0.5, 0.5, 0.5]))
    refuse_unaffordable_spacing(fp, half, memory_bytes=None)  # 8.4 M voxels a case: fine
    # 4 cases x 8.4 M voxels x 2 float32 arrays: 0.25 GB, more than twice 0.1 GB
    with pytest.raises(MedsegError, match="this machine has 0.1 GB: choose a coarser spacing"):
        refuse_unaffordable_spacing(fp, half, memory_bytes=int(0.1 * 2**30))
    refuse_unaffordable_spacing(fp, half, memory_bytes=2**30)


@pytest.mark.parametrize(("spacing", "shape", "patch", "z_strides"), [
    ([0.7, 0.7, 5.0], [64, 64, 12], [64, 64, 12], [1, 1, 1, 2, 1]),  # z pooled once
    ([1.0, 1.0, 1.0], [256, 256, 3], [256, 256, 3], [1, 1, 1, 1, 1, 1]),  # a slab: never
    ([1.25, 1.25, 10.0], [200, 200, 10], [224, 224, 10], [1, 1, 1, 1, 2, 1]),  # z waits for 10 mm
])
def test_a_short_axis_is_planned_as_nnunet_plans_it_not_padded_to_16(spacing, shape, patch,
                                                                      z_strides):
    """A layouts trial found 12-slice cases padded to 16 and pooled twice, and a 3-slice
    slab padded to 16 (5x the data) and pooled into its padding, where nnU-Net keeps the
    slices it has."""
    from medseg.model import create_model

    plan = make_plan(synthetic_fingerprint([spacing] * 3, [shape] * 3), PlanConfig())
    assert plan.patch_size == patch
    assert [stride[2] for stride in plan.strides] == z_strides
    create_model(plan)


def test_ct_images_planned_as_mr_get_a_note(phantom_dataset, capsys):
    """The folders layout defaults to MR: a CT dataset was z-scored over its nonzero voxels
    without a word."""
    from medseg.datasets import load_dataset
    from medseg.plan import fingerprint, intensity_doubt

    fingerprint(load_dataset(phantom_dataset, modality="CT"))
    assert "medseg: note" not in capsys.readouterr().err
    fingerprint(load_dataset(phantom_dataset, modality="MR"))
    note = capsys.readouterr().err.strip().splitlines()[-1]
    assert note.startswith("medseg: note: channel 0 is planned as MR, but 6 of 6 cases look "
                           "otherwise (")
    assert "look like CT Hounsfield units, not MR) (set dataset.modality" in note
    assert intensity_doubt("MR", 0.0, 900.0) is None
    assert intensity_doubt("CT", -1024.0, 3000.0) is None
    assert intensity_doubt("CT", 0.0, 4095.0).startswith("no value below -100")
    assert intensity_doubt("noNorm", 1.0, 1.0) == "every voxel is 1"
