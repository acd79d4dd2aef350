"""Review s27L: export and the archive's own limits, export's half-made folders, one-case
splits files, resume of a run fine-tuned from an archive."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from helpers import REPO, SMALL_SHAPE, SMALL_SPACING, TINY_TRAINING, as_sets

from medseg import archive
from medseg.cli import main
from medseg.datasets import strip_image_suffix
from medseg.phantoms import write_phantom_dataset


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def test_export_refuses_a_metrics_file_that_opening_the_archive_would_refuse(
        trained_run, tmp_path, monkeypatch, capsys):
    run = _copy_run(trained_run, tmp_path)
    metrics = run / "fold_0" / "metrics.jsonl"
    # the limit lowered below this run's metrics.jsonl (a real one would be over 64 MB)
    monkeypatch.setattr(archive, "TEXT_LIMIT", metrics.stat().st_size - 1)
    target = tmp_path / "model.zip"
    assert main(["export", str(run), str(target)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(metrics) in err and "could not be opened" in err
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_export_that_fails_while_writing_leaves_no_folders_it_made(
        trained_run, tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(archive, "_write_hashed", full_disk)
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "some" / "new" / "model.zip"
    assert main(["export", str(trained_run), str(target)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err
    assert list((tmp_path / "kept").iterdir()) == []  # the folder that was there stays


def test_train_refuses_a_one_case_dataset_with_a_one_fold_splits_file(tmp_path, capsys):
    dataset = tmp_path / "one"
    write_phantom_dataset(dataset, n_train=1, n_test=0, seed=1, shape=SMALL_SHAPE,
                          spacing=SMALL_SPACING)
    (case,) = [strip_image_suffix(p.name) for p in (dataset / "imagesTr").iterdir()]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": [case], "val": []}]), encoding="utf-8")
    out = tmp_path / "run"
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 "--set", f"dataset.path={dataset}", "--set", f"train.splits_file={splits}",
                 *as_sets(TINY_TRAINING)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0
    assert f"{dataset}: 1 labelled case(s)" in err and not out.exists()
