"""Review s26b: dataset descriptions, check and splits."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, past_folds

from medseg.check import check_dataset
from medseg.cli import main
from medseg.datasets import load_dataset, make_splits, read_msd_task
from medseg.errors import MedsegError


def _folder_pairs(root, n_cases: int):
    """n_cases image/label pairs in images/ and labels/, each label a cube of label 1."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for number in range(n_cases):
        label = np.zeros((10, 10, 10), np.uint8)
        label[3:6, 3:6, 3 + number % 3:6] = 1
        image = rng.normal(size=label.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "images" / f"c{number}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labels" / f"c{number}.nii.gz"))
    return root


def test_check_errs_on_a_dataset_of_one_case_as_training_refuses_it(tmp_path, capsys):
    """Training cannot make folds of one case; check called such a dataset clean (exit 0),
    and `medseg check DATA && medseg train ...` failed at the train."""
    root = _folder_pairs(tmp_path / "d", 1)
    with pytest.raises(MedsegError, match="1 labelled case"):
        make_splits([case.name for case in load_dataset(root).cases], 2, source=root)
    report = check_dataset(root)
    errors = [p for p in report.problems if p.severity == "error"]
    assert [p.message for p in errors] == [
        "the dataset lists 1 case: training would refuse it, its folds need at least 2 (one "
        "to train on, one to validate on)"], report.format_table()
    assert report.exit_code() == 1
    assert main(["check", str(root)]) == 1
    assert "(folders layout, 1 case): 1 error, 0 warnings" in capsys.readouterr().out


def test_train_refuses_a_splits_file_validating_on_a_training_case(tmp_path, phantom_dataset,
                                                                   capsys):
    """A case in both lists of one fold is validated on after being trained on (an inflated
    Dice): refused in one line naming the file, the fold and the case, before any work."""
    names = sorted(path.name.removesuffix(".nii.gz")
                   for path in (phantom_dataset / "labelsTr").glob("*.nii.gz"))
    splits = [{"train": names[2:], "val": names[:2]},
              {"train": names[:5], "val": names[4:]}]  # names[4] in both
    splits_file = tmp_path / "splits_final.json"
    splits_file.write_text(json.dumps(splits), encoding="utf-8")
    out = tmp_path / "run"
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 "--set", f"dataset.path={phantom_dataset}",
                 "--set", f"train.splits_file={splits_file}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"{splits_file}: fold 1 validates on its own training case(s) {names[4]}" in lines[0]
    assert not out.exists()


def test_crossval_refuses_a_run_whose_splits_validate_on_a_training_case(tmp_path):
    from medseg.crossval import _shared_splits

    run = tmp_path / "run"
    run.mkdir()
    (run / "splits.json").write_text(json.dumps([
        {"train": ["a", "b"], "val": ["c"]}, {"train": ["b", "c"], "val": ["c", "a"]}]),
        encoding="utf-8")
    with pytest.raises(MedsegError, match=re.escape(
            f"{run / 'splits.json'}: fold 1 validates on its own training case(s) c")):
        _shared_splits((run,))


def _nnunet_description(root, channels) -> None:
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channels, "labels": {"background": 0, "x": 1},
        "numTraining": 2, "file_ending": ".nii.gz"}), encoding="utf-8")


@pytest.mark.parametrize(("channels", "shown"), [
    ({"0": None}, '"0" null'),
    ({"0": 5}, '"0" 5'),
    ({"0": ["CT"]}, '"0" ["CT"]'),
    ({"0": " "}, '"0" " "'),
    ({"0": "CT", "1": None}, '"1" null'),
])
def test_an_nnunet_channel_name_that_is_not_text_is_refused(tmp_path, channels, shown):
    """str() read a null channel name as 'None', an MR channel: z-scored without a word."""
    root = tmp_path / "d"
    root.mkdir()
    _nnunet_description(root, channels)
    with pytest.raises(MedsegError, match=re.escape(
            f"dataset.json: 'channel_names' gives channel {shown}, not a name")) as info:
        load_dataset(root, layout="nnunet")
    assert str(root / "dataset.json") in str(info.value) and "\n" not in str(info.value)


def test_an_nnunet_v1_modality_of_null_is_refused(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": None}, "labels": {"0": "background", "1": "x"}}), encoding="utf-8")
    with pytest.raises(MedsegError, match=re.escape(
            "dataset.json: 'modality' gives channel \"0\" null, not a name")):
        load_dataset(root, layout="nnunet")


def _msd_description(root, **keys) -> None:
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MR"}, "labels": {"0": "background", "1": "x"},
        "training": [{"image": f"./images/c{n}.nii.gz", "label": f"./labels/c{n}.nii.gz"}
                     for n in range(2)], **keys}), encoding="utf-8")


def test_an_msd_modality_of_null_is_refused(tmp_path):
    root = _folder_pairs(tmp_path / "d", 2)
    _msd_description(root, modality={"0": None})
    with pytest.raises(MedsegError, match=re.escape(
            "dataset.json: 'modality' gives channel \"0\" null, not a name")):
        load_dataset(root, layout="msd")


def test_an_msd_test_list_of_null_is_no_test_case(tmp_path):
    """MSD's own files write "test": []; null (Python's None written as JSON) was refused as
    "'test' must be a list of image paths", though training never reads the test images."""
    root = _folder_pairs(tmp_path / "d", 2)
    _msd_description(root, test=None)
    assert len(load_dataset(root).cases) == 2
    assert read_msd_task(root).test == ()
    assert check_dataset(root).exit_code() == 0


