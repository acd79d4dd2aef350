"""Review s27N: metrics and evaluation checked against MONAI's metrics and their conventions."""

import math

import nibabel as nib
import numpy as np
import pytest
from helpers import requires_shared

from medseg.evaluate import evaluate_case

LABELS = {0: "background", 1: "a"}


def save(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), path)


def test_a_failed_case_gives_the_reference_volume_a_scored_case_gives(tmp_path):
    """A float32 header's 0.7 mm reads 0.699999988: a failed case's ref_ml was computed with
    it (0.21608999 ml) where a scored case of the same reference rounds the spacing first
    (0.21609 ml), so one reference's volume changed with its prediction's fate."""
    reference = np.zeros((20, 20, 8), np.uint8)
    reference[5:12, 5:12, 2:5] = 1  # 147 voxels of 0.7 x 0.7 x 3 mm: 0.21609 ml
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    save(tmp_path / "ref.nii.gz", reference, affine)
    save(tmp_path / "pred.nii.gz", reference, affine)
    scored = evaluate_case("c", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", LABELS)
    failed = evaluate_case("c", None, tmp_path / "ref.nii.gz", LABELS)
    assert failed.error and not scored.error
    assert scored.scores["a"]["ref_ml"] == pytest.approx(0.21609, rel=1e-12)
    assert failed.scores["a"]["ref_ml"] == scored.scores["a"]["ref_ml"]


def unoriented(path, data, spacing):
    """A NIfTI whose qform and sform codes are 0, as nibabel's Nifti1Image(data, None) writes."""
    image = nib.Nifti1Image(data.astype(np.uint8), None)
    image.header.set_zooms(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def test_a_header_without_orientation_is_not_resampled_into_a_dice_of_zero(tmp_path):
    """A mask saved with nibabel's Nifti1Image(data, None) has no orientation: nibabel puts
    its centre at the origin. `--resample` moved it there (56 mm away from its reference
    on the very same voxels) and scored Dice 0 as if the model had missed; the message
    without `--resample` recommended it. Now the case fails saying why."""
    reference = np.zeros((20, 20, 8), np.uint8)
    reference[3:8, 3:8, 2:5] = 1
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[:3, 3] = [-50.0, 30.0, 10.0]
    save(tmp_path / "ref" / "c.nii.gz", reference, affine)
    unoriented(tmp_path / "pred" / "c.nii.gz", reference, (0.7, 0.7, 3.0))
    for resample in (False, True):
        result = evaluate_case("c", tmp_path / "pred" / "c.nii.gz",
                               tmp_path / "ref" / "c.nii.gz", LABELS, resample=resample)
        assert not result.resampled
        assert result.error and "gives no orientation" in result.error
        assert "`--resample` cannot place it" in result.error
    # the reverse: a reference without orientation, its prediction elsewhere
    unoriented(tmp_path / "ref2" / "c.nii.gz", reference, (0.7, 0.7, 3.0))
    save(tmp_path / "pred2" / "c.nii.gz", reference, affine)
    result = evaluate_case("c", tmp_path / "pred2" / "c.nii.gz",
                           tmp_path / "ref2" / "c.nii.gz", LABELS, resample=True)
    assert result.error and "the reference's" in result.error and not result.resampled
    assert "write the reference with its scan's header" in result.error  # not "the mask"


@pytest.mark.filterwarnings("ignore:the ground truth of class:UserWarning")  # its empty case
def test_docs_numbers_for_voxel_and_area_weighted_surface_dice():
    """formats.md's Metrics section: a liver grown by one 3 mm voxel scores NSD 0.29 at 2 mm
    counted by surface voxels (medseg, MONAI's default) and 0.57 weighted by surface area
    (the MSD challenge's, MONAI's use_subvoxels=True); MONAI's HD95 of an empty reference
    is NaN. What the docs say about the other tools, checked."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from scipy import ndimage

    from medseg.metrics import surface_scores

    path = requires_shared("totalseg_ct", "example_seg.nii.gz")
    liver = np.asarray(nib.load(path).dataobj) == 5
    grown = ndimage.binary_dilation(liver)

    def one_hot(mask):
        tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
        return torch.cat([1 - tensor, tensor], 1)

    spacing = (3.0, 3.0, 3.0)
    assert round(surface_scores(grown, liver, spacing, 2.0)["nsd"], 2) == 0.29
    by_area = compute_surface_dice(one_hot(grown), one_hot(liver), [2.0], spacing=spacing,
                                   use_subvoxels=True)
    assert round(float(by_area), 2) == 0.57
    empty = np.zeros_like(liver)
    assert math.isnan(float(compute_hausdorff_distance(one_hot(liver), one_hot(empty),
                                                       percentile=95)))


def test_a_mask_of_the_reference_shape_under_a_wrong_header_is_not_sent_to_resample(tmp_path):
    """A mask saved with nibabel's Nifti1Image(mask, numpy.eye(4)) holds the reference's
    voxels under a header that puts them 50 mm away: the failure recommended `--resample`
    alone, which moves them there and scores Dice 0. A mask of the reference's shape now
    also hears that it may only need its scan's header; one of another shape does not."""
    reference = np.zeros((20, 20, 8), np.uint8)
    reference[3:8, 3:8, 2:5] = 1
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[:3, 3] = [-50.0, 30.0, 10.0]
    save(tmp_path / "ref.nii.gz", reference, affine)
    save(tmp_path / "pred.nii.gz", reference, np.eye(4))
    save(tmp_path / "coarse.nii.gz", reference[::2, ::2], np.diag([1.4, 1.4, 3.0, 1.0]))
    same_shape = evaluate_case("c", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", LABELS)
    assert "write such a mask with its scan's header" in same_shape.error
    other = evaluate_case("c", tmp_path / "coarse.nii.gz", tmp_path / "ref.nii.gz", LABELS)
    assert "--resample` resamples it by nearest neighbour" in other.error
    assert "its scan's header" not in other.error
