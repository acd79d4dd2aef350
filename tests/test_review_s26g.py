"""Review of today's convert-msd and crossval changes (session 26g)."""

import fcntl
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_review_s26f import SHAPE, _msd_task

from medseg.cli import main


@pytest.mark.parametrize("existing", [False, True])
def test_a_second_convert_msd_into_the_same_out_is_refused(tmp_path, capsys, existing):
    """Two conversions into one OUT removed each other's staging folder (beside a new OUT,
    inside an existing empty one) as a killed conversion's leftover; the second is refused
    in one line naming OUT, and the first one's staging folder stays."""
    task = _msd_task(tmp_path / "Task09_X")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    staging = out / ".convert-msd.part" if existing else tmp_path / ".out.part-0a1b2c3d"
    (staging / "imagesTr").mkdir(parents=True)
    (staging / "imagesTr" / "c0_0000.nii.gz").write_bytes(b"being written")
    lock = tmp_path / ".out.medseg-convert-msd-lock"
    with lock.open("a", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the first conversion holds it
        assert main(["convert-msd", str(task), str(out)]) == 2
    err = capsys.readouterr().err
    assert "another `medseg convert-msd` is writing this folder" in err and str(out) in err
    assert len(err.strip().splitlines()) == 1, err
    assert (staging / "imagesTr" / "c0_0000.nii.gz").read_bytes() == b"being written"
    lock.unlink()
    assert main(["convert-msd", str(task), str(out)]) == 0  # the lock held no longer
    assert not staging.exists() and (out / "dataset.json").is_file()
    assert not lock.exists()


def test_convert_msd_writes_no_lock_inside_the_task_folder(tmp_path, capsys):
    """An OUT inside the task folder is refused before the lock, which lies beside OUT."""
    task = _msd_task(tmp_path / "Task09_X")
    before = sorted(p.relative_to(task) for p in task.rglob("*"))
    assert main(["convert-msd", str(task), str(task / "new" / "out")]) == 2
    assert "lies inside the task folder" in capsys.readouterr().err
    assert sorted(p.relative_to(task) for p in task.rglob("*")) == before


def test_convert_msd_refuses_a_task_whose_labels_hold_no_structure(tmp_path, capsys):
    """Every training label all background: `medseg check` gives an error row and training
    refuses it (nothing to learn), yet convert-msd, which reads every label, converted it."""
    task = _msd_task(tmp_path / "Task09_X")
    for label in (task / "labelsTr").iterdir():
        nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)), label)
    assert main(["convert-msd", str(task), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no case's label has a voxel of any structure" in err and str(task) in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task09_X"]


@pytest.fixture
def crossval_run(two_fold_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(two_fold_run, copy)
    return copy


def _hashed(monkeypatch, function: str) -> list[Path]:
    """The paths crossval's `function` (_image_digest, sha256_of_file) is called with."""
    import medseg.crossval as crossval

    calls: list[Path] = []
    real = getattr(crossval, function)
    monkeypatch.setattr(crossval, function, lambda path: (calls.append(Path(path)),
                                                          real(path))[1])
    return calls


@pytest.mark.parametrize("again", [[], ["--continue", "--step", "0.7"]])
def test_a_refused_crossval_reads_no_image(crossval_run, tmp_path, monkeypatch, capsys, again):
    """Every case's image was hashed (about a minute per 100 GB) before --out was checked,
    so a command then refused (a folder holding results without --continue or --overwrite,
    a --continue of other settings) read the whole dataset first."""
    out = tmp_path / "cv"
    assert main(["crossval", str(crossval_run), "--out", str(out)]) == 0
    record = json.loads((out / "crossval.json").read_text(encoding="utf-8"))
    assert record["images"] and None not in sum(record["images"].values(), [])
    images = _hashed(monkeypatch, "_image_digest")
    capsys.readouterr()
    assert main(["crossval", str(crossval_run), "--out", str(out), *again]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(out) in errors[0], errors
    assert images == []


def test_continue_hashes_each_kept_mask_once(crossval_run, tmp_path, monkeypatch):
    """A --continue that keeps every mask hashed each twice: to compare it with the record,
    then again to record it; the record is the same."""
    out = tmp_path / "cv"
    assert main(["crossval", str(crossval_run), "--out", str(out)]) == 0
    first = json.loads((out / "crossval.json").read_text(encoding="utf-8"))
    hashed = _hashed(monkeypatch, "sha256_of_file")
    assert main(["crossval", str(crossval_run), "--out", str(out), "--continue"]) == 0
    masks = [path.name for path in hashed if path.parent.name == "predictions"]
    assert sorted(masks) == sorted(f"{name}.nii.gz" for name in first["masks"])
    assert json.loads((out / "crossval.json").read_text(encoding="utf-8")) == first
