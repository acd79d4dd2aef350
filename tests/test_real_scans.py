"""Real DICOM series and CT from ../shared/data (skipped with a reason when absent): our
voxels and affines against independent converters' references, the geometry traps, and the
TotalSegmentator JPEG 2000 series against its mask's grid."""

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import SHARED_DATA, requires_shared
from scipy import ndimage

from medseg.dicom import LPS_TO_RAS, read_stack
from medseg.errors import MedsegError
from medseg.io import read_geometry, read_volume

REFERENCED = ["few_slices", "ge_mr", "j2k_compressed", "rle_compressed", "siemens_mr",
              "siemens_multiframe"]
# the trap series, by the names of this checkout and of dicom2nifti's test data
TRAPS = {
    "tilt": (["trap_gantry_tilt", "broken_gantrytilting"], ["gantry tilt of 14.0 degrees"]),
    "uneven_a": (["trap_uneven_slices_a", "broken_slicecount"],
                 ["uneven slice spacing: a gap of 10.00 mm"]),
    "uneven_b": (["trap_uneven_slices_b", "broken_sliceincrement"],
                 ["gantry tilt of 15.5 degrees", "uneven slice spacing"]),
    "ge_tilt_uneven": (["trap_ge_ct_tilt_uneven", "ge_ct_gantry_tilt"],
                       ["gantry tilt of 18.5 degrees", "uneven slice spacing"]),
}
AFFINE_TOLERANCE_MM = 0.01


def series_folder(*names: str):
    """The `series` folder of the first of these that exists, or skip."""
    for name in names:
        folder = SHARED_DATA / "dicom" / name
        if folder.exists():
            return folder / "series" if (folder / "series").is_dir() else folder
    return requires_shared("dicom", names[0])


def canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(data, affine))


@pytest.mark.parametrize("name", REFERENCED)
def test_series_matches_its_reference(name):
    folder = series_folder(name)
    reference = canonical(*_nifti(folder.parent / "reference.nii.gz"))
    volume = read_volume(folder, dtype=None)
    ours = canonical(volume.data, volume.affine)
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(reference.dataobj))
    difference = np.abs(ours.affine - reference.affine).max()
    assert difference < AFFINE_TOLERANCE_MM, f"{name}: affines differ by {difference} mm"


@pytest.mark.parametrize("trap", sorted(TRAPS))
def test_trap_series_are_refused_in_one_clear_line(trap):
    names, expected = TRAPS[trap]
    folder = series_folder(*names)
    with pytest.raises(MedsegError) as caught:
        read_volume(folder)
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message
    assert "--resample-irregular" in message
    for text in expected:
        assert text in message


def test_ge_tilted_uneven_series_resampled_slices_land_where_they_belong():
    folder = series_folder(*TRAPS["ge_tilt_uneven"][0])
    volume = read_volume(folder, resample_irregular=True)
    stack = read_stack(folder)
    to_voxel = np.linalg.inv(volume.affine)
    coefficients = ndimage.spline_filter(volume.data, order=3, mode="nearest")
    errors, naive_errors = [], []
    for frame in stack.frames:
        original = pydicom.dcmread(frame.path).pixel_array * frame.slope + frame.intercept
        rows, columns = np.mgrid[0:original.shape[0]:4, 0:original.shape[1]:4]
        in_plane = (np.outer(stack.row, columns.ravel()) * stack.spacing[0]
                    + np.outer(stack.column, rows.ravel()) * stack.spacing[1])
        body = original[::4, ::4].ravel() > -500
        # where the slice physically is, and where a reader ignoring the tilt would put it
        depth = (frame.position - stack.frames[0].position) @ stack.normal
        for origin, sink in ((frame.position, errors),
                             (stack.frames[0].position + depth * stack.normal, naive_errors)):
            sampled = _sample(coefficients, to_voxel, origin[:, None] + in_plane)
            sink.append(np.mean(np.abs(sampled - original[::4, ::4].ravel())[body]))
    # mean |difference| over the body, in HU: cubic interpolation of noisy CT, twice (our
    # resampling, then this sampling) costs a few HU; misplaced slices cost hundreds
    assert max(errors) < 25.0, errors
    assert np.mean(errors) < 0.05 * np.mean(naive_errors), (errors, naive_errors)


def test_totalsegmentator_jpeg2000_series_lies_on_its_mask_grid():
    folder = requires_shared("totalseg_ct", "example_ct_dicom")
    seg = nib.as_closest_canonical(nib.load(folder.parent / "example_seg_dicom.nii.gz"))
    volume = read_volume(folder, dtype=None)
    ct = canonical(volume.data, volume.affine)
    assert ct.shape == seg.shape
    assert np.abs(ct.affine - seg.affine).max() < AFFINE_TOLERANCE_MM
    assert read_geometry(folder).shape == volume.spatial_shape
    hu = np.asarray(ct.dataobj)
    labels = np.asarray(seg.dataobj)
    # structures lie in the body, not in the air around it: the grids agree in orientation
    assert (hu[labels > 0] > -300).mean() > 0.95
    assert (hu[:, ::-1][labels > 0] > -300).mean() < 0.8


def _nifti(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def _sample(coefficients: np.ndarray, to_voxel: np.ndarray,
            lps_points: np.ndarray) -> np.ndarray:
    """Cubic spline values (from prefiltered coefficients) at LPS points."""
    ras = LPS_TO_RAS[:3, :3] @ lps_points
    voxels = to_voxel[:3, :3] @ ras + to_voxel[:3, 3:4]
    return ndimage.map_coordinates(coefficients, voxels, order=3, mode="nearest",
                                   prefilter=False)
