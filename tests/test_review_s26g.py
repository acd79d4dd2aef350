"""Review of today's convert-msd and crossval changes (session 26g)."""

import fcntl

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
