"""Review of convert-msd, plan and evaluate (session 26d): regressions found."""

import json
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.msd import TREE

SHAPE = (8, 9, 10)


def _msd_task(root: Path, cases: int = 2) -> Path:
    """A two-channel MSD task of `cases` small random cases (seeded), labels 0/1."""
    rng = np.random.default_rng(26)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    training = []
    for index in range(cases):
        image = rng.normal(size=(*SHAPE, 2)).astype(np.float32)
        label = (rng.random(SHAPE) > 0.7).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"c{index}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"c{index}.nii.gz")
        training.append({"image": f"./imagesTr/c{index}.nii.gz",
                         "label": f"./labelsTr/c{index}.nii.gz"})
    description = {"name": "X", "modality": {"0": "T2", "1": "ADC"},
                   "labels": {"0": "background", "1": "organ"}, "numTraining": cases,
                   "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_convert_msd_refuses_a_label_on_another_grid_of_the_same_shape(tmp_path, capsys):
    """A label of the image's shape but another origin (or spacing) was converted without a
    word: only the shapes were compared, and check or train refused the converted folder."""
    task = _msd_task(tmp_path / "Task01_X")
    shifted = np.eye(4)
    shifted[:3, 3] = 50.0
    label = task / "labelsTr" / "c1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), shifted), label)
    assert main(["convert-msd", str(task), str(tmp_path / "out")]) == 2
    err = _one_error(capsys)
    assert "c1.nii.gz: not on the grid of its image c1.nii.gz: affines differ" in err
    assert not (tmp_path / "out").exists()


def test_convert_msd_takes_a_label_storing_its_voxels_in_another_order(tmp_path):
    """A label holding the image's voxels in another axis order (shape (10, 9, 8)), which
    training reads onto the image's grid, was refused as a label of another shape."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    from medseg.datasets import load_dataset

    task = _msd_task(tmp_path / "Task01_X")
    label = task / "labelsTr" / "c1.nii.gz"
    data = np.asanyarray(nib.load(label).dataobj)
    reorder = np.array([[2, 1], [1, 1], [0, -1]])
    nib.save(nib.Nifti1Image(apply_orientation(data, reorder),
                             inv_ornt_aff(reorder, data.shape)), label)
    out = tmp_path / "out"
    assert main(["convert-msd", str(task), str(out)]) == 0
    assert (out / "labelsTr" / "c1.nii.gz").read_bytes() == label.read_bytes()
    assert len(load_dataset(out).cases) == 2


@pytest.mark.parametrize("kind", ["under a file", "dangling link"])
def test_convert_msd_names_an_output_folder_it_cannot_make(tmp_path, capsys, kind):
    """OUT under a file, or a link to nothing, ended in 'NotADirectoryError: [Errno 20] ...'
    or 'FileExistsError: [Errno 17] File exists', after every file's header was read."""
    task = _msd_task(tmp_path / "Task01_X")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    if kind == "under a file":
        out = tmp_path / "file" / "out"
    else:
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "nowhere")
    assert main(["convert-msd", str(task), str(out)]) == 2
    err = _one_error(capsys)
    assert f"{out}: cannot make the output folder" in err and "Errno" not in err
    assert out.is_symlink() or not out.exists()


