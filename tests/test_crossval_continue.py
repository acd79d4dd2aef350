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


def _crossval_then_edit(run: Path, tmp_path: Path, edit) -> Path:
    """A finished cross-validation of `run` whose crossval.json `edit` changed in place (as
    an older medseg, or a hand, wrote it)."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    record = json.loads((out / "crossval.json").read_text(encoding="utf-8"))
    edit(record)
    (out / "crossval.json").write_text(json.dumps(record), encoding="utf-8")
    return out


def _as_made_on_a_gpu(record: dict) -> None:
    assert record["arithmetic"]["device"] == "cpu"
    record["arithmetic"] = {"device": "cuda", "autocast": "float16"}


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
    out = _crossval_then_edit(run, tmp_path, lambda record: record.pop("weights"))
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


# review of --continue: no mask of other networks or of another request is scored as this
# one's, and none that the same networks made is thrown away

def _mask(out: Path, name: str) -> Path:
    return out / "predictions" / f"{name}.nii.gz"


def _retrain(run: Path, fold: int) -> None:
    best = run / f"fold_{fold}" / "checkpoints" / "best.safetensors"
    save_file({k: v * 1.01 if v.is_floating_point() else v
               for k, v in load_file(best).items()}, best)


def _stop_in_predict(monkeypatch) -> None:
    """Ctrl-C as the first case handed to predict is segmented."""
    import medseg.predict as predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "_predict_streaming", interrupted)


def test_a_stop_before_a_changed_fold_is_reached_keeps_none_of_its_old_masks(
        run, tmp_path, monkeypatch, segmented):
    """crossval.json names the new weights of fold 1 before any case is segmented: a stop
    in fold 0 must not leave fold 1's masks of the old weights to pass for the new ones'."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    _retrain(run, 1)
    _mask(out, _held_out(run, 0)[0]).unlink()  # fold 0 has a case to segment
    with monkeypatch.context() as patch:
        _stop_in_predict(patch)
        assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 130
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0)[:1] + _held_out(run, 1))


def test_a_linked_mask_is_segmented_again_not_scored(run, tmp_path, segmented):
    """medseg writes no links: a mask that is one leads to a file of someone else's."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    name = _held_out(run, 0)[0]
    foreign = tmp_path / "foreign.nii.gz"
    shutil.copyfile(_mask(out, _held_out(run, 1)[0]), foreign)
    _mask(out, name).unlink()
    _mask(out, name).symlink_to(foreign)
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert segmented == [name]
    assert not _mask(out, name).is_symlink() and foreign.is_file()


def test_a_stop_while_scoring_names_continue(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cv"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crossval, "evaluate_pairs", stopped)
    assert main(["crossval", str(run), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "--continue" in err and str(out) in err


def test_the_note_of_a_stopped_overwrite_does_not_ask_for_both_options(run, tmp_path,
                                                                       monkeypatch, capsys):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out), "--folds", "0"]) == 0
    _stop_in_predict(monkeypatch)
    assert main(["crossval", str(run), "--out", str(out), "--folds", "0",
                 "--overwrite"]) == 130
    assert "--continue in place of --overwrite" in capsys.readouterr().err


def test_folds_a_narrower_continue_left_out_keep_their_masks(run, tmp_path, segmented):
    """All folds, then `--continue --folds 0` (a look at one fold), then `--continue` of all:
    fold 1's masks, of the same weights, are not segmented again."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert main(["crossval", str(run), "--out", str(out), "--continue", "--folds", "0"]) == 0
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert segmented == []
    again = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert again["crossval"]["folds"] == first["crossval"]["folds"]


def test_a_left_out_fold_whose_weights_changed_meanwhile_is_segmented_again(
        run, tmp_path, segmented):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    assert main(["crossval", str(run), "--out", str(out), "--continue", "--folds", "0"]) == 0
    _retrain(run, 1)
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 1))


