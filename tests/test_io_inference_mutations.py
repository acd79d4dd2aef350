"""Reading, writing and inference behaviour that a mutation audit of io, itkio, reader, fileio
and inference found unguarded: each test names the single-line bug it kills. Small synthetic
volumes with fixed seeds, no training."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.inference import foreground_box, labels_on_input_grid, stream_probabilities
from medseg.io import read_geometry, read_label_map, read_volume, write_mask

# ---------------------------------------------------------------- writing masks


def save_nifti(path, data, affine, units=None):
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if units:
        image.header.set_xyzt_units(units)
    nib.save(image, path)
    return path


def test_label_256_is_written_as_uint16_and_255_as_uint8(tmp_path):
    """uint8 holds 0..255: a label 256 written as uint8 wraps round to background.
    Kills: `mask.max(initial=0) < 256` -> `<= 256` in io.write_mask."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    source = save_nifti(tmp_path / "in.nii.gz", np.zeros((4, 5, 6), np.float32), affine)
    for top, dtype in ((255, np.uint8), (256, np.uint16)):
        mask = np.zeros((4, 5, 6), np.int64)
        mask[1, 2, 3] = top
        mask[2, 3, 4] = 7
        for suffix in (".nii.gz", ".nrrd"):
            written = read_volume(write_mask(mask, source, tmp_path / f"m{top}{suffix}"),
                                  dtype=None)
            assert written.data.dtype == dtype, (top, suffix)
            np.testing.assert_array_equal(written.data, mask)


