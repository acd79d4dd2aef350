"""What a mutation audit of medseg/cli.py and medseg/predict.py found unguarded (each test
names the single-line bug it kills): train's argument rules and run-folder refusals, fold
numbers, exit codes and the one-line error handling, the closing line of a finished fold, the
run's predict settings and the options that override them, --reference's exit code, shards
refusing clashing masks, which fold folders are folds, channel order, read-ahead and the
precision of prediction. Small synthetic data; the trained run is conftest's."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, SMALL_SHAPE, SMALL_SPACING, TINY_TRAINING, as_sets

import medseg.cli
import medseg.predict
from medseg.cli import main
from medseg.config import PlanConfig, PredictConfig, load_workflow, save_workflow
from medseg.errors import MedsegError
from medseg.phantoms import make_phantom
from medseg.predict import (
    Predictor,
    _window_probabilities,
    group_channels,
    load_predictor,
    predict_paths,
)

DEMO = str(REPO / "workflows" / "demo.yaml")


def save_phantom(path, seed: int) -> None:
    phantom = make_phantom(seed, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), path)


def copy_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# ---------------------------------------------------------------- train's rules


def test_resume_refuses_a_workflow_as_well(tmp_path, capsys):
    """Kills: `if args.workflow or args.out` -> `if args.out` (a WORKFLOW beside --resume was
    silently ignored, though the saved workflow is what resumes)."""
    assert main(["train", DEMO, "--resume", str(tmp_path)]) == 2
    assert "--resume takes the run folder alone" in capsys.readouterr().err


def test_resume_refuses_overwrite(tmp_path, capsys):
    """`--resume RUN --overwrite` was accepted and the --overwrite silently ignored."""
    assert main(["train", "--resume", str(tmp_path), "--overwrite"]) == 2
    assert "--resume continues a run and --overwrite starts it again" in \
        capsys.readouterr().err


def test_a_damaged_state_is_refused_before_caching_or_saving_the_workflow(
        trained_run, tmp_path, capsys):
    """A state cut short was found only after every case was cached (into cache/ with
    train.cache=disk) and after workflow.yaml took the --set values."""
    run = copy_run(trained_run, tmp_path)
    state = run / "fold_0" / "checkpoints" / "last_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    saved = (run / "workflow.yaml").read_text(encoding="utf-8")
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=5",
                 "--set", "train.cache=disk"]) == 2
    err = capsys.readouterr().err
    assert f"{state}: cannot resume from this training state (the file is empty, cut short " \
        "or not a torch checkpoint)" in err
    assert (run / "workflow.yaml").read_text(encoding="utf-8") == saved
    assert not (run / "cache").exists()
    for damaged in (b"", b"not a checkpoint at all"):  # torch's message advised re-saving
        state.write_bytes(damaged)
        assert main(["train", "--resume", str(run)]) == 2
        assert capsys.readouterr().err.strip().endswith(
            "cannot resume from this training state (the file is empty, cut short or not a "
            "torch checkpoint)")


def test_resume_may_not_change_other_dataset_keys(tmp_path, capsys):
    """Kills: any `dataset.*` key let through with --resume (only dataset.path may change:
    another layout or label map is another dataset)."""
    assert main(["train", "--resume", str(tmp_path), "--set", "dataset.layout=nnunet"]) == 2
    assert ("may only change train.max_minutes, dataset.path, train.cache, train.num_workers, not "
            "'dataset.layout=nnunet'" in capsys.readouterr().err)


def test_overwrite_replaces_only_a_run_folder(tmp_path, capsys):
    """Kills: the plan.json check of --overwrite dropped (a folder of one's own files would be
    deleted once the dataset had been read)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep", encoding="utf-8")
    code = main(["train", DEMO, "--out", str(mine), "--overwrite", "--set",
                 f"dataset.path={tmp_path / 'no_dataset'}"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"medseg: error: {mine}: refusing to overwrite a folder that is not a medseg run")
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "keep"


def test_an_existing_empty_run_folder_is_not_refused(tmp_path, capsys):
    """Kills: `run_dir.exists() and any(run_dir.iterdir())` -> `run_dir.exists()` (docs: an
    existing, non-empty RUN_DIR is refused): the run goes on to read its dataset."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["train", DEMO, "--out", str(empty), "--set",
                 f"dataset.path={tmp_path / 'no_dataset'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no_dataset: dataset folder not found" in err and "run folder exists" not in err


@pytest.mark.parametrize("fold", ["5", "-1"])
def test_a_fold_outside_the_runs_folds_is_refused_before_any_work(tmp_path, phantom_dataset,
                                                                  capsys, fold):
    """Kills: `0 <= fold < n_folds` -> `<= n_folds` (fold 5 of 5: splits[5] fails after the
    dataset was read) and -> `fold < n_folds` (fold -1 trained the last split as fold_-1)."""
    run = tmp_path / "r"
    assert main(["train", DEMO, "--out", str(run), "--set", f"dataset.path={phantom_dataset}",
                 *as_sets(TINY_TRAINING), "--fold", fold]) == 2
    assert capsys.readouterr().err.strip() == f"medseg: error: --fold {fold} is outside 0..4"
    assert not run.exists()


def test_a_finished_fold_is_not_reported_as_stopped_by_its_budget(trained_run, tmp_path,
                                                                  capsys):
    """Kills: `epochs_run < planned_epochs` -> `<=` in the closing line (every finished fold
    told to `--resume` as if train.max_minutes had stopped it)."""
    run = copy_run(trained_run, tmp_path)
    assert main(["train", "--resume", str(run)]) == 0
    closing = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("fold_0: best mean Dice")]
    assert len(closing) == 1 and "; 2 of 2 epochs; " in closing[0]
    assert "stopped by" not in closing[0]


# ---------------------------------------------------------------- exit codes, one line


def test_ctrl_c_is_exit_130_said_once_by_rank_0(tmp_path, capsys, monkeypatch):
    """Kills: `return 130` -> `return 1` for KeyboardInterrupt (docs: Ctrl-C ends a command
    with 130, "medseg: interrupted")."""
    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(medseg.cli, "cmd_check", interrupted)
    assert main(["check", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "medseg: interrupted"
    monkeypatch.setenv("RANK", "1")
    assert main(["check", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ""


def test_a_user_error_inside_a_monai_transform_is_exit_2_in_one_line(tmp_path, capsys,
                                                                     monkeypatch):
    """Kills: the unwrapped MedsegError's `return EXIT_USER_ERROR` -> `return 1` (a bad
    volume met inside preprocessing is a user error, as outside it)."""
    bad = tmp_path / "bad.nii.gz"

    def fails_in_a_transform(_args):
        try:
            raise MedsegError("not a volume", bad)
        except MedsegError as exc:
            raise RuntimeError("applying transform <Spacingd object at 0x7f>") from exc

    monkeypatch.setattr(medseg.cli, "cmd_check", fails_in_a_transform)
    assert main(["check", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"medseg: error: {bad}: not a volume"


def test_debug_shows_the_traceback_of_an_unexpected_error(tmp_path, capsys, monkeypatch):
    """Kills: the `traceback.print_exc()` of the unexpected-error branch dropped (--debug is
    the way to a bug's traceback)."""
    def fails(_args):
        raise ValueError("a bug")

    monkeypatch.setattr(medseg.cli, "cmd_check", fails)
    assert main(["check", str(tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in fails" in err
    assert err.strip().splitlines()[-1] == (
        "medseg: error: ValueError: a bug (rerun with --debug for the traceback)")


def test_one_process_never_blames_another(tmp_path, capsys, monkeypatch):
    """Kills: `WORLD_SIZE <= 1` -> `< 1` in _lost_another_process (one process whose error
    mentions gloo was told it had lost a partner it never had)."""
    def fails(_args):
        raise RuntimeError("gloo: connection closed by peer")

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(medseg.cli, "cmd_check", fails)
    assert main(["check", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "medseg: error: RuntimeError: gloo: connection closed by peer (rerun with --debug "
        "for the traceback)")


# ---------------------------------------------------------------- predict's options


@pytest.fixture()
def configured_run(trained_run, tmp_path):
    """The trained run, with a second fold and its own predict settings (TTA on, step 0.75,
    fp32, no post-processing)."""
    run = copy_run(trained_run, tmp_path)
    shutil.copytree(run / "fold_0", run / "fold_1")
    workflow = load_workflow(run / "workflow.yaml")
    save_workflow(dataclasses.replace(workflow, predict=dataclasses.replace(
        workflow.predict, tta=True, step=0.75, precision="fp32", largest_component=[])),
        run / "workflow.yaml")
    return run


def test_predict_takes_the_runs_settings_and_the_options_over_them(configured_run, tmp_path,
                                                                   monkeypatch):
    """Kills, in the CLI's _predict: --no-tta not overriding the run's `predict.tta: true`
    (`options.tta or config.tta`), --step ignored, --folds ignored, and the run's
    workflow.yaml predict section not read (defaults used instead)."""
    seen = []

    def fake_predict_paths(predictor, paths, output, config, **kwargs):
        seen.append((predictor.folds, config, kwargs))
        return []

    monkeypatch.setattr(medseg.predict, "predict_paths", fake_predict_paths)
    scan = tmp_path / "a.nii.gz"
    save_phantom(scan, 1)
    args = ["predict", "--model", str(configured_run), "--input", str(scan), "--output",
            str(tmp_path / "out"), "--device", "cpu"]
    assert main(args) == 0
    assert main([*args, "--no-tta", "--step", "0.25", "--folds", "1", "--overwrite"]) == 0
    (folds, config, kwargs), (folds_2, config_2, kwargs_2) = seen
    assert folds == ("fold_0", "fold_1") and folds_2 == ("fold_1",)
    assert (config.tta, config.step, config.precision, config.largest_component) == \
        (True, 0.75, "fp32", [])
    assert (config_2.tta, config_2.step, config_2.precision) == (False, 0.25, "fp32")
    assert not kwargs["overwrite"] and kwargs_2["overwrite"]


def test_a_reference_that_cannot_be_scored_fails_the_run(trained_run, tmp_path, capsys):
    """Kills: `if summary["failed_cases"]: return 1` dropped from predict --reference (a mask
    scored as a failure, Dice 0, ended the run with 0)."""
    scan = tmp_path / "in" / "a.nii.gz"
    scan.parent.mkdir()
    save_phantom(scan, 1)
    references = tmp_path / "references"
    references.mkdir()
    other_grid = make_phantom(1, shape=(16, 16, 12), spacing=SMALL_SPACING)
    nib.save(nib.Nifti1Image(other_grid.label.astype(np.uint8), other_grid.affine),
             references / "a.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(trained_run), "--input", str(scan.parent),
                 "--output", str(out), "--reference", str(references)]) == 1
    assert (out / "a.nii.gz").is_file()
    out = capsys.readouterr().out
    assert "predicted 1 of 1 cases" in out and "failed 0" in out  # the scoring failed it


@pytest.mark.parametrize("shard", ["0/2", "1/2"])
def test_every_shard_refuses_masks_that_would_share_a_name(trained_run, tmp_path, capsys,
                                                           shard):
    """Kills: the clash check run on this shard's cases alone (`cases[index::count]`): each
    of two processes wrote its own a.nii.gz, one over the other."""
    (tmp_path / "in").mkdir()
    (tmp_path / "more").mkdir()
    save_phantom(tmp_path / "in" / "a.nii.gz", 1)
    save_phantom(tmp_path / "more" / "a.nii.gz", 2)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(trained_run), "--output", str(out), "--shard",
                 shard, "--input", str(tmp_path / "in"), str(tmp_path / "more")]) == 2
    assert "would both be written as a.nii.gz" in capsys.readouterr().err
    assert not out.exists()


def test_a_fold_folder_without_best_weights_is_not_a_fold(trained_run, tmp_path):
    """Kills: the `checkpoints/best.safetensors` filter of load_predictor dropped (a fold that
    has just started training, or only has its training state, failed every prediction)."""
    run = copy_run(trained_run, tmp_path)
    (run / "fold_1").mkdir()
    (run / "fold_1" / "metrics.jsonl").write_text("", encoding="utf-8")
    (run / "fold_2" / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "fold_0" / "checkpoints" / "last_state.pt",
                run / "fold_2" / "checkpoints" / "last_state.pt")
    assert load_predictor(run, device="cpu").folds == ("fold_0",)


def test_channel_files_given_in_any_order_are_grouped_by_channel(tmp_path):
    """Kills: `tuple(files[k] for k in range(channels))` -> `tuple(files.values())` (given
    as `b_0001 b_0000`, channel 1 became the network's channel 0 and named the mask
    b_0001.nii.gz)."""
    zero, one = tmp_path / "b_0000.nii.gz", tmp_path / "b_0001.nii.gz"
    assert group_channels([one, zero], 2) == [(zero, one)]


def test_a_large_case_is_not_read_beside_another(trained_run, tmp_path, monkeypatch):
    """Kills: `_read_ahead_fits` left out of the read-ahead decision (two large CTs in memory
    at once): when the running case does not fit, the next is read only after it."""
    (tmp_path / "in").mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        save_phantom(tmp_path / "in" / f"{name}.nii.gz", seed)
    events = []
    lock = threading.Lock()
    read, predicted = medseg.predict.prepare_case, medseg.predict.predict_prepared

    def logged_read(plan, files, **kwargs):
        with lock:
            events.append(("read", files[0].name))
        return read(plan, files, **kwargs)

    def slow_predict(predictor, case, config):
        time.sleep(0.5)  # time for a read-ahead to start, if there were one
        mask = predicted(predictor, case, config)
        with lock:
            events.append(("predicted", None))
        return mask

    monkeypatch.setattr(medseg.predict, "prepare_case", logged_read)
    monkeypatch.setattr(medseg.predict, "predict_prepared", slow_predict)
    monkeypatch.setattr(medseg.predict, "_read_ahead_fits", lambda case, predictor: False)
    predictor = load_predictor(trained_run, device="cpu")
    inputs = sorted((tmp_path / "in").iterdir())
    results = predict_paths(predictor, inputs, tmp_path / "out", PredictConfig())
    assert all(r.error is None for r in results)
    assert events == [("read", "a.nii.gz"), ("predicted", None), ("read", "b.nii.gz"),
                      ("predicted", None)]


def test_predict_precision_fp32_is_float32_on_a_bf16_cpu(monkeypatch):
    """Kills: `select_precision(config.precision, ...)` -> `select_precision("auto", ...)`:
    `predict.precision: fp32` ran in bf16 on a CPU with native bf16."""
    from helpers import synthetic_fingerprint

    from medseg.model import create_model
    from medseg.plan import make_plan

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[16, 16, 16]] * 3)
    plan = make_plan(fp, PlanConfig(patch_size=[16, 16, 16], base_filters=2, max_filters=4))
    torch.manual_seed(0)
    model = create_model(plan).eval()
    predictor = Predictor(plan, (model,), ("fold_0",), torch.device("cpu"))
    batch = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    got = _window_probabilities(predictor, batch, PredictConfig(precision="fp32"))
    with torch.no_grad():
        logits = model(batch)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        expected = torch.softmax(logits.float(), dim=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_fold_stopped_before_its_first_saved_state_is_noted(trained_run, tmp_path, capsys):
    """A fold killed after its first best weights but before its first training state was
    taken for a finished model shipped without its state: no note."""
    from medseg.predict import load_predictor

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "fold_0" / "checkpoints" / "last_state.pt").unlink()
    metrics = run / "fold_0" / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 2
    load_predictor(run)  # every epoch recorded: finished
    assert "has not finished" not in capsys.readouterr().err
    metrics.write_text(lines[0] + "\n", encoding="utf-8")  # one epoch of two
    load_predictor(run)
    assert f"fold_0 has not finished its {len(lines)} epochs" in capsys.readouterr().err
    metrics.unlink()  # neither state nor metrics: a model shipped as weights
    load_predictor(run)
    assert "has not finished" not in capsys.readouterr().err
