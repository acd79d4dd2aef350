"""Review s25f: datasets, check, plan and workflow configuration."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from medseg.check import check_dataset
from medseg.config import load_workflow
from medseg.datasets import load_dataset
from medseg.errors import MedsegError
from medseg.plan import fingerprint


def _folder_pairs(root, labels: list[np.ndarray]):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for number, label in enumerate(labels):
        image = rng.normal(size=label.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "images" / f"c{number}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labels" / f"c{number}.nii.gz"))
    return root


def test_check_errs_when_no_label_holds_a_structure_as_training_refuses(tmp_path):
    """Each empty label is a warning, but training refuses a dataset of only empty labels:
    `medseg check DATA && medseg train` passed the check and failed the training."""
    root = _folder_pairs(tmp_path / "d", [np.zeros((10, 10, 10), np.uint8)] * 3)
    with pytest.raises(MedsegError, match="nothing to learn"):
        fingerprint(load_dataset(root), progress=False)
    report = check_dataset(root)
    assert report.exit_code() == 1, report.format_table()
    assert any(p.severity == "error" and "no case's label has a voxel" in p.message
               for p in report.problems), report.format_table()


def test_check_keeps_one_empty_label_a_warning(tmp_path):
    label = np.zeros((10, 10, 10), np.uint8)
    label[3:6, 3:6, 3:6] = 1
    root = _folder_pairs(tmp_path / "d", [label, np.zeros((10, 10, 10), np.uint8)])
    report = check_dataset(root)
    assert report.exit_code() == 0, report.format_table()


@pytest.mark.parametrize(("yaml_text", "override", "section", "key", "expected"), [
    ("dataset:\n  labels:\n    1: liver\n    2: tumour\n", "dataset.labels.1=kidney",
     "dataset", "labels", {1: "kidney", 2: "tumour"}),
    ("predict:\n  min_component_ml:\n    1: 10\n", "predict.min_component_ml.1=20",
     "predict", "min_component_ml", {1: 20.0}),
])
def test_set_of_one_entry_of_a_mapping_replaces_the_files_entry(tmp_path, yaml_text, override,
                                                                 section, key, expected):
    """YAML reads `1: liver` as the number 1; `--set dataset.labels.1=kidney` named it as the
    text '1', added it beside, and the workflow was refused as giving id 1 twice."""
    path = tmp_path / "wf.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    workflow = load_workflow(path, [override])
    assert getattr(getattr(workflow, section), key) == expected


@pytest.mark.parametrize(("fold", "message"), [
    ({"train": ["a", "a", "b"], "val": ["c"]}, "fold 0 lists case(s) a twice in 'train'"),
    ({"train": ["a", "b"], "val": ["c", "c"]}, "fold 0 lists case(s) c twice in 'val'"),
])
def test_a_splits_file_that_lists_a_case_twice_in_one_list_is_refused(tmp_path, fold,
                                                                       message):
    """A hand-edited (or merged) splits.json naming a case twice trained on it twice as
    often, or scored it twice in the validation mean, without a word."""
    from medseg.datasets import read_splits

    path = tmp_path / "splits.json"
    path.write_text(json.dumps([fold]), encoding="utf-8")
    with pytest.raises(MedsegError, match=re.escape(message)) as info:
        read_splits(path)
    assert str(path) in str(info.value)


def test_crossval_names_the_splits_file_holding_a_case_in_two_folds(tmp_path):
    from medseg.crossval import _refuse_unusable_cases
    from medseg.datasets import Case, Dataset

    case = Case("a", (tmp_path / "a.nii.gz",), tmp_path / "a_label.nii.gz")
    dataset = Dataset(tmp_path, (case,), {0: "background", 1: "x"}, ("MR",))
    seen = {"a": 0}
    splits = tmp_path / "run" / "splits.json"
    with pytest.raises(MedsegError, match="held out by fold 0 and fold 1") as info:
        _refuse_unusable_cases(["a"], {"a": case}, 1, seen, dataset, splits)
    assert str(splits) in str(info.value)


def test_check_counts_one_case_in_the_singular(tmp_path):
    label = np.zeros((10, 10, 10), np.uint8)
    label[3:6, 3:6, 3:6] = 1
    root = _folder_pairs(tmp_path / "d", [label])
    # one case is an error row of its own: training cannot make folds of it
    assert check_dataset(root).format_table().endswith(
        "(folders layout, 1 case): 1 error, 0 warnings")

def test_an_msd_test_list_of_image_entries_is_read(tmp_path):
    """MONAI's datalists (load_decathlon_datalist) write test entries as {"image": path}; such
    a dataset.json was refused whole ('expected a file path'), though training never reads
    the test images."""
    from medseg.datasets import read_msd_task

    label = np.zeros((10, 10, 10), np.uint8)
    label[3:6, 3:6, 3:6] = 1
    root = _folder_pairs(tmp_path / "d", [label, label[::-1].copy()])
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MR"}, "labels": {"0": "background", "1": "x"},
        "training": [{"image": f"./images/c{n}.nii.gz", "label": f"./labels/c{n}.nii.gz"}
                     for n in range(2)],
        "test": [{"image": "./imagesTs/t0.nii.gz"}]}), encoding="utf-8")
    assert len(load_dataset(root, layout="msd").cases) == 2
    assert read_msd_task(root).test == (root / "imagesTs" / "t0.nii.gz",)


@pytest.mark.parametrize(("change", "message"), [
    ({"channel_names": {}}, "'channel_names' names no channel"),
    ({"channel_names": []}, "'channel_names' must map channel numbers"),
    ({"file_ending": None}, "'file_ending' must be text such as \".nii.gz\", not null"),
    ({"file_ending": 5}, "'file_ending' must be text such as \".nii.gz\", not 5"),
])
def test_an_nnunet_description_names_what_is_wrong_with_its_keys(tmp_path, change, message):
    """An empty channel_names was called missing, and a file_ending of null read as the
    text 'None' ("must start with a dot ('.None')")."""
    label = np.zeros((10, 10, 10), np.uint8)
    label[3:6, 3:6, 3:6] = 1
    root = _folder_pairs(tmp_path / "d", [label])
    data = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "x": 1},
            "file_ending": ".nii.gz", **change}
    (root / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(MedsegError, match=re.escape(f"dataset.json: {message}")):
        load_dataset(root, layout="nnunet")