def test_a_left_out_fold_whose_cases_another_fold_segmented_is_not_kept(run, tmp_path,
                                                                        segmented):
    """The splits swapped, `--continue --folds 0` segments the old fold 1's cases with fold
    0's network; swapped back, those masks must not pass for fold 1's."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    splits_file = run / "splits.json"
    splits = json.loads(splits_file.read_text(encoding="utf-8"))
    splits_file.write_text(json.dumps([splits[1], splits[0], *splits[2:]]), encoding="utf-8")
    assert main(["crossval", str(run), "--out", str(out), "--continue", "--folds", "0"]) == 0
    splits_file.write_text(json.dumps(splits), encoding="utf-8")
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0) + _held_out(run, 1))


@pytest.mark.parametrize("weights, cases", [
    ([1, 2], {"0": "x"}),
    ({"0": {"a": 1}, "1": None, "7": ["h"]}, {"0": [1, 2], "1": [None], "7": [["x"]]}),
    ({"x": ["h"], "01": ["h"]}, {"x": ["a"], "01": ["b"]}),
])
def test_hostile_weights_or_cases_segment_again_without_a_traceback(run, tmp_path, segmented,
                                                                   weights, cases):
    out = _crossval_then_edit(run, tmp_path,
                              lambda record: record.update(weights=weights, cases=cases))
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue", "--folds", "0"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0))
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 1))


def test_weights_replaced_after_the_first_fold_was_loaded_are_not_recorded_as_its(
        run, tmp_path, monkeypatch, segmented):
    """Training writes a new best.safetensors just after crossval read fold 0's: the record
    must not name the new file's SHA-256 for masks the old weights made."""
    out = tmp_path / "cv"
    real = crossval.load_predictor
    calls = []

    def loading_then_retrained(runs, folds, *args, **kwargs):
        predictor = real(runs, folds, *args, **kwargs)
        if not calls:
            _retrain(run, 0)
        calls.append(folds)
        return predictor

    with monkeypatch.context() as patch:
        patch.setattr(crossval, "load_predictor", loading_then_retrained)
        assert main(["crossval", str(run), "--out", str(out)]) == 0
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0))


def test_a_record_nested_too_deep_is_refused_naming_it(run, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out), "--folds", "0"]) == 0
    (out / "crossval.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    capsys.readouterr()
    assert main(["crossval", str(run), "--out", str(out), "--folds", "0", "--continue"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / "crossval.json") in err and "--overwrite" in err


def test_a_record_of_medseg_before_continue_is_segmented_again(run, tmp_path, segmented):
    """crossval.json as medseg wrote it before --continue (neither `dataset` nor `weights`):
    nothing says which networks made its masks, so all are segmented again; it was refused
    as made with 'another dataset'."""
    out = _crossval_then_edit(run, tmp_path,
                              lambda record: [record.pop(k) for k in ("dataset", "weights")])
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0) + _held_out(run, 1))


def test_the_first_folds_networks_are_freed_before_the_next_folds_are_read(run, tmp_path,
                                                                          monkeypatch):
    """cross_validate kept the first fold's predictor (read before the folder is claimed)
    to its end: its networks stayed in (GPU) memory beside every later fold's."""
    import gc
    import weakref

    real = crossval.load_predictor
    first: list[weakref.ref] = []
    alive_then: list[bool] = []

    def loading(runs, folds, *args, **kwargs):
        if first:
            gc.collect()
            alive_then.append(first[0]() is not None)
        predictor = real(runs, folds, *args, **kwargs)
        if not first:
            first.append(weakref.ref(predictor))
        return predictor

    monkeypatch.setattr(crossval, "load_predictor", loading)
    assert main(["crossval", str(run), "--out", str(tmp_path / "cv")]) == 0
    assert alive_then == [False]


