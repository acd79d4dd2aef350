"""Review of today's crossval, dataset, plan and convert-msd changes (session 26f)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.cli import main

SHAPE = (6, 7, 8)


def _msd_task(root: Path) -> Path:
    """A one-channel MSD task of two small seeded cases, labels 0/1."""
    rng = np.random.default_rng(2026)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    training = []
    for index in range(2):
        image = rng.normal(size=SHAPE).astype(np.float32)
        label = (rng.random(SHAPE) > 0.7).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"c{index}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"c{index}.nii.gz")
        training.append({"image": f"./imagesTr/c{index}.nii.gz",
                         "label": f"./labelsTr/c{index}.nii.gz"})
    description = {"name": "X", "modality": {"0": "MR"},
                   "labels": {"0": "background", "1": "organ"}, "numTraining": 2,
                   "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


def test_convert_msd_removes_what_a_killed_conversion_left_beside_a_new_out(tmp_path):
    """A conversion into a new OUT killed outright (SIGKILL, the OOM killer) left a hidden
    full copy, .OUT.part-XXXXXXXX, beside it that nothing removed or named: each killed try
    kept one more. The next conversion into OUT removes it, as it does the one inside an
    existing OUT; another folder's, or a name not of that form, is left alone."""
    task = _msd_task(tmp_path / "Task09_X")
    left = tmp_path / ".out.part-0a1b2c3d"
    (left / "imagesTr").mkdir(parents=True)
    (left / "imagesTr" / "c0_0000.nii.gz").write_bytes(b"half")
    others = [tmp_path / ".other.part-0a1b2c3d", tmp_path / ".out.part-mine"]
    for other in others:
        other.mkdir()
    assert main(["convert-msd", str(task), str(tmp_path / "out")]) == 0
    assert not left.exists()
    assert all(other.is_dir() for other in others)
    assert (tmp_path / "out" / "dataset.json").is_file()


def test_a_detached_data_file_named_list_in_lower_case_is_a_file(tmp_path):
    """ITK and NRRD read a list of data files only for a name starting with 'LIST' in
    capitals; 'list.raw' is one file, whose SHA-256 crossval --continue can compare, not a
    list (a case segmented again on every --continue)."""
    import SimpleITK as sitk

    from medseg import crossval
    from medseg.itkio import detached_data_files

    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    sitk.WriteImage(image, str(tmp_path / "list.mhd"))
    data = tmp_path / "list.raw"
    assert detached_data_files(tmp_path / "list.mhd") == [data]
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "list.mhd"))).sum() == 276
    assert crossval._image_digest(tmp_path / "list.mhd") is not None
    listed = tmp_path / "slices.mhd"
    listed.write_text("NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\n"
                      "ElementDataFile = LIST 2D\na.raw\nb.raw\n", encoding="ascii")
    assert detached_data_files(listed) is None
