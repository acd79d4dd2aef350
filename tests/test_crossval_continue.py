"""`medseg crossval --continue`: a cross-validation cut short goes on where it stopped (as
nnU-Net's `--continue_prediction`), keeping only masks the same networks and settings made."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import medseg.crossval as crossval
from medseg.cli import main
from medseg.errors import MedsegError


@pytest.fixture
def run(two_fold_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(two_fold_run, copy)
    return copy


@pytest.fixture
def segmented(monkeypatch) -> list[str]:
    """The case names crossval hands to predict, in order."""
    names: list[str] = []
    real = crossval.predict_cases

    def counting(predictor, cases, *args, **kwargs):
        names.extend(name for name, _ in cases)
        return real(predictor, cases, *args, **kwargs)

    monkeypatch.setattr(crossval, "predict_cases", counting)
    return names


def _held_out(run: Path, fold: int) -> list[str]:
    return json.loads((run / "splits.json").read_text(encoding="utf-8"))[fold]["val"]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def _stop_at_fold(monkeypatch, fold: int) -> None:
    """Ctrl-C as fold `fold`'s first case is segmented."""
    import medseg.predict as predict

    real = crossval.predict_cases

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def stopping(predictor, cases, *args, **kwargs):
        if predictor.folds == (f"fold_{fold}",):
            monkeypatch.setattr(predict, "_predict_streaming", interrupted)
        return real(predictor, cases, *args, **kwargs)

    monkeypatch.setattr(crossval, "predict_cases", stopping)


def test_continue_segments_only_the_cases_left_and_scores_them_all(run, tmp_path,
                                                                    monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert main(["crossval", str(run), "--out", str(straight)]) == 0
    out = tmp_path / "cv"
    with monkeypatch.context() as patch:
        _stop_at_fold(patch, 1)
        assert main(["crossval", str(run), "--out", str(out)]) == 130
    assert "--continue segments the rest" in capsys.readouterr().err
    assert not (out / "summary.json").exists()
    fold_0_masks = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    assert sorted(fold_0_masks) == sorted(f"{name}.nii.gz" for name in _held_out(run, 0))

    names: list[str] = []
    real = crossval.predict_cases
    monkeypatch.setattr(crossval, "predict_cases", lambda p, cases, *a, **k: (
        names.extend(n for n, _ in cases), real(p, cases, *a, **k))[1])
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(names) == sorted(_held_out(run, 1))  # fold 0's cases were not redone
    assert "fold 0: 2 of its 2 held-out case(s) segmented already" in capsys.readouterr().out
    for name, mtime in fold_0_masks.items():
        assert (out / "predictions" / name).stat().st_mtime_ns == mtime
    continued, whole = _summary(out), _summary(straight)
    assert continued["crossval"]["folds"] == whole["crossval"]["folds"]
    assert continued["structures"] == whole["structures"]


def test_a_fold_whose_weights_changed_is_segmented_again(run, tmp_path, segmented, capsys):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    segmented.clear()
    best = run / "fold_1" / "checkpoints" / "best.safetensors"
    save_file({k: v * 1.01 if v.is_floating_point() else v
               for k, v in load_file(best).items()}, best)  # fold 1 trained on, say
    (out / "predictions" / f"{_held_out(run, 0)[0]}.nii.gz").unlink()  # removed by hand
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    # fold 0: the case whose mask is gone; fold 1: all
    assert sorted(segmented) == sorted(_held_out(run, 0)[:1] + _held_out(run, 1))
    assert "fold 1's weights or cases changed" in capsys.readouterr().err
    record = json.loads((out / "crossval.json").read_text(encoding="utf-8"))
    assert record["weights"]["1"] == [crossval.sha256_of_file(best)]


def test_nothing_left_to_segment_loads_no_network(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    first = _summary(out)

    def no_loading(*args, **kwargs):
        raise AssertionError("a network was loaded for a fold already segmented")

    loaded = iter([crossval.load_predictor])  # the first fold's, loaded to check the runs
    monkeypatch.setattr(crossval, "load_predictor",
                        lambda *a, **k: next(loaded, no_loading)(*a, **k))
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert _summary(out)["structures"] == first["structures"]


@pytest.mark.parametrize("changed", [["--step", "0.7"], ["--folds", "0", "--tta"]])
def test_other_settings_are_refused_not_mixed_in(run, tmp_path, segmented, capsys, changed):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    record = (out / "crossval.json").read_bytes()
    segmented.clear()
    capsys.readouterr()
    assert main(["crossval", str(run), "--out", str(out), "--continue", *changed]) == 2
    err = capsys.readouterr().err
    assert "was made with other predict settings" in err and "--overwrite" in err
    assert str(out / "crossval.json") in err
    assert segmented == [] and (out / "crossval.json").read_bytes() == record
    assert (out / "summary.json").is_file()  # the earlier results stay


def test_continue_and_overwrite_together_are_refused(run, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out), "--continue", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert not out.exists()


def test_continue_on_a_new_folder_is_a_first_run(run, tmp_path, segmented):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0) + _held_out(run, 1))


def test_an_earlier_record_without_weights_is_segmented_again(run, tmp_path, segmented,
                                                              capsys):
    """A crossval.json of medseg before --continue (no `weights`): nothing says which
    networks made its masks, so every case is segmented again."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    record = json.loads((out / "crossval.json").read_text(encoding="utf-8"))
    del record["weights"]
    (out / "crossval.json").write_text(json.dumps(record), encoding="utf-8")
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0) + _held_out(run, 1))


def test_overwrite_removes_the_earlier_masks_first(run, tmp_path, monkeypatch):
    """A case failing under --overwrite must not be scored on the mask an earlier run left
    (nor a later --continue take that mask for this request's)."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out), "--folds", "0"]) == 0
    failing = _held_out(run, 0)[0]
    import medseg.predict as predict

    real = predict._read_case

    def unreadable(plan, files, *args, **kwargs):  # a failure of this case alone
        if failing in str(files[0]):
            raise MedsegError("cannot be read", files[0])
        return real(plan, files, *args, **kwargs)

    monkeypatch.setattr(predict, "_read_case", unreadable)
    assert main(["crossval", str(run), "--out", str(out), "--folds", "0", "--overwrite"]) == 1
    assert not (out / "predictions" / f"{failing}.nii.gz").exists()
    assert _summary(out)["failed_cases"] == [failing]
