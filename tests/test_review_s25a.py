"""Review of `predict --statistics` over every channel of a multi-channel model
(session 25a)."""

import weakref

import nibabel as nib
import numpy as np

import medseg.volumetry as volumetry
from medseg.volumetry import CaseInputs, case_rows


def test_channel_files_are_read_one_at_a_time(tmp_path, monkeypatch):
    """A case of CASE_000K files: the generator kept channel K's voxels (its local `scan`)
    while channel K+1 was read, two channels' float32 volumes at once; now only the one
    being read is held."""
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.uint8), affine), tmp_path / "m.nii.gz")
    files = []
    for k in range(3):
        files.append(tmp_path / f"c_{k:04d}.nii.gz")
        nib.save(nib.Nifti1Image(np.full((6, 6, 6), 10.0 * k, np.float32), affine), files[-1])
    read, alive = volumetry.read_volume, []

    def spy(path, *args, **kwargs):
        alive.append(sum(ref() is not None for ref in held))
        volume = read(path, *args, **kwargs)
        held.append(weakref.ref(volume.data))
        return volume

    held: list = []
    monkeypatch.setattr(volumetry, "read_volume", spy)
    row = case_rows(CaseInputs("c", tmp_path / "m.nii.gz", files[0], tuple(files)),
                    {0: "background", 1: "liver"}, channels=3)[0]
    assert alive == [0, 0, 0]  # no earlier channel's voxels left when the next is read
    assert (row["intensity_mean"], row["intensity_mean_1"], row["intensity_mean_2"]) == \
        (0.0, 10.0, 20.0)
    assert row["note"] == ""