def test_a_nifti_mask_of_a_headerless_input_has_scanner_codes_and_mm(tmp_path):
    """A mask written as NIfTI for an NRRD (or DICOM) input has no source header to copy:
    its qform and sform must both say scanner coordinates, in millimetres, so that tools
    preferring the qform (FSL, ITK for some codes) put it where nibabel does.
    Kills: the qform code (or the units) not set in io._nifti_image's headerless branch."""
    affine = np.array([[-0.7, 0, 0, 10.0], [0, -0.9, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    save_nifti(tmp_path / "in.nii.gz", np.zeros((5, 6, 7), np.int16), affine)
    from medseg.io import convert_volume

    nrrd = convert_volume(tmp_path / "in.nii.gz", tmp_path / "in.nrrd")
    geometry = read_geometry(nrrd)
    assert geometry.nifti_header is None
    mask = np.random.default_rng(2).integers(0, 3, size=(5, 6, 7))
    header = nib.load(write_mask(mask, geometry, tmp_path / "mask.nii.gz")).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    assert header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)
    np.testing.assert_allclose(header.get_sform(), affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_an_itk_mask_of_an_oblique_grid_has_its_spacing_and_unit_directions(tmp_path, suffix):
    """ITK keeps spacing and direction cosines apart: on an oblique grid, the written
    file's spacing must be the voxel spacing and its directions unit vectors at right
    angles (their product alone reading back right is not enough: tools that take the
    spacing, or orthonormalise the directions, would misplace or misscale the mask).
    Kills (MetaImage; NRRD stores only their product): the spacing taken from the rows
    (`axis=1`) instead of the columns in itkio.write_itk."""
    sitk = pytest.importorskip("SimpleITK")
    angle = np.deg2rad(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.6, 1.4, 3.0])
    affine[:3, 3] = [5.0, -7.0, 11.0]
    source = save_nifti(tmp_path / "in.nii.gz", np.zeros((5, 6, 7), np.int16), affine)
    mask = np.random.default_rng(6).integers(0, 3, size=(5, 6, 7))
    written = sitk.ReadImage(str(write_mask(mask, source, tmp_path / f"mask{suffix}")))
    np.testing.assert_allclose(written.GetSpacing(), (0.6, 1.4, 3.0), atol=1e-6)
    direction = np.array(written.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(direction, np.diag([-1, -1, 1]) @ rotation, atol=1e-6)


# ---------------------------------------------------------------- reading


def test_header_geometry_of_a_nifti_in_metres_is_in_millimetres(tmp_path):
    """read_geometry (headers only: evaluate, check and write_mask's path reference use it)
    must give the affine read_volume gives, in millimetres, origin included.
    Kills: `nifti_affine_mm(image)` -> `image.affine` in io.read_geometry, and
    `affine[:3, :]` -> `affine[:3, :3]` (the origin left in metres) in io.nifti_affine_mm."""
    affine = np.diag([0.0008, 0.0009, 0.002, 1.0])
    affine[:3, 3] = [0.01, -0.02, 0.03]
    path = save_nifti(tmp_path / "metres.nii.gz", np.zeros((4, 5, 6), np.int16), affine,
                      units="meter")
    expected = np.diag([0.8, 0.9, 2.0, 1.0])
    expected[:3, 3] = [10.0, -20.0, 30.0]
    np.testing.assert_allclose(read_volume(path).affine, expected, atol=1e-6)
    np.testing.assert_allclose(read_geometry(path).affine, expected, atol=1e-6)


def test_a_scaled_scan_is_read_scaled_as_float32(tmp_path):
    """A CT stored as uint16 with scl_slope 2 / scl_inter -1024 is read (float32, the
    default) in Hounsfield units, not as its raw stored numbers.
    Kills: the float read of io._read_nifti taking `image.dataobj.get_unscaled()`."""
    stored = np.random.default_rng(0).integers(0, 3000, size=(6, 7, 8)).astype(np.uint16)
    image = nib.Nifti1Image(stored, np.diag([0.8, 0.8, 2.0, 1.0]))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    volume = read_volume(tmp_path / "ct.nii.gz")
    assert volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, stored * 2.0 - 1024)


def test_float_labels_a_rounding_error_below_a_whole_number_round_up(tmp_path):
    """A label map stored as float32 through a scaled header holds 1.9999999 for label 2:
    rounded, not truncated to 1. Kills: `data = rounded` dropped in io.read_label_map."""
    labels = np.random.default_rng(3).integers(0, 4, size=(5, 6, 7))
    stored = (labels - 1e-5).astype(np.float32)
    path = save_nifti(tmp_path / "label.nii.gz", stored, np.eye(4))
    result = read_label_map(path)
    assert result.data.dtype == np.int32
    np.testing.assert_array_equal(result.data, labels)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_volumes_are_read_in_the_requested_type(tmp_path, suffix):
    """read_volume's dtype holds for NRRD/MetaImage as for NIfTI: float32 by default, the
    stored type with dtype=None. Kills: the dtype dropped in itkio.read_itk."""
    from medseg.io import convert_volume

    data = np.random.default_rng(4).integers(-100, 100, size=(4, 5, 6)).astype(np.int16)
    source = save_nifti(tmp_path / "in.nii.gz", data, np.eye(4))
    path = convert_volume(source, tmp_path / f"in{suffix}")
    assert read_volume(path).data.dtype == np.float32
    assert read_volume(path, dtype=None).data.dtype == np.int16
    assert read_volume(path, dtype=np.float64).data.dtype == np.float64


# ---------------------------------------------------------------- sliding window

CLASSES = 3


def pointwise_network(batch: torch.Tensor) -> torch.Tensor:
    """Class probabilities from each voxel's own value: any window, any weighting gives the
    same probabilities at a voxel, so the streamed planes must be exactly these."""
    value = batch[:, :1]
    return torch.softmax(torch.cat([value, -value, 0.5 * value ** 2], dim=1), dim=1)


@pytest.mark.parametrize("shape", [(13, 20, 9), (17, 11, 15)])
def test_windows_over_an_odd_padding_put_each_plane_back_in_place(shape):
    """Axes smaller than the window are padded, the odd voxel after: the streamed planes
    must be those of the unpadded voxels, in place (a one-voxel shift is a mask off by a
    voxel). Kills: the padding's sides swapped in stream_probabilities, and planes of the
    z padding streamed out (the flush range not starting at the padding's end)."""
    patch, step = (16, 16, 12), 0.5
    image = torch.randn((1, *shape), generator=torch.Generator().manual_seed(5))
    expected = pointwise_network(image[None])[0]
    seen = []
    for first, planes in stream_probabilities(pointwise_network, image, CLASSES, patch, step,
                                              batch_size=4):
        assert planes.shape[:3] == (CLASSES, *shape[:2])
        assert first >= 0
        seen.extend(range(first, first + planes.shape[-1]))
        np.testing.assert_allclose(planes.numpy(),
                                   expected[..., first:first + planes.shape[-1]].numpy(),
                                   atol=2e-3)
    assert seen == list(range(shape[2]))


def independent_gaussian(patch) -> np.ndarray:
    """nnU-Net's and MONAI's importance: a separable Gaussian of sigma patch / 8 about the
    window's centre, floored at 1e-3 (written out here, not taken from MONAI)."""
    axes = []
    for p in patch:
        x = np.arange(p) - (p - 1) / 2
        axes.append(np.exp(-x ** 2 / (2 * (p / 8) ** 2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights, max(weights.min(), 1e-3))


def window_position_network(batch: torch.Tensor) -> torch.Tensor:
    """Probabilities that depend on where a voxel lies in its window (not on the image):
    overlapping windows disagree, and only their weighting decides each voxel."""
    _, _, nx, ny, nz = batch.shape
    i, j, k = torch.meshgrid(torch.linspace(-1, 1, nx), torch.linspace(-1, 1, ny),
                             torch.linspace(-1, 1, nz), indexing="ij")
    logits = torch.stack([3 * i, 2 * k * k - 1, -3 * i * k + 0.5 * j])
    return torch.softmax(logits, dim=0).expand(batch.shape[0], -1, -1, -1, -1).clone()


@pytest.mark.parametrize("step", [0.5, 1.0])
def test_overlapping_windows_are_blended_with_a_gaussian_of_sigma_an_eighth_patch(step):
    """Each voxel's probabilities are the Gaussian-weighted mean of its windows (sigma =
    patch / 8, the weighting nnU-Net's models are trained to expect), computed here the
    plain way in float64. Kills: the importance map made constant, or its sigma changed, in
    inference.gaussian_importance (the existing whole-volume reference takes its weights
    from that same function, so it cannot see either); and the step argument not passed on
    to window_starts in stream_probabilities (0.5 taken whatever the configured step)."""
    shape, patch = (28, 16, 30), (16, 16, 12)
    image = torch.zeros((1, *shape))
    importance = independent_gaussian(patch)
    scores = np.zeros((CLASSES, *shape))
    weights = np.zeros(shape)
    window = window_position_network(torch.zeros((1, 1, *patch)))[0].double().numpy()
    from medseg.inference import window_starts

    for x in window_starts(shape[0], patch[0], step):
        for y in window_starts(shape[1], patch[1], step):
            for z in window_starts(shape[2], patch[2], step):
                box = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                scores[(slice(None), *box)] += window * importance
                weights[box] += importance
    expected = scores / weights
    got = torch.cat([planes for _, planes in stream_probabilities(
        window_position_network, image, CLASSES, patch, step, batch_size=2)], dim=-1)
    np.testing.assert_allclose(got.numpy(), expected, atol=5e-3)


def test_a_second_channels_foreground_widens_the_box():
    """nnU-Net crops to the voxels that are foreground in any channel: a lesion seen only
    in the second channel (FLAIR beside a T1 at its floor) must not be cropped away.
    Kills: the any-channel reduction in inference.foreground_box replaced by channel 0."""
    image = torch.zeros((2, 40, 40, 40))
    image[0, 10:20, 10:20, 10:20] = 1.0
    image[1, 25:30, 30:35, 2:4] = 1.0
    box = foreground_box(image, (16, 16, 16), torch.tensor([0.0, 0.0]))
    assert box == (slice(6, 34), slice(6, 39), slice(0, 24))


def test_more_than_256_classes_give_uint16_labels():
    """Class 256 of a 257-class model would wrap to background in uint8.
    Kills: `num_classes <= 256` -> `<= 257` in inference.labels_on_input_grid."""
    from medseg.inference import axis_maps

    classes, shape = 257, (3, 4, 2)
    probabilities = torch.zeros((classes, *shape))
    probabilities[256] = 1.0
    probabilities[0, 0] = 2.0  # the first row: background
    identity = np.eye(4)
    labels = labels_on_input_grid(iter([(0, probabilities)]), shape,
                                  tuple(slice(0, s) for s in shape), classes,
                                  axis_maps(identity, identity, shape), shape)
    assert labels.dtype == np.uint16
    assert (labels[0] == 0).all() and (labels[1:] == 256).all()


def test_voxels_a_fraction_of_a_network_voxel_before_the_box_are_interpolated():
    """An input voxel whose network coordinate is 3.75 lies between a background plane (3)
    and the box's first plane (4): interpolated, it takes the box's class (0.25 x
    background + 0.75 x class 2). Kills: `coords > box.start - 1` -> `coords >= box.start`
    in inference._reaching (such voxels left background: the mask one fine voxel short at
    every box edge)."""
    from medseg.inference import axis_maps

    network_shape = (8, 8, 8)
    box = (slice(4, 8), slice(0, 8), slice(0, 8))
    inside = torch.zeros((CLASSES, 4, 8, 8))
    inside[2] = 1.0
    network_affine = np.eye(4)
    input_affine = np.diag([0.5, 1.0, 1.0, 1.0])
    input_affine[0, 3] = 0.25  # input x index i lies at network x 0.5 i + 0.25
    input_shape = (16, 8, 8)
    labels = labels_on_input_grid(iter([(0, inside)]), network_shape, box, CLASSES,
                                  axis_maps(input_affine, network_affine, input_shape),
                                  input_shape)
    expected = np.zeros(input_shape, np.uint8)
    expected[7:] = 2  # network x 3.75 and beyond
    np.testing.assert_array_equal(labels, expected)


# ---------------------------------------------------------------- MedsegReader in MONAI


def test_medseg_reader_stacks_a_list_of_channel_files_in_order(tmp_path):
    """MedsegReader under MONAI's LoadImage, given one file per channel, stacks them as
    channels 0, 1, ... in the order given. Kills: the channel list reversed in
    reader.MedsegReader.get_data."""
    from monai.transforms import LoadImage

    from medseg.reader import MedsegReader

    rng = np.random.default_rng(7)
    first, second = (rng.normal(size=(4, 5, 6)).astype(np.float32) for _ in range(2))
    paths = [save_nifti(tmp_path / f"c{k}.nii.gz", data, np.eye(4))
             for k, data in enumerate((first, second))]
    image = LoadImage(reader=MedsegReader(), image_only=True)([str(p) for p in paths])
    assert tuple(image.shape) == (2, 4, 5, 6)
    np.testing.assert_array_equal(image[0].numpy(), first)
    np.testing.assert_array_equal(image[1].numpy(), second)


def test_medseg_reader_refuses_channel_files_on_other_grids(tmp_path):
    """Channels stacked voxel by voxel must share one grid: a second channel shifted by
    5 mm is refused, naming it. Kills: the refuse_other_grid check dropped in
    reader.MedsegReader.get_data (LoadVolumed checks its keys, but not a list in one)."""
    from monai.transforms import LoadImage

    from medseg.errors import MedsegError
    from medseg.reader import MedsegReader

    data = np.zeros((4, 5, 6), np.float32)
    shifted = np.eye(4)
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    paths = [save_nifti(tmp_path / "c0.nii.gz", data, np.eye(4)),
             save_nifti(tmp_path / "c1.nii.gz", data, shifted)]
    with pytest.raises(MedsegError, match=r"c1.nii.gz: not on the grid of c0.nii.gz"):
        LoadImage(reader=MedsegReader(), image_only=True)([str(p) for p in paths])
