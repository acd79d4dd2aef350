"""Two-channel (multi-modal) cases from the nnU-Net layout: trained and predicted together."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, SMALL_SHAPE, SMALL_SPACING, TINY_TRAINING, as_sets

from medseg.cli import main
from medseg.errors import MedsegError
from medseg.phantoms import make_phantom
from medseg.predict import group_channels


def write_two_channel_dataset(root, n_cases=5):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for index in range(n_cases):
        phantom = make_phantom(100 + index, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        second = np.where(phantom.label == 2, 500.0, 0.0) - 0.3 * phantom.image  # "T2"
        for channel, data in enumerate((phantom.image, second)):
            nib.save(nib.Nifti1Image(data.astype(np.float32), phantom.affine),
                     root / "imagesTr" / f"case{index}_{channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(phantom.label, phantom.affine),
                 root / "labelsTr" / f"case{index}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "T2"}, "file_ending": ".nii.gz",
        "labels": {"background": 0, "liver": 1, "kidney": 2, "spine": 3},
        "numTraining": n_cases}), encoding="utf-8")


def stopped_two_channel_run(tmp_path):
    """A two-channel dataset and a run of it stopped by its budget after one epoch."""
    data = tmp_path / "data"
    write_two_channel_dataset(data)
    run = tmp_path / "run"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 *as_sets([f"dataset.path={data}", "dataset.layout=nnunet", *TINY_TRAINING,
                           "train.max_minutes=0.00001"])]) == 0
    return data, run


def test_train_and_predict_two_channels(tmp_path, capsys):
    write_two_channel_dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 *as_sets([f"dataset.path={tmp_path / 'data'}", "dataset.layout=nnunet",
                           *TINY_TRAINING])]) == 0
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    assert plan["in_channels"] == 2 and plan["modalities"] == ["CT", "MR"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for channel in (0, 1):
        shutil.copy(tmp_path / "data" / "imagesTr" / f"case0_{channel:04d}.nii.gz", inputs)
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--output",
                 str(tmp_path / "pred")]) == 0
    mask = nib.load(tmp_path / "pred" / "case0.nii.gz")
    source = nib.load(inputs / "case0_0000.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    # beside its channel files, the mask (case0.nii.gz) would be a scan to the next run on
    # the folder: refused before any work
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--output",
                 str(inputs)]) == 2
    assert f"--output {inputs} is this scan's own folder" in capsys.readouterr().err
    assert sorted(p.name for p in inputs.iterdir()) == ["case0_0000.nii.gz",
                                                        "case0_0001.nii.gz"]
    # a second channel that lies elsewhere in the patient is refused, naming it
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(inputs / "case0_0000.nii.gz", moved)
    second = nib.load(inputs / "case0_0001.nii.gz")
    shifted = second.affine.copy()
    shifted[:3, 3] += (30.0, -40.0, 25.0)
    nib.save(nib.Nifti1Image(np.asarray(second.dataobj), shifted), moved / "case0_0001.nii.gz")
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--input", str(moved), "--output",
                 str(tmp_path / "pred_moved")]) == 2
    err = capsys.readouterr().err
    assert "case0_0001.nii.gz: not on the grid of case0_0000.nii.gz: affines differ" in err
    assert not (tmp_path / "pred_moved" / "case0.nii.gz").exists()
    # a case without its second channel fails alone, named; the batch goes on (it stopped)
    shutil.copy(tmp_path / "data" / "imagesTr" / "case1_0000.nii.gz", inputs)
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--output",
                 str(tmp_path / "pred_partial")]) == 1
    err = capsys.readouterr().err
    assert f"{inputs / 'case1_0000.nii.gz'}: case 'case1' lacks channel(s) [1] of 2" in err
    assert (tmp_path / "pred_partial" / "case0.nii.gz").is_file()
    assert not (tmp_path / "pred_partial" / "case1.nii.gz").exists()


def test_channel_grouping_needs_every_channel(tmp_path):
    files = [tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz", tmp_path / "b_0000.nii.gz"]
    assert group_channels(files[:2], 2) == [tuple(files[:2])]
    with pytest.raises(MedsegError, match=r"case 'b' lacks channel\(s\) \[1\] of 2"):
        group_channels(files, 2)
    with pytest.raises(MedsegError, match="name the files CASE_0000"):
        group_channels([tmp_path / "plain.nii.gz"], 2)
    elsewhere = tmp_path / "other" / "a_0001.nrrd"
    with pytest.raises(MedsegError, match=r"a_0001.nii.gz and .*other/a_0001.nrrd are both "
                                          r"channel 1 of case 'a'"):
        group_channels([*files[:2], elsewhere], 2)


def test_channels_beyond_the_model_are_named_and_one_channel_models_note_them(tmp_path,
                                                                              capsys):
    """A third channel gave "lacks channel(s) [] of 2"; a one-channel model segmented a
    case's second channel as a case of its own without a word."""
    files = [tmp_path / f"a_{k:04d}.nii.gz" for k in range(3)]
    with pytest.raises(MedsegError, match=r"a_0002.nii.gz: channel 2 of case 'a' is beyond "
                                          r"the model's 2 channels"):
        group_channels(files, 2)
    patients = [tmp_path / "patient_0001.nii.gz", tmp_path / "patient_0002.nii.gz"]
    assert group_channels([*files[:2], *patients], 1) == [(f,) for f in [*files[:2], *patients]]
    err = capsys.readouterr().err
    assert "a_0001.nii.gz looks like channel 1 of case 'a'" in err
    assert "patient" not in err  # names that only end in four digits


def test_a_resume_on_other_channels_and_gaps_in_channel_numbers_are_refused(tmp_path,
                                                                            capsys):
    """A resume on a dataset of three channels dropped the third without a word, and one of
    one channel died on a KeyError; channels 0 and 10 trained, and predict then refused the
    training's own files."""
    data, run = stopped_two_channel_run(tmp_path)
    description = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    description["channel_names"] = {"0": "T2", "1": "CT"}  # swapped
    (data / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "plan.json: the dataset's channels ['MR', 'CT'] differ from the run's ['CT', 'MR']: "
        "resume on the dataset the run was trained on")
    description["channel_names"] = {"0": "CT", "10": "T2"}
    (data / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    with pytest.raises(MedsegError, match=r"dataset.json: 'channel_names' must number its "
                                          r"channels 0, 1, ... without a gap, got 0, 10"):
        from medseg.datasets import load_dataset

        load_dataset(data)


def test_a_4d_file_of_other_channels_fails_alone_saying_what_it_holds(tmp_path):
    """A 4D NIfTI of 3 volumes for a 2-channel model, and a broken file named otherwise:
    each fails as its own case (listed in `incomplete`), and the batch keeps the rest."""
    three = tmp_path / "three.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), three)
    two = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), two)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    incomplete = []
    assert group_channels([three, two, broken], 2, incomplete) == [(two,)]
    problems = {path.name: str(problem) for path, problem in incomplete}
    assert "it holds 3 volumes" in problems["three.nii.gz"]
    assert "broken.nii.gz" in problems and "the model takes" not in problems["broken.nii.gz"]
    with pytest.raises(MedsegError, match="it holds 3 volumes"):
        group_channels([three], 2)
