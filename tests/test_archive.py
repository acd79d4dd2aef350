"""`medseg export RUN_DIR MODEL.zip` and `medseg predict --model MODEL.zip`."""

import json
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from helpers import zip_members

from medseg.archive import MANIFEST
from medseg.cli import main


def _manifest_with(manifest: bytes, name: str, size: int) -> bytes:
    """The manifest with another size for one file (a member that would unpack larger)."""
    data = json.loads(manifest)
    data["sizes"][name] = size
    return json.dumps(data).encode()


def _rewrite(source: Path, target: Path, change) -> Path:
    members = zip_members(source)
    change(members)
    with zipfile.ZipFile(target, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return target


def test_the_archive_holds_what_prediction_needs_and_no_case_names(model_archive, trained_run):
    members = zip_members(model_archive)
    assert sorted(members) == ["fold_0/checkpoints/best.safetensors", "fold_0/metrics.jsonl",
                               MANIFEST, "plan.json", "workflow.yaml"]
    assert members["plan.json"] == (trained_run / "plan.json").read_bytes()
    workflow = yaml.safe_load(members["workflow.yaml"])
    assert workflow["dataset"]["path"] == ""  # the training machine's path stays there
    assert yaml.safe_load((trained_run / "workflow.yaml").read_text(
        encoding="utf-8"))["dataset"]["path"]
    assert workflow["predict"] == yaml.safe_load((trained_run / "workflow.yaml").read_text(
        encoding="utf-8"))["predict"]
    case = json.loads((trained_run / "splits.json").read_text(encoding="utf-8"))[0]["val"][0]
    assert not any(case.encode() in data for data in members.values())
    manifest = json.loads(members[MANIFEST])
    assert manifest["folds"] == [0] and set(manifest["files"]) == set(members) - {MANIFEST}


def test_predicting_with_the_archive_gives_the_runs_masks(model_archive, trained_run,
                                                          phantom_dataset, tmp_path,
                                                          monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    scans = str(phantom_dataset / "imagesTs")
    assert main(["predict", "--model", str(trained_run), "--input", scans, "--output",
                 str(tmp_path / "run")]) == 0
    assert main(["predict", "--model", str(model_archive), "--input", scans, "--output",
                 str(tmp_path / "zip"), "--statistics"]) == 0
    masks = sorted(p.name for p in (tmp_path / "run").glob("*.nii.gz"))
    assert masks and masks == sorted(p.name for p in (tmp_path / "zip").glob("*.nii.gz"))
    for name in masks:
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "run" / name).dataobj),
                                      np.asarray(nib.load(tmp_path / "zip" / name).dataobj))
    assert (tmp_path / "zip" / "statistics.csv").is_file()
    assert list(scratch.iterdir()) == []  # the unpacked model is gone


@pytest.mark.parametrize(("change", "expected"), [
    (lambda m: m.update({"fold_0/checkpoints/best.safetensors":
                         m["fold_0/checkpoints/best.safetensors"][:-1] + b"\0"}),
     "does not match its SHA-256"),
    (lambda m: m.update({"../evil.txt": b"x"}), "which no model archive holds"),
    (lambda m: m.pop(MANIFEST), f"no {MANIFEST}"),
    (lambda m: m.update({MANIFEST: b'{"format": 99, "files": {}}'}), "is not of format 1"),
    (lambda m: m.pop("plan.json"), "absent: ['plan.json']"),
    (lambda m: m.update({MANIFEST: _manifest_with(m[MANIFEST], "plan.json", 10)}),
     "plan.json unpacks to"),
    (lambda m: m.update({MANIFEST: b" " * (2 << 20)}), "larger than a manifest can be"),
])
def test_a_changed_archive_is_refused_in_one_line(model_archive, phantom_dataset, tmp_path, capsys,
                                                  change, expected):
    changed = _rewrite(model_archive, tmp_path / "changed.zip", change)
    assert main(["predict", "--model", str(changed), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(changed) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_zip_is_refused(phantom_dataset, tmp_path, capsys):
    fake = tmp_path / "model.zip"
    fake.write_text("not a zip", encoding="utf-8")
    assert main(["predict", "--model", str(fake), "--input", str(phantom_dataset / "imagesTs"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "not a readable model archive" in capsys.readouterr().err


def test_export_refusals(trained_run, model_archive, tmp_path, capsys):
    cases = [([str(trained_run), str(tmp_path / "model.tar")], "must be named .zip"),
             ([str(trained_run), str(model_archive)], "exists: --overwrite replaces it"),
             ([str(trained_run), str(tmp_path / "m.zip"), "--folds", "3"],
              "no trained weights for fold(s) [3]"),
             ([str(tmp_path), str(tmp_path / "m.zip")], "not a medseg run folder")]
    for argv, expected in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.zip").exists()
    copy = tmp_path / "copy.zip"
    copy.write_bytes(model_archive.read_bytes())
    assert main(["export", str(trained_run), str(copy), "--overwrite"]) == 0
    assert zip_members(copy) == zip_members(model_archive)  # the same files, written again


def test_one_archive_given_twice_is_refused(model_archive, phantom_dataset, tmp_path, capsys):
    assert main(["predict", "--model", str(model_archive), str(model_archive), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "out")]) == 2
    assert "given twice to --model" in capsys.readouterr().err
