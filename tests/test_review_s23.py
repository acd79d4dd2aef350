"""Review of convert-msd, model archives and window groups: regressions found."""

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from helpers import zip_members

from medseg.cli import main


def _scratch_tempdir(tmp_path, monkeypatch) -> Path:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def test_a_run_trained_on_a_one_split_splits_file_exports_a_usable_archive(
        trained_run, phantom_dataset, tmp_path, capsys):
    """`train.splits_file` with one train/val split saves `train.folds: 1`, which only the
    splits file makes valid: the archive drops the file's path, and its workflow.yaml was
    refused by predict ('train.folds' must be at least 2, naming a temporary path)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    splits = tmp_path / "splits.json"
    splits.write_text('[{"train": ["a"], "val": ["b"]}]', encoding="utf-8")
    workflow = yaml.safe_load((run / "workflow.yaml").read_text(encoding="utf-8"))
    workflow["train"].update(splits_file=str(splits), folds=1)
    (run / "workflow.yaml").write_text(yaml.safe_dump(workflow, sort_keys=False),
                                       encoding="utf-8")
    target = tmp_path / "model.zip"
    assert main(["export", str(run), str(target)]) == 0
    capsys.readouterr()
    code = main(["predict", "--model", str(target), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "masks")])
    assert code == 0, capsys.readouterr().err
    assert str(splits) not in zip_members(target)["workflow.yaml"].decode()


def test_an_encrypted_member_is_refused_in_one_line_naming_the_archive(
        model_archive, phantom_dataset, tmp_path, monkeypatch, capsys):
    """zipfile raises RuntimeError for an encrypted member (NotImplementedError for an
    unknown compression): it came out as 'RuntimeError: ...', exit 1, no archive named."""
    data = bytearray(model_archive.read_bytes())
    for signature, flag in ((b"PK\x01\x02", 8), (b"PK\x03\x04", 6)):
        at = data.find(signature)
        while at >= 0:
            data[at + flag] |= 1
            at = data.find(signature, at + 4)
    hostile = tmp_path / "locked.zip"
    hostile.write_bytes(bytes(data))
    scratch = _scratch_tempdir(tmp_path, monkeypatch)
    code = main(["predict", "--model", str(hostile), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "masks")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(hostile) in err and "Traceback" not in err
    assert not any(scratch.iterdir()) and not (tmp_path / "masks").exists()


def test_an_error_in_an_archived_file_names_the_archive_not_a_temporary_folder(
        model_archive, phantom_dataset, tmp_path, monkeypatch, capsys):
    """A member that matches its SHA-256 but is not usable (plan.json that is no JSON):
    the message named /tmp/medseg-model-XXXX/NAME/plan.json, a folder gone by then."""
    import hashlib

    members = zip_members(model_archive)
    members["plan.json"] = b"{"
    manifest = json.loads(members["medseg_model.json"])
    manifest["files"]["plan.json"] = hashlib.sha256(b"{").hexdigest()
    members["medseg_model.json"] = json.dumps(manifest).encode()
    hostile = tmp_path / "broken.zip"
    with zipfile.ZipFile(hostile, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    scratch = _scratch_tempdir(tmp_path, monkeypatch)
    code = main(["predict", "--model", str(hostile), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "masks")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(hostile) in err and "plan.json" in err
    assert str(scratch) not in err and "medseg-model-" not in err


def _msd_task(root: Path, training: list[tuple[str, str]]) -> Path:
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (image, label) in enumerate(training):
        data = np.full((6, 5, 4, 2), index, np.int16)
        for path, array in ((root / image, data), (root / label, np.zeros((6, 5, 4), np.uint8))):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        entries.append({"image": f"./{image}", "label": f"./{label}"})
    description = {"name": "T", "modality": {"0": "T2", "1": "ADC"},
                   "labels": {"0": "background", "1": "a"}, "numTraining": len(entries),
                   "training": entries, "test": []}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


def test_two_training_cases_of_one_name_are_refused_before_writing(tmp_path, capsys):
    """Two training entries whose images share a file name (other folders) both became
    imagesTr/NAME_000K.nii.gz: the second quietly replaced the first, and numTraining
    counted both."""
    task = _msd_task(tmp_path / "Task09_Twice", [
        ("imagesTr/a/case_001.nii.gz", "labelsTr/a/case_001.nii.gz"),
        ("imagesTr/b/case_001.nii.gz", "labelsTr/b/case_001.nii.gz")])
    out = tmp_path / "out"
    code = main(["convert-msd", str(task), str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "case_001" in err, err
    assert not out.exists()
