"""Session 26 (i): two copies of one run in an ensemble (a run folder copied, an archive
under two names, a run and its archive) are refused by their weights' SHA-256."""
from __future__ import annotations

import shutil

import pytest

import medseg.archive
from medseg.cli import main


@pytest.fixture
def copied_run(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "copy")


def _predict(models, phantom_dataset, out) -> int:
    return main(["predict", "--model", *map(str, models), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(out)])


def _refusal(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "copies of one run" in err
    return err


def test_a_copied_run_folder_is_refused_naming_both(trained_run, copied_run, phantom_dataset,
                                                    tmp_path, capsys):
    assert _predict([trained_run, copied_run], phantom_dataset, tmp_path / "out") == 2
    err = _refusal(capsys)
    assert f"{copied_run}: " in err
    assert str(trained_run) in err
    assert not (tmp_path / "out").exists()


def test_one_archive_under_two_names_is_refused(model_archive, phantom_dataset, tmp_path,
                                                capsys):
    other = shutil.copy(model_archive, tmp_path / "renamed.zip")
    assert _predict([model_archive, other], phantom_dataset, tmp_path / "out") == 2
    err = _refusal(capsys)
    assert str(model_archive) in err and str(other) in err
    assert "medseg-model-" not in err  # no temporary folder named


def test_a_run_and_its_archive_are_refused_from_the_manifest(trained_run, model_archive,
                                                             phantom_dataset, tmp_path,
                                                             capsys, monkeypatch):
    read = []
    original = medseg.archive.sha256_of_file
    monkeypatch.setattr(medseg.archive, "sha256_of_file",
                        lambda path: read.append(path) or original(path))
    assert _predict([trained_run, model_archive], phantom_dataset, tmp_path / "out") == 2
    err = _refusal(capsys)
    assert str(model_archive) in err and str(trained_run) in err
    # the archive's weights were not read again: the manifest holds their SHA-256
    assert all(trained_run in path.parents for path in read), read


def test_crossval_refuses_a_copied_run(trained_run, copied_run, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["crossval", str(trained_run), str(copied_run), "--out", str(out),
                 "--folds", "0"]) == 2
    err = _refusal(capsys)
    assert str(trained_run) in err and str(copied_run) in err
    assert not out.exists() or not any(out.iterdir())
