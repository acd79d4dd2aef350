"""Review s27AA: a researcher sharing models (train --fold all, crossval, export, predict
--model MODEL.zip, ensembles, train --init MODEL.zip)."""

import zipfile
from pathlib import Path

import pytest

from medseg.cli import main


def _archive(tmp_path: Path) -> Path:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("medseg_model.json", "{}")
    return archive


@pytest.mark.parametrize("command,lacks", [
    (["train", "--resume"], "holds no training state (it cannot be resumed)"),
    (["crossval"], "holds no splits.json (it cannot be cross-validated)"),
])
def test_an_exported_archive_given_as_run_folder_is_named_as_one(tmp_path, capsys, command,
                                                                  lacks):
    # `train --resume model.zip` said "run folder not found" of a file that is there
    archive = _archive(tmp_path)
    assert main([*command, str(archive)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medseg: error: {archive}: a model archive of `medseg export` {lacks}: "
                   f"give the run folder it was exported from"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]


def test_a_file_given_to_resume_is_not_called_missing(tmp_path, capsys):
    other = tmp_path / "notes.txt"
    other.write_text("x", encoding="utf-8")
    assert main(["train", "--resume", str(other)]) != 0
    err = capsys.readouterr().err
    assert "not a folder: give the run folder" in err and "not found" not in err


def test_an_archive_given_twice_is_named_as_given(tmp_path, capsys, monkeypatch):
    # the archive was named by its absolute real path, which a link's user never typed
    monkeypatch.chdir(tmp_path)
    _archive(tmp_path)
    (tmp_path / "link.zip").symlink_to("model.zip")
    (tmp_path / "scans").mkdir()
    for models in (["model.zip", "link.zip"], ["model.zip", "model.zip"]):
        assert main(["predict", "--model", *models, "--input", "scans", "--output", "out"]) == 2
        also = " (also as model.zip)" if models[1] == "link.zip" else ""
        assert capsys.readouterr().err.strip().splitlines() == [
            f"medseg: error: {models[1]}: given twice to --model{also}: each run would count "
            f"twice in the mean"]
    assert not (tmp_path / "out").exists()


def test_crossval_of_a_fine_tuned_run_notes_its_source(trained_run, tmp_path, capsys):
    # `train --init MODEL.zip` on the same data: each fold starts from a network trained on
    # other folds' cases, so crossval's "never saw it in training" no longer holds
    import shutil

    import yaml

    run = tmp_path / "tuned"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("crossval*"))
    workflow = yaml.safe_load((run / "workflow.yaml").read_text(encoding="utf-8"))
    workflow["train"]["init"] = str(tmp_path / "model.zip")
    (run / "workflow.yaml").write_text(yaml.safe_dump(workflow), encoding="utf-8")
    assert main(["crossval", str(run), "--out", str(tmp_path / "cv")]) == 0
    err = capsys.readouterr().err
    assert (f"medseg: note: {run} was fine-tuned from {tmp_path / 'model.zip'} (train.init): "
            f"where those weights were trained on cases of this dataset") in err
    assert main(["crossval", str(trained_run), "--out", str(tmp_path / "cv0")]) == 0
    assert "fine-tuned" not in capsys.readouterr().err