KILLED_AT_SECOND_FILE = """
import os, signal, sys
from pathlib import Path
import medseg.msd as msd
original, calls = msd._convert_item, []
def convert(item):
    calls.append(item)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(item)
msd._convert_item = convert
msd.convert_msd(Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.parametrize("existing", [False, True])
def test_convert_msd_killed_leaves_no_half_converted_out(tmp_path, existing):
    """A conversion killed midway (SIGKILL, the OOM killer, a power cut) left OUT with some
    images and no dataset.json, which a new conversion refused as 'not empty' and which
    looked like a dataset; OUT now appears whole, by one rename, or not at all."""
    import subprocess
    import sys

    from helpers import REPO

    task = _msd_task(tmp_path / "Task01_X", cases=3)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    done = subprocess.run([sys.executable, "-c", KILLED_AT_SECOND_FILE, str(task), str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == -signal.SIGKILL
    # nothing in OUT but, in an OUT that existed, the hidden folder being written
    assert out.is_dir() == existing
    if existing:
        assert [p.name for p in out.iterdir()] == [".convert-msd.part"]
    assert main(["convert-msd", str(task), str(out)]) == 0
    assert len(list((out / "imagesTr").iterdir())) == 6
    assert sorted(p.name for p in out.iterdir()) == sorted(["dataset.json", *TREE])


def test_convert_msd_fills_an_empty_folder_given_as_a_link(tmp_path):
    task = _msd_task(tmp_path / "Task01_X")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert main(["convert-msd", str(task), str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task01_X", "link", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == sorted(["dataset.json", *TREE])


def _plan_args(phantom_dataset: Path, *more: str) -> list[str]:
    from helpers import REPO, TINY_TRAINING, as_sets

    return ["plan", str(REPO / "workflows" / "demo.yaml"),
            *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING, *more])]


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_plan_out_replaces_an_earlier_plan_whole_or_not_at_all(phantom_dataset, tmp_path,
                                                               capsys, monkeypatch):
    """plan.json, fingerprint.json and splits.json of a new plan were written one by one
    over an earlier plan's: a stop before workflow.yaml left the new plan beside the old
    workflow (another batch size, fold count, ...), a folder no plan made."""
    import medseg.config

    out = tmp_path / "plan"
    assert main([*_plan_args(phantom_dataset), "--out", str(out)]) == 0
    earlier = _contents(out)

    def stopped(workflow):
        raise KeyboardInterrupt

    monkeypatch.setattr(medseg.config, "workflow_to_dict", stopped)
    assert main([*_plan_args(phantom_dataset, "plan.batch_size=1", "train.folds=3"),
                 "--out", str(out)]) == 130
    assert _contents(out) == earlier
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*_plan_args(phantom_dataset, "plan.batch_size=1"), "--out", str(out)]) == 0
    assert json.loads((out / "plan.json").read_text(encoding="utf-8"))["batch_size"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.json", "plan.json",
                                                     "splits.json", "workflow.yaml"]


def test_plan_refuses_an_out_whose_plan_file_is_a_folder(phantom_dataset, tmp_path, capsys):
    """An --out holding a folder named workflow.yaml passed as an earlier plan's: the dataset
    was read and planned, plan.json, fingerprint.json and splits.json written, and then
    'IsADirectoryError: [Errno 21] Is a directory' ended the command."""
    out = tmp_path / "plan"
    (out / "workflow.yaml").mkdir(parents=True)
    (out / "plan.json").write_text("{}", encoding="utf-8")
    assert main([*_plan_args(phantom_dataset), "--out", str(out)]) == 2
    err = _one_error(capsys)
    assert "holds other files than a plan's (workflow.yaml)" in err
    assert (out / "plan.json").read_text(encoding="utf-8") == "{}"


def _label_folder(folder: Path, cases: int = 2) -> Path:
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    for index in range(cases):
        label = (rng.random(SHAPE) > 0.6).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"c{index}.nii.gz")
    return folder


def test_evaluate_refuses_one_folder_as_predictions_and_references(tmp_path, capsys,
                                                                   monkeypatch):
    """`evaluate --pred R --ref R` (or `--pred .`, a link to R) scored each reference
    against itself: Dice 1 and distances 0 for every case, exit 0, without a word."""
    refs = _label_folder(tmp_path / "labels")
    (tmp_path / "link").symlink_to(refs)
    monkeypatch.chdir(refs)
    for pred in (str(refs), str(tmp_path / "link"), "."):
        assert main(["evaluate", "--pred", pred, "--ref", str(refs),
                     "--out", str(tmp_path / "ev")]) == 2
        err = _one_error(capsys)
        assert "given as both the predictions and the references" in err
    assert not (tmp_path / "ev").exists()


def test_predict_refuses_an_output_that_is_its_reference_folder(tmp_path, capsys):
    """predict --output R --reference R skipped the cases as 'existing' masks (the
    references) and reported Dice 1.0000 for all of them; with --overwrite the references
    would have been replaced by the masks. Refused before any model is read."""
    refs = _label_folder(tmp_path / "labels")
    before = _contents(refs)
    assert main(["predict", "--model", str(tmp_path / "run"), "--input", str(refs),
                 "--output", str(refs), "--reference", str(refs), "--overwrite"]) == 2
    err = _one_error(capsys)
    assert "--output is the --reference folder" in err
    assert _contents(refs) == before


def test_convert_msd_of_an_nnunet_dataset_says_there_is_nothing_to_convert(tmp_path, capsys):
    """A folder already in nnU-Net's layout (a conversion given again) was answered 'set
    dataset.layout to nnunet or auto': a workflow key, which convert-msd has not."""
    converted = tmp_path / "converted"
    assert main(["convert-msd", str(_msd_task(tmp_path / "Task01_X")), str(converted)]) == 0
    capsys.readouterr()
    assert main(["convert-msd", str(converted), str(tmp_path / "again")]) == 2
    err = _one_error(capsys)
    assert "in nnU-Net's layout already: nothing to convert" in err
    assert "dataset.layout" not in err and not (tmp_path / "again").exists()
