"""Review of `medseg crossval`: problems found, each pinned by a test."""

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.crossval import POSTPROCESSING_FILE, largest_component_test
from medseg.evaluate import evaluate_case
from medseg.plan import load_plan


def _write(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), path)
    return path


def test_largest_component_test_keeps_the_component_predict_would_keep(trained_run, tmp_path):
    """With an `ignore` label, `medseg predict` keeps the largest component of the whole
    prediction, then the scores leave out the unannotated voxels. The test must weigh that,
    not the largest component of what is left once the ignored voxels are gone: here the
    largest blob of structure 1 lies in the unannotated part, so keeping it drops the true
    one and Dice falls to 0."""
    plan = load_plan(trained_run / "plan.json")
    ignore = max(plan.labels) + 1
    plan = dataclasses.replace(plan, ignore_label=ignore)
    reference = np.zeros((32, 32, 32), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    reference[14:30, 14:30, 14:30] = ignore
    prediction = np.zeros_like(reference)
    prediction[2:6, 2:6, 2:6] = 1  # the true blob
    prediction[10:12, 2:4, 2:4] = 1  # a small false one, in the annotated part
    prediction[16:28, 16:28, 16:28] = 1  # a large blob where no one annotated
    result = evaluate_case("a", _write(tmp_path / "pred.nii.gz", prediction),
                           _write(tmp_path / "ref.nii.gz", reference), plan.labels,
                           ignore_label=ignore)
    chosen = largest_component_test([result], plan)
    first = chosen["structures"][plan.labels[1]]
    assert first["dice"] < 1.0
    assert first["dice_largest_component"] == 0.0
    assert not first["apply"] and 1 not in chosen["largest_component"]


@pytest.mark.parametrize("option", [["--tolerance-mm", "-1"], ["--tolerance-mm", "nan"],
                                    ["--tolerance-mm", "inf"], ["--jobs", "0"]])
def test_a_bad_tolerance_or_jobs_is_refused_before_any_case_is_predicted(
        trained_run, tmp_path, capsys, option):
    """As evaluate refuses them (nan and inf were scored with, --jobs 0 taken as 1)."""
    out = tmp_path / "cv"
    assert main(["crossval", str(trained_run), "--out", str(out), *option]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("medseg: error:")]
    assert len(errors) == 1 and option[0] in errors[0]
    assert "segmenting" not in captured.out
    assert not out.exists()


def test_overwrite_leaves_no_earlier_results_beside_a_new_request(trained_run, tmp_path,
                                                                  monkeypatch, capsys):
    """An --overwrite cut short (Ctrl-C, a crash) must not leave the earlier summary.json,
    scores.csv, report.html and postprocessing.json beside the new crossval.json, where
    they read as this request's results."""
    import medseg.crossval as crossval

    out = tmp_path / "cv"
    assert main(["crossval", str(trained_run), "--out", str(out)]) == 0
    assert (out / "summary.json").is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crossval, "predict_cases", interrupted)
    with pytest.raises(KeyboardInterrupt):
        crossval.cross_validate(crossval.CrossvalRequest((trained_run,), out, overwrite=True))
    left = sorted(p.name for p in out.iterdir())
    assert not {"summary.json", "scores.csv", "report.html", POSTPROCESSING_FILE} & set(left)


def test_a_stopped_crossval_says_how_to_go_on(trained_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C while segmenting: predict's note says 'the same command goes on with the rest',
    but the same crossval command is refused (the folder holds a cross-validation): the note
    names --continue."""
    import medseg.predict as predict

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "_predict_streaming", stopped)
    out = tmp_path / "cv"
    assert main(["crossval", str(trained_run), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "the same command goes on" not in err
    assert "the same command with --continue segments the rest" in err


def test_crossval_json_records_the_settings_the_raw_masks_were_made_with(trained_run, tmp_path):
    """The masks are written without post-processing; crossval.json's `predict` must say so
    (docs/formats.md: largest_component and min_component_ml empty), not repeat the run's
    (the demo workflow keeps each organ's largest component)."""
    out = tmp_path / "cv"
    assert main(["crossval", str(trained_run), "--out", str(out)]) == 0
    request = json.loads((out / "crossval.json").read_text(encoding="utf-8"))
    assert request["predict"]["largest_component"] == []
    assert request["predict"]["min_component_ml"] == {}


def test_an_out_folder_that_cannot_be_made_is_a_user_error(trained_run, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("mine", encoding="utf-8")
    assert main(["crossval", str(trained_run), "--out", str(blocker / "cv")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("medseg: error:")]
    assert len(errors) == 1 and str(blocker) in errors[0] and "Errno" not in errors[0]
    assert blocker.read_text(encoding="utf-8") == "mine"


def test_a_run_given_twice_is_named_as_crossval_takes_it(trained_run, tmp_path, capsys):
    """crossval takes its runs as RUN_DIR arguments; the refusal spoke of --model."""
    assert main(["crossval", str(trained_run), str(trained_run), "--out",
                 str(tmp_path / "cv")]) == 2
    err = capsys.readouterr().err
    assert "given twice" in err and "--model" not in err
    assert not (tmp_path / "cv").exists()


def test_no_structure_chosen_says_how_to_drop_the_runs_own(trained_run, capsys):
    """A run whose workflow keeps the largest component (the demo's does) applies it in
    `medseg predict` unless told otherwise: "predict without it" must say how."""
    from medseg.crossval import _print_postprocessing

    plan = load_plan(trained_run / "plan.json")
    result = {"largest_component": [], "cases": 2, "structures": {
        "liver": {"id": 1, "dice": 0.8, "dice_largest_component": 0.7, "apply": False}}}
    _print_postprocessing(result, plan)
    assert "--set predict.largest_component=[]" in capsys.readouterr().out