def test_masks_of_another_precision_are_refused_not_mixed_in(run, tmp_path, segmented,
                                                             capsys):
    """`predict.precision: auto` is bf16 on one CPU and fp32 on another: a --continue on the
    other machine would have mixed their masks in one figure; the record now says which."""
    out = _crossval_then_edit(run, tmp_path, _as_made_on_a_gpu)
    segmented.clear()
    capsys.readouterr()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 2
    err = capsys.readouterr().err
    assert "another device or precision (cuda, autocast float16)" in err
    assert str(out / "crossval.json") in err and segmented == []


def test_a_record_without_its_precision_is_segmented_again(run, tmp_path, segmented, capsys):
    out = _crossval_then_edit(run, tmp_path, lambda record: record.pop("arithmetic"))
    segmented.clear()
    capsys.readouterr()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0) + _held_out(run, 1))
    assert "does not say on which device" in capsys.readouterr().err
    assert "arithmetic" in json.loads((out / "crossval.json").read_text(encoding="utf-8"))


def test_a_second_crossval_on_the_same_folder_is_refused(run, tmp_path, segmented, capsys):
    """Two crossvals on one --out would remove and write each other's masks and record."""
    import fcntl

    out = tmp_path / "nested" / "cv"
    lock = tmp_path / "nested" / ".cv.medseg-crossval-lock"
    lock.parent.mkdir()
    with lock.open("a", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the first crossval holds it
        assert main(["crossval", str(run), "--out", str(out)]) == 2
    assert "another `medseg crossval` is writing this folder" in capsys.readouterr().err
    assert segmented == [] and not out.exists()
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    assert not lock.exists() and (out / "summary.json").is_file()


def _scored_dataset_copy(run: Path, tmp_path: Path, phantom_dataset: Path
                         ) -> tuple[list[str], Path]:
    """A cross-validation of `run` on a copy of its dataset: its command, and the copy."""
    dataset = tmp_path / "dataset"
    shutil.copytree(phantom_dataset, dataset)
    command = ["crossval", str(run), "--out", str(tmp_path / "cv"), "--dataset", str(dataset)]
    assert main(command) == 0
    return command, dataset


def _replace_image(dataset: Path, case: str, keep_time: bool) -> None:
    """The case's image rewritten brighter, on its grid; `keep_time`: with its old
    modification time, as `cp -p` of an edited copy (rsync -t, a backup restored) leaves it."""
    import os

    import nibabel as nib

    image = _image(dataset, case)
    was, volume = image.stat(), nib.load(image)
    data = volume.get_fdata() + 10
    nib.save(nib.Nifti1Image(data.astype(volume.get_data_dtype()), volume.affine,
                             volume.header), image)
    if keep_time:
        os.utime(image, ns=(was.st_atime_ns, was.st_mtime_ns))


def _image(dataset: Path, case: str) -> Path:
    return next(path for path in (dataset / "imagesTr").iterdir()
                if path.name.startswith(case))


def test_a_case_whose_image_changed_after_its_mask_is_segmented_again(run, tmp_path,
                                                                     phantom_dataset,
                                                                     segmented, capsys):
    """--continue kept a mask made from an image replaced since (same dataset root)."""
    command, dataset = _scored_dataset_copy(run, tmp_path, phantom_dataset)
    case = _held_out(run, 1)[0]
    _replace_image(dataset, case, keep_time=False)
    segmented.clear()
    capsys.readouterr()
    assert main([*command, "--continue"]) == 0
    assert segmented == [case]
    assert "fold 1: 1 case(s) whose images are not those" in capsys.readouterr().err


def test_an_image_replaced_keeping_its_old_time_is_segmented_again(run, tmp_path,
                                                                  phantom_dataset, segmented):
    """`cp -p` (rsync -t, a backup restored) keeps the replaced file's old modification time:
    --continue took the image for the one the mask was made from, and scored that mask."""
    command, dataset = _scored_dataset_copy(run, tmp_path, phantom_dataset)
    case = _held_out(run, 1)[0]
    _replace_image(dataset, case, keep_time=True)
    segmented.clear()
    assert main([*command, "--continue"]) == 0
    assert segmented == [case]


def test_an_image_only_touched_keeps_its_mask(run, tmp_path, phantom_dataset, segmented):
    """The images' content decides, not their time: a `touch` segments nothing again."""
    import os

    command, dataset = _scored_dataset_copy(run, tmp_path, phantom_dataset)
    case = _held_out(run, 1)[0]
    later = _mask(tmp_path / "cv", case).stat().st_mtime + 60
    os.utime(_image(dataset, case), (later, later))
    segmented.clear()
    assert main([*command, "--continue"]) == 0
    assert segmented == []


def test_a_stop_before_the_fold_of_a_replaced_image_keeps_none_of_its_old_masks(
        run, tmp_path, phantom_dataset, monkeypatch, segmented):
    """crossval.json names the images' new SHA-256 before any case is segmented: a stop in
    fold 0 must not leave fold 1 the mask of the image that was replaced."""
    command, dataset = _scored_dataset_copy(run, tmp_path, phantom_dataset)
    case = _held_out(run, 1)[0]
    _replace_image(dataset, case, keep_time=True)
    _mask(tmp_path / "cv", _held_out(run, 0)[0]).unlink()  # fold 0 has a case to segment
    with monkeypatch.context() as patch:
        _stop_in_predict(patch)
        assert main([*command, "--continue"]) == 130
    segmented.clear()
    assert main([*command, "--continue"]) == 0
    assert sorted(segmented) == sorted([_held_out(run, 0)[0], case])


def test_a_record_without_its_images_is_segmented_again_with_a_note(run, tmp_path, segmented,
                                                                   capsys):
    """crossval.json of the medseg before `images`: nothing says which image contents its
    masks were made from, so all are segmented again (as a record without `arithmetic`)."""
    out = _crossval_then_edit(run, tmp_path, lambda record: record.pop("images"))
    segmented.clear()
    capsys.readouterr()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0) + _held_out(run, 1))
    assert "does not say from which image contents its masks were made" in \
        capsys.readouterr().err
    record = json.loads((out / "crossval.json").read_text(encoding="utf-8"))
    assert sorted(record["images"]) == sorted(_held_out(run, 0) + _held_out(run, 1))