@pytest.mark.parametrize(("layout", "description", "shown"), [
    ("nnunet", {"channel_names": {"0": "MR"}, "labels": {"background": 1, "x": 0}}, 1),
    ("nnunet", {"channel_names": {"0": "MR"}, "labels": {"x": 1, "background": 2}}, 2),
    ("msd", {"modality": {"0": "MR"}, "labels": {"0": "x", "1": "Background"},
             "training": []}, 1),
])
def test_a_label_map_naming_another_id_background_is_refused(tmp_path, layout, description,
                                                              shown):
    """nnU-Net refuses it ('Background label must be 0'); medseg trained id 0 as background
    whatever its name: the structure named at 0 was never learnt nor scored, and the id
    named 'background' was scored as a structure (or, with 0 unnamed, refused as a repeated
    name 'background')."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    with pytest.raises(MedsegError, match=re.escape(
            f"dataset.json: 'background' must be label 0 (as nnU-Net requires), not {shown}")):
        load_dataset(root, layout=layout)


def test_check_warns_about_a_case_name_crossval_cannot_name_a_mask_with(tmp_path):
    """A CSV's case column (BIDS's sub-01/ses-1) or nnU-Net's 'dataset' keys may name a case
    with a path separator or a leading dot: training takes it, crossval refused it only
    after the training, and check said nothing."""
    root = _folder_pairs(tmp_path / "d", 3)
    (root / "cases.csv").write_text(
        "case,image,label\nsub-01/ses-1,images/c0.nii.gz,labels/c0.nii.gz\n"
        "..,images/c1.nii.gz,labels/c1.nii.gz\nc2,images/c2.nii.gz,labels/c2.nii.gz\n",
        encoding="utf-8")
    report = check_dataset(root / "cases.csv")
    assert [(p.severity, p.case, p.file.name) for p in past_folds(report.problems)] == [
        ("warning", "sub-01/ses-1", "c0.nii.gz"), ("warning", "..", "c1.nii.gz")]
    assert report.problems[0].message == (
        "case name 'sub-01/ses-1' cannot name a mask file (a path separator, '..' or a "
        "leading dot): crossval would refuse it; rename the case")
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1


@pytest.mark.parametrize("entry", [
    {"images": ["imagesTr/c0_0000.nii.gz"], "label": ""},
    {"images": [" "], "label": "labelsTr/c0.nii.gz"},
])
def test_an_empty_path_in_an_nnunet_dataset_entry_is_refused(tmp_path, entry):
    """"" named the dataset folder itself: check read it as a DICOM series ('no DICOM image
    found ... give them as inputs themselves'), and training loaded it as the case's file."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz", "dataset": {"c0": entry}}), encoding="utf-8")
    with pytest.raises(MedsegError, match=re.escape(
            "dataset.json: 'dataset' entry 'c0' gives an empty path")):
        check_dataset(root)


def test_check_warns_about_one_label_file_listed_for_two_cases(tmp_path):
    """A row pasted from the one above (c1's image with c0's label) trained c1 on c0's
    structures, and check called the dataset clean."""
    root = _folder_pairs(tmp_path / "d", 3)
    (root / "cases.csv").write_text(
        "image,label\nimages/c0.nii.gz,labels/c0.nii.gz\nimages/c1.nii.gz,labels/c0.nii.gz\n"
        "images/c2.nii.gz,labels/c2.nii.gz\n", encoding="utf-8")
    report = check_dataset(root / "cases.csv")
    assert [(p.severity, p.case, p.file, p.message) for p in past_folds(report.problems)] == [
        ("warning", "c1", root / "labels" / "c0.nii.gz",
         "same label file as case c0: training takes it as the label of both")]


def test_a_csv_separated_by_semicolons_is_named_as_such(tmp_path):
    """Excel writes ';' where the decimal mark is a comma: the refusal listed image and
    label as missing, found 'image;label', and left the user to see why."""
    root = _folder_pairs(tmp_path / "d", 2)
    (root / "cases.csv").write_text(
        "image;label\nimages/c0.nii.gz;labels/c0.nii.gz\nimages/c1.nii.gz;labels/c1.nii.gz\n",
        encoding="utf-8")
    with pytest.raises(MedsegError, match=re.escape(
            "cases.csv: CSV needs the columns image and label; missing image, label (found "
            "image;label): its header is separated by ';', and a CSV's columns by commas")):
        load_dataset(root / "cases.csv")


def test_a_folder_pairs_dataset_beside_a_dataset_json_of_other_content_is_pointed_to(tmp_path):
    """`auto` reads a folder with a dataset.json as nnU-Net's or MSD's; one holding only a
    name and a description beside images/ and labels/ was refused as "'channel_names' is
    missing", which said nothing of the folders."""
    root = _folder_pairs(tmp_path / "d", 2)
    (root / "dataset.json").write_text('{"name": "liver", "description": "ours"}',
                                       encoding="utf-8")
    with pytest.raises(MedsegError, match=re.escape(
            "dataset.json: 'channel_names' is missing (images/ and labels/ beside it: a "
            "folder-pairs dataset? set dataset.layout to folders")):
        check_dataset(root)
    assert check_dataset(root, layout="folders").exit_code() == 0


def test_a_listed_file_name_too_long_for_the_file_system_is_missing(tmp_path):
    """Path.exists raises on a name of over 255 bytes: check and training stopped on
    'OSError: [Errno 36] File name too long' (exit 1), not a row or a line naming it."""
    root = _folder_pairs(tmp_path / "d", 2)
    long_name = "x" * 300 + ".nii.gz"
    _msd_description(root)
    description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    description["training"][1]["image"] = f"./images/{long_name}"
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    report = check_dataset(root)
    assert [(p.severity, p.file.name, p.message) for p in past_folds(report.problems)] == [
        ("error", long_name, "image missing")]
    with pytest.raises(MedsegError, match=re.escape(f"but missing: {root / 'images'}")):
        load_dataset(root)
