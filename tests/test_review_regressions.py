"""Regressions a review of the thirteenth session's changes found: a --set entry of a
mapping named as the culprit, a second channel stored in another axis order refused alike by
check and training, whole non-image DICOM files (no SOP class, a wrong group length) skipped
as before, and main() not waiting for a caller's own thread pool."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.errors import MedsegError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
AFFINE = np.diag([2.0, 1.5, 3.0, 1.0])
SHAPE = (12, 10, 8)


# 1. config._Source: a bad value given as --set section.dict.KEY=... is blamed on the file
@pytest.mark.parametrize("override", ["predict.min_component_ml.1=-5",
                                      "predict.min_component_ml.1=abc",
                                      "dataset.labels.1=[x]"])
def test_review_bad_dict_entry_override_is_blamed_on_its_set_option(tmp_path, override):
    from medseg.config import load_workflow
    with pytest.raises(MedsegError) as info:
        load_workflow(None, [override])
    assert "--set" in str(info.value), str(info.value)


def test_review_fold_beyond_overridden_folds_names_the_override(tmp_path):
    from medseg.config import load_workflow
    wf = tmp_path / "wf.yaml"
    wf.write_text("train:\n  fold: 3\n", encoding="utf-8")
    with pytest.raises(MedsegError) as info:
        load_workflow(wf, ["train.folds=2"])
    assert "train.folds=2" in str(info.value), str(info.value)


# 2. LoadVolumed reorders a second *image channel* (not only the label); check refuses it
def _flip_y(data, affine):
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, data.shape[1] - 1
    return np.ascontiguousarray(data[:, ::-1]), affine @ flip


def test_review_channel_in_other_axis_order_treated_alike_by_check_and_training(tmp_path):
    from medseg.check import check_dataset
    from medseg.reader import LoadVolumed
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 2:5, 2:5] = 1
    entries = []
    for k in range(2):
        c0 = rng.normal(size=SHAPE).astype(np.float32)
        c1 = rng.normal(size=SHAPE).astype(np.float32)
        nib.save(nib.Nifti1Image(c0, AFFINE), root / "imagesTr" / f"c{k}_0000.nii.gz")
        nib.save(nib.Nifti1Image(*_flip_y(c1, AFFINE)), root / "imagesTr" / f"c{k}_0001.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / f"c{k}.nii.gz")
        entries.append({"image": f"./imagesTr/c{k}.nii.gz", "label": f"./labelsTr/c{k}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "a"}, "modality": {"0": "MR", "1": "MR"},
        "training": entries}), encoding="utf-8")
    check_errors = [p for p in check_dataset(root).problems if p.severity == "error"]
    load = LoadVolumed(["image_0", "image_1", "label"])
    try:
        load({"image_0": str(root / "imagesTr/c0_0000.nii.gz"),
              "image_1": str(root / "imagesTr/c0_0001.nii.gz"),
              "label": str(root / "labelsTr/c0.nii.gz")})
        training_accepts = True
    except MedsegError:
        training_accepts = False
    # check and training must agree (either both refuse or both accept)
    assert training_accepts == (not check_errors), (training_accepts,
                                                     [p.message for p in check_errors])


# 3. DICOM: a whole Part-10 non-image file without a SOP class sinks the series
def _series(tmp_path: Path) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    for k in range(3):
        ds.SOPInstanceUID = f"1.2.3.{k}"
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def test_review_whole_non_image_file_without_sop_class_does_not_sink_series(tmp_path):
    from medseg.dicom import list_series
    folder = _series(tmp_path)
    assert len(list_series(folder)) == 1
    shutil.copy(PYDICOM_FILES / "nested_priv_SQ.dcm", folder / "private.dcm")
    list_series(folder)  # MedsegError: DICOM file without a whole file meta or SOP class


def test_review_sr_with_wrong_group_length_does_not_sink_series(tmp_path):
    from medseg.dicom import list_series
    folder = _series(tmp_path)
    raw = bytearray((PYDICOM_FILES / "test-SR.dcm").read_bytes())
    assert raw[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) UL, value at 140
    raw[140:144] = struct.pack("<I", len(raw))  # a wrong (too large) group length
    (folder / "sr.dcm").write_bytes(bytes(raw))
    assert pydicom.dcmread(folder / "sr.dcm").SOPClassUID  # pydicom reads it whole
    list_series(folder)


# 4. cli.main waits 120 s for idle workers of a ThreadPool it did not start
def test_review_main_does_not_wait_for_a_callers_thread_pool(tmp_path):
    code = ("from multiprocessing.pool import ThreadPool\n"
            "from medseg.cli import main\n"
            "pool = ThreadPool(2)\n"
            f"print('rc', main(['check', {str(tmp_path / 'missing')!r}]), flush=True)\n"
            "pool.close(); pool.join()\n")
    try:
        subprocess.run([sys.executable, "-c", code], timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("main() blocked > 30 s joining a caller's idle ThreadPool workers")