def test_crossval_json_holds_each_cases_image_sha256(run, tmp_path, phantom_dataset):
    _, dataset = _scored_dataset_copy(run, tmp_path, phantom_dataset)
    record = json.loads((tmp_path / "cv" / "crossval.json").read_text(encoding="utf-8"))
    case = _held_out(run, 1)[0]
    assert record["images"][case] == [crossval.sha256_of_file(_image(dataset, case))]


def test_a_dicom_series_folders_digest_is_that_of_the_files_read(tmp_path):
    """Every file the series is read from counts, in its subfolders too, whatever its time;
    hidden files (not read) do not; a folder that cannot be read has none."""
    import hashlib
    import os

    series = tmp_path / "series"
    (series / "part").mkdir(parents=True)
    for name, data in (("a.dcm", b"slice a"), ("part/b.dcm", b"slice b"), (".DS_Store", b"x")):
        (series / name).write_bytes(data)
    sums = b"".join(hashlib.sha256(data).hexdigest().encode() + b"  " + name + b"\n"
                    for name, data in ((b"a.dcm", b"slice a"), (b"part/b.dcm", b"slice b")))
    digest = crossval._image_digest(series)
    assert digest == hashlib.sha256(sums).hexdigest()
    (series / ".DS_Store").write_bytes(b"y")
    assert crossval._image_digest(series) == digest
    was = (series / "part" / "b.dcm").stat()
    (series / "part" / "b.dcm").write_bytes(b"slice B")
    os.utime(series / "part" / "b.dcm", ns=(was.st_atime_ns, was.st_mtime_ns))
    assert crossval._image_digest(series) not in (digest, None)
    assert crossval._image_digest(tmp_path / "gone") is None


