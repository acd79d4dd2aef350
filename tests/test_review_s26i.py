"""Session 26 (i): two copies of one run in an ensemble (a run folder copied, an archive
under two names, a run and its archive) are refused by their weights' SHA-256; `train --init`
reads a model archive of `medseg export`."""
from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
from helpers import REPO, TINY_TRAINING, as_sets
from safetensors.torch import load_file

import medseg.archive
import medseg.pretrained
import medseg.train
from medseg.cli import main
from medseg.fileio import sha256_of_file
from medseg.model import is_segmentation_head


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


# `medseg train --init MODEL.zip`: the archive read directly, as `predict --model` reads it

QUICK = ["train.epochs=1", "train.iterations_per_epoch=1", "train.val_max_cases=0"]


@pytest.fixture
def fresh_archives(monkeypatch):
    """The archives train.init opens in this test alone, to close them after."""
    stack = contextlib.ExitStack()
    monkeypatch.setattr(medseg.pretrained, "_ARCHIVES", stack, raising=False)
    monkeypatch.setattr(medseg.pretrained, "_UNPACKED", {}, raising=False)
    return stack


def _train(out, dataset, init, *extra) -> int:
    return main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={dataset}", *TINY_TRAINING, *QUICK, *extra]),
                 "--init", str(init)])


def test_init_from_a_model_archive_starts_from_its_weights(
        model_archive, trained_run, phantom_dataset, tmp_path, capsys, monkeypatch,
        fresh_archives):
    seen = []
    train_epoch = medseg.train._train_epoch

    def first_epoch(model, *args, **kwargs):
        if not seen:
            seen.append({k: t.detach().cpu().clone() for k, t in model.state_dict().items()})
        return train_epoch(model, *args, **kwargs)

    monkeypatch.setattr(medseg.train, "_train_epoch", first_epoch)
    opened = []
    opened_model = medseg.archive.opened_model

    @contextlib.contextmanager
    def counted(archive):
        with opened_model(archive) as run_dir:
            opened.append(run_dir)
            yield run_dir

    monkeypatch.setattr(medseg.archive, "opened_model", counted)
    before = sha256_of_file(model_archive)
    assert _train(tmp_path / "tuned", phantom_dataset, model_archive) == 0
    source = load_file(trained_run / "fold_0" / "checkpoints" / "best.safetensors")
    for name, tensor in source.items():
        if not is_segmentation_head(name):
            assert torch.equal(seen[0][name], tensor), name
    captured = capsys.readouterr()
    assert f"fold_0: initialized from {model_archive}: 45 tensors loaded" in captured.out
    assert "medseg-model-" not in captured.out + captured.err
    first = json.loads((tmp_path / "tuned" / "fold_0" / "metrics.jsonl")
                       .read_text(encoding="utf-8").splitlines()[0])
    assert first["init"]["source"] == str(model_archive)
    assert first["init"]["sha256"] == before == sha256_of_file(model_archive)
    assert len(opened) == 1  # once for the whole command
    assert not opened[0].parent.exists()  # its temporary folder removed at the end
    assert not medseg.pretrained._UNPACKED


def test_an_archive_that_does_not_fit_is_refused_naming_it(
        model_archive, phantom_dataset, tmp_path, capsys, fresh_archives):
    assert _train(tmp_path / "new" / "run", phantom_dataset, model_archive,
                  "plan.base_filters=8", "plan.max_filters=32") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"medseg: error: {model_archive}/fold_0/checkpoints/"
                          f"best.safetensors: train.init: these weights do not fit"), err
    assert "medseg-model-" not in err
    assert not (tmp_path / "new").exists()
    fresh_archives.close()


def test_a_damaged_archive_is_refused_naming_it(model_archive, phantom_dataset, tmp_path,
                                                 capsys, fresh_archives):
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(model_archive.read_bytes()[:-100])
    assert _train(tmp_path / "run", phantom_dataset, damaged) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"medseg: error: {damaged}: "), err
    assert not (tmp_path / "run").exists()


def test_overwrite_refuses_an_archive_inside_the_run_folder(
        model_archive, trained_run, phantom_dataset, tmp_path, capsys, fresh_archives):
    run = shutil.copytree(trained_run, tmp_path / "run")
    inside = shutil.copy(model_archive, run / "model.zip")
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING, *QUICK]),
                 "--init", str(inside), "--overwrite"]) == 2
    assert (f"--overwrite would delete the train.init weights {inside}, which lies inside"
            in capsys.readouterr().err)
    assert inside.is_file()
    fresh_archives.close()
