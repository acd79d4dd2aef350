"""`medseg crossval RUN_DIR`: each fold's held-out cases segmented by that fold's network and
scored, per fold and over all, with nnU-Net's largest-component test."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.cli import main
from medseg.crossval import (
    POSTPROCESSING_FILE,
    REQUEST_FILE,
    largest_component_test,
)
from medseg.evaluate import evaluate_case
from medseg.plan import load_plan


def _splits(run: Path) -> list[dict]:
    return json.loads((run / "splits.json").read_text(encoding="utf-8"))


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_each_fold_scores_its_held_out_cases_with_its_own_network(two_fold_run, tmp_path,
                                                                   capsys):
    out = tmp_path / "cv"
    assert main(["crossval", str(two_fold_run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 of the 5 folds are trained" in captured.err
    splits = _splits(two_fold_run)
    held_out = {fold: splits[fold]["val"] for fold in (0, 1)}
    names = sorted(held_out[0] + held_out[1])
    assert sorted(p.name for p in (out / "predictions").iterdir()) == \
        [f"{name}.nii.gz" for name in names]
    # each mask is the one `medseg predict --folds K` writes with that fold alone, before
    # the run's post-processing (the demo workflow keeps each organ's largest component)
    dataset = Path(yaml.safe_load((two_fold_run / "workflow.yaml").read_text(
        encoding="utf-8"))["dataset"]["path"])
    for fold, cases in held_out.items():
        alone = tmp_path / f"fold{fold}"
        assert main(["predict", "--model", str(two_fold_run), "--folds", str(fold), "--input",
                     *[str(dataset / "imagesTr" / f"{c}.nii.gz") for c in cases],
                     "--output", str(alone), "--set", "predict.largest_component=[]"]) == 0
        for case in cases:
            np.testing.assert_array_equal(_mask(out / "predictions" / f"{case}.nii.gz"),
                                          _mask(alone / f"{case}.nii.gz"))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == len(names) and not summary["failed_cases"]
    folds = summary["crossval"]["folds"]
    assert sorted(folds) == ["0", "1"]
    assert [folds[k]["cases"] for k in ("0", "1")] == [len(held_out[0]), len(held_out[1])]
    rows = (out / "scores.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == names
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Cross-validation: each fold" in page and "<td class=\"name\">fold 1</td>" in page
    assert "Keeping only the largest component" in page and " crossval</p>" in page
    request = json.loads((out / REQUEST_FILE).read_text(encoding="utf-8"))
    assert request["cases"] == {"0": held_out[0], "1": held_out[1]}
    chosen = json.loads((out / POSTPROCESSING_FILE).read_text(encoding="utf-8"))
    assert set(chosen["structures"]) == {"liver", "kidney", "spine"}
    assert "fold 0 (" in captured.out and "fold 1 (" in captured.out


def test_scores_match_medseg_evaluate_of_the_same_masks(trained_run, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["crossval", str(trained_run), "--out", str(out), "--folds", "0"]) == 0
    dataset = Path(yaml.safe_load((trained_run / "workflow.yaml").read_text(
        encoding="utf-8"))["dataset"]["path"])
    references = tmp_path / "references"
    references.mkdir()
    for case in _splits(trained_run)[0]["val"]:
        shutil.copy(dataset / "labelsTr" / f"{case}.nii.gz", references)
    assert main(["evaluate", "--pred", str(out / "predictions"), "--ref",
                 str(references), "--labels", str(dataset / "dataset.json"),
                 "--out", str(tmp_path / "ev")]) == 0
    crossval = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    evaluated = json.loads((tmp_path / "ev" / "summary.json").read_text(encoding="utf-8"))
    for name in ("liver", "kidney", "spine"):
        assert crossval["structures"][name]["dice"] == evaluated["structures"][name]["dice"]
    assert crossval["crossval"]["folds"]["0"]["mean_dice"] == pytest.approx(
        crossval["mean_dice"])


def test_the_default_folder_is_the_runs_own_and_a_second_run_needs_continue_or_overwrite(
        two_fold_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_fold_run, run)
    assert main(["crossval", str(run), "--folds", "1"]) == 0
    assert (run / "crossval" / "summary.json").is_file()
    capsys.readouterr()
    assert main(["crossval", str(run), "--folds", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier cross-validation: --continue" in err and str(run) in err
    stale = run / "crossval" / "predictions" / "stale.nii.gz"
    shutil.copy(next((run / "crossval" / "predictions").iterdir()), stale)
    assert main(["crossval", str(run), "--folds", "0", "--overwrite"]) == 0
    summary = json.loads((run / "crossval" / "summary.json").read_text(encoding="utf-8"))
    assert list(summary["crossval"]["folds"]) == ["0"]  # only what this run scored
    assert "stale" not in summary["files"]


def test_a_folder_of_other_files_is_refused(trained_run, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["crossval", str(trained_run), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds no earlier cross-validation" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_refusals_name_the_problem_before_any_work(trained_run, two_fold_run, tmp_path,
                                                   capsys):
    out = tmp_path / "cv"
    cases = [
        (["crossval", str(trained_run), "--out", str(out), "--folds", "1"],
         "no trained weights for fold(s) [1]"),
        (["crossval", str(trained_run), "--out", str(out), "--folds", "7"],
         "splits.json holds 5 folds; fold 7"),
        (["crossval", str(trained_run), str(two_fold_run)], "need --out DIR"),
        (["crossval", str(tmp_path / "nowhere"), "--out", str(out)], "run folder not found"),
        (["crossval", str(trained_run), "--out", str(out), "--dataset",
          str(tmp_path / "moved")], "the --dataset given"),
        (["crossval", str(trained_run), "--out", str(out), "--set", "train.epochs=3"],
         "only keys of the predict section"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("medseg: error:")]
        assert len(errors) == 1 and expected in errors[0], errors
        assert not out.exists()


def test_an_ensemble_needs_the_same_splits(trained_run, two_fold_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(two_fold_run, other)
    splits = _splits(other)
    splits[0], splits[1] = splits[1], splits[0]  # another seed's folds
    (other / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    assert main(["crossval", str(trained_run), str(other), "--out", str(tmp_path / "cv")]) == 2
    assert "must share their splits" in capsys.readouterr().err
    # two_fold_run's fold_0 is trained_run's (a copy, which an ensemble refuses): its
    # folds swapped, it is another run of the same splits
    second = shutil.copytree(two_fold_run, tmp_path / "second")
    best = Path("checkpoints") / "best.safetensors"
    (second / "fold_0" / best).rename(second / "swap")
    (second / "fold_1" / best).rename(second / "fold_0" / best)
    (second / "swap").rename(second / "fold_1" / best)
    out = tmp_path / "ens"
    assert main(["crossval", str(trained_run), str(second), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert list(summary["crossval"]["folds"]) == ["0"]  # the one fold both runs trained
    assert len(summary["crossval"]["runs"]) == 2


def test_a_moved_dataset_is_found_with_dataset(trained_run, tmp_path, capsys):
    dataset = Path(yaml.safe_load((trained_run / "workflow.yaml").read_text(
        encoding="utf-8"))["dataset"]["path"])
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    workflow = yaml.safe_load((run / "workflow.yaml").read_text(encoding="utf-8"))
    workflow["dataset"]["path"] = str(tmp_path / "gone")
    (run / "workflow.yaml").write_text(yaml.safe_dump(workflow), encoding="utf-8")
    assert main(["crossval", str(run), "--out", str(tmp_path / "a")]) == 2
    assert "--dataset NEW_PATH" in capsys.readouterr().err
    assert main(["crossval", str(run), "--out", str(tmp_path / "b"), "--dataset",
                 str(moved)]) == 0


def _write(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), path)
    return path


def test_largest_component_is_chosen_where_it_raises_dice(trained_run, tmp_path):
    """Structure 1: the prediction adds a far blob (dropping it helps); structure 2: the
    reference has two parts and so does the prediction (keeping one part hurts)."""
    plan = load_plan(trained_run / "plan.json")
    labels = plan.labels
    reference = np.zeros((24, 24, 24), np.uint8)
    reference[2:8, 2:8, 2:8] = 1
    reference[12:16, 2:6, 2:6] = 2
    reference[12:16, 18:22, 18:22] = 2
    prediction = reference.copy()
    prediction[18:21, 18:21, 2:5] = 1  # a false blob of structure 1
    prediction[12, 2:6, 2:6] = 0  # one slice of structure 2 missed
    results = [evaluate_case("a", _write(tmp_path / "pred.nii.gz", prediction),
                             _write(tmp_path / "ref.nii.gz", reference), labels)]
    chosen = largest_component_test(results, plan)
    first, second = chosen["structures"][labels[1]], chosen["structures"][labels[2]]
    assert first["apply"] and first["dice_largest_component"] == 1.0 > first["dice"]
    assert not second["apply"] and second["dice_largest_component"] < second["dice"]
    assert chosen["largest_component"] == [1]


def test_predict_set_changes_the_runs_predict_section(trained_run, phantom_dataset, tmp_path,
                                                      capsys):
    scans = [str(phantom_dataset / "imagesTs")]
    assert main(["predict", "--model", str(trained_run), "--input", *scans, "--output",
                 str(tmp_path / "raw"), "--set", "predict.largest_component=[]"]) == 0
    assert main(["predict", "--model", str(trained_run), "--input", *scans, "--output",
                 str(tmp_path / "kept"), "--set", "predict.largest_component=[1,2]"]) == 0
    from medseg.postprocess import keep_largest_component

    for path in sorted((tmp_path / "raw").glob("*.nii.gz")):
        np.testing.assert_array_equal(keep_largest_component(_mask(path), [1, 2]),
                                      _mask(tmp_path / "kept" / path.name))
    capsys.readouterr()
    assert main(["predict", "--model", str(trained_run), "--input", *scans, "--output",
                 str(tmp_path / "bad"), "--set", "predict.largest_component=[9]"]) == 2
    assert "names label(s) [9]" in capsys.readouterr().err
    assert main(["predict", "--model", str(trained_run), "--input", *scans, "--output",
                 str(tmp_path / "bad"), "--set", "plan.batch_size=3"]) == 2
    assert "only keys of the predict section" in capsys.readouterr().err


def test_a_run_of_every_fold_scores_every_case_once(phantom_dataset, tmp_path, capsys):
    from helpers import REPO, TINY_TRAINING, as_sets

    run = tmp_path / "all"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run), "--fold",
                 "all", *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING,
                                  "train.epochs=1"])]) == 0
    assert f"medseg crossval {run}" in capsys.readouterr().out
    assert main(["crossval", str(run)]) == 0
    captured = capsys.readouterr()
    assert "folds are trained" not in captured.err
    summary = json.loads((run / "crossval" / "summary.json").read_text(encoding="utf-8"))
    cases = sorted(p.name[: -len(".nii.gz")] for p in (phantom_dataset / "labelsTr").iterdir())
    assert sorted(summary["files"]) == cases and summary["n_cases"] == len(cases)
    folds = summary["crossval"]["folds"]
    assert sorted(folds) == ["0", "1", "2", "3", "4"]
    assert sum(entry["cases"] for entry in folds.values()) == len(cases)


@pytest.mark.parametrize("name", ["site/p1", "../p1", ".hidden", "a\\b"])
def test_a_case_name_that_cannot_name_a_mask_file_is_refused(tmp_path, name):
    """A CSV dataset's case column names the mask: `../p1` would write outside predictions/."""
    from medseg.crossval import _refuse_unusable_cases
    from medseg.datasets import Case, Dataset
    from medseg.errors import MedsegError

    case = Case(name, (tmp_path / "ct.nii.gz",), tmp_path / "label.nii.gz")
    dataset = Dataset(tmp_path, (case,), {0: "background", 1: "liver"}, ("CT",))
    with pytest.raises(MedsegError, match="cannot name a mask file"):
        _refuse_unusable_cases([name], {name: case}, 0, {}, dataset)