@pytest.mark.parametrize("header", ["scan.mhd", "scan.nhdr"])
def test_a_detached_headers_digest_covers_its_data_file(tmp_path, header):
    """The voxels of a .mhd or .nhdr are in another file: one replaced keeping its time (or
    not) changed nothing the check looked at."""
    import os

    import numpy as np
    import SimpleITK as sitk

    from medseg.itkio import detached_data_files

    path = tmp_path / header
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)),
                    str(path))
    [data] = detached_data_files(path)
    assert data.is_file() and data != path
    digest = crossval._image_digest(path)
    assert digest not in (None, crossval.sha256_of_file(path))
    was = data.stat()
    data.write_bytes(bytes(reversed(data.read_bytes())))
    os.utime(data, ns=(was.st_atime_ns, was.st_mtime_ns))
    assert crossval._image_digest(path) not in (digest, None)
    data.unlink()
    assert crossval._image_digest(path) is None


def test_a_header_of_a_list_of_data_files_has_no_digest(tmp_path):
    path = tmp_path / "scan.mhd"
    path.write_text("NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\n"
                    "ElementDataFile = slice%d.raw 1 2 1\n", encoding="ascii")
    assert crossval._image_digest(path) is None


def test_a_mask_changed_after_it_was_scored_is_segmented_again(run, tmp_path, segmented,
                                                              capsys):
    """A mask post-processed in place, or another's copied over it, was kept and scored as
    the raw mask of this request's networks."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    record = json.loads((out / "crossval.json").read_text(encoding="utf-8"))
    case, other = _held_out(run, 1)[0], _held_out(run, 0)[0]
    assert record["masks"][case] == crossval.sha256_of_file(_mask(out, case))
    shutil.copyfile(_mask(out, other), _mask(out, case))
    segmented.clear()
    capsys.readouterr()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert segmented == [case]
    assert "or whose masks changed since" in capsys.readouterr().err
    assert _mask(out, case).read_bytes() != _mask(out, other).read_bytes()


def test_a_stopped_continue_keeps_the_masks_record_of_the_cases_it_kept(run, tmp_path,
                                                                      monkeypatch, segmented):
    """A --continue stopped before it scored wrote a record without the kept masks' SHA-256:
    a mask changed after that passed for this request's."""
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    first, case = _held_out(run, 0)[0], _held_out(run, 1)[0]
    _mask(out, first).unlink()  # fold 0 has a case to segment
    with monkeypatch.context() as patch:
        _stop_in_predict(patch)
        assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 130
    shutil.copyfile(_mask(out, _held_out(run, 0)[1]), _mask(out, case))
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted([first, case])


def test_a_left_out_folds_mask_changed_meanwhile_is_segmented_again(run, tmp_path,
                                                                   segmented):
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out)]) == 0
    assert main(["crossval", str(run), "--out", str(out), "--continue", "--folds", "0"]) == 0
    case = _held_out(run, 1)[0]
    shutil.copyfile(_mask(out, _held_out(run, 0)[0]), _mask(out, case))
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert segmented == [case]


@pytest.mark.parametrize("images, masks", [([1], {"x": {"b": []}}), ({"x": 1}, None)])
def test_hostile_images_or_masks_segment_again_without_a_traceback(run, tmp_path, segmented,
                                                                  images, masks):
    def hostile(record: dict) -> None:
        for key, value in (("images", images), ("masks", masks)):
            if isinstance(value, dict):  # every case named
                value = {name: value.get("x", value) for name in record[key]}
            record[key] = value

    out = _crossval_then_edit(run, tmp_path, hostile)
    segmented.clear()
    assert main(["crossval", str(run), "--out", str(out), "--continue"]) == 0
    assert sorted(segmented) == sorted(_held_out(run, 0) + _held_out(run, 1))
