"""Session 27 (V): `medseg predict`'s batch machinery over many cases: shards, reruns."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SHAPE, SMALL_SPACING

from medseg.config import PredictConfig, Workflow, save_workflow
from medseg.model import create_model, save_weights
from medseg.phantoms import make_phantom
from medseg.plan import Plan, save_plan
from medseg.predict import load_predictor, predict_paths


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained 3-class model on the small test grid: enough to write masks."""
    run = tmp_path_factory.mktemp("tiny_run")
    plan = Plan(target_spacing=list(SMALL_SPACING), patch_size=[32, 32, 16], batch_size=2,
                kernels=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                filters=[4, 8, 16], deep_supervision=False, in_channels=1, num_classes=3,
                labels={0: "background", 1: "a", 2: "b"}, modalities=["CT"],
                normalization=[{"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0,
                                "std": 400.0}],
                median_shape=list(SMALL_SHAPE))
    save_plan(plan, run / "plan.json")
    save_workflow(Workflow(), run / "workflow.yaml")
    save_weights(create_model(plan), run / "fold_0" / "checkpoints" / "best.safetensors")
    return run


def _scan(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    case = make_phantom(seed, SMALL_SHAPE, SMALL_SPACING)
    nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine), path)
    return path


def test_shards_given_the_folders_spelt_otherwise_write_every_case_once(
        tiny_run, tmp_path, monkeypatch):
    # shard 0 was given `/abs/b`, shard 1 `b`: sorted by path, `/abs/b/case2` came first in
    # one and last in the other, so case0 was never predicted and case1 twice
    monkeypatch.chdir(tmp_path)
    for name, seed in (("a/case0.nii.gz", 0), ("a/case1.nii.gz", 1), ("b/case2.nii.gz", 2)):
        _scan(tmp_path / name, seed)
    predictor = load_predictor(tiny_run, device="cpu")
    first = predict_paths(predictor, [Path("a/case0.nii.gz"), Path("a/case1.nii.gz"),
                                      tmp_path / "b" / "case2.nii.gz"],
                          Path("out"), PredictConfig(), shard=(0, 2))
    second = predict_paths(predictor, [Path("a/case0.nii.gz"), Path("a/case1.nii.gz"),
                                       Path("b/case2.nii.gz")],
                           Path("out"), PredictConfig(), shard=(1, 2))
    written = sorted(r.output.name for r in first + second if not r.skipped)
    assert written == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]


def test_a_mask_cut_short_is_predicted_again_not_skipped_as_done(tiny_run, tmp_path, capsys):
    # a mask left half-written by an older medseg killed while writing it in place (or a
    # copy cut short) was skipped as done: the batch said so and the mask stayed unreadable
    scan = _scan(tmp_path / "scans" / "case0.nii.gz", 0)
    predictor = load_predictor(tiny_run, device="cpu")
    out = tmp_path / "out"
    predict_paths(predictor, [scan], out, PredictConfig())
    mask = out / "case0.nii.gz"
    whole = mask.read_bytes()
    mask.write_bytes(whole[: len(whole) // 2])
    results = predict_paths(predictor, [scan], out, PredictConfig())
    assert not results[0].skipped and results[0].error is None
    assert mask.read_bytes() == whole
    assert "case0.nii.gz: cut short" in capsys.readouterr().err
    # a whole mask is still skipped
    assert predict_paths(predictor, [scan], out, PredictConfig())[0].skipped


def test_a_stopped_overwrite_batch_does_not_say_the_same_command_goes_on(
        tiny_run, tmp_path, monkeypatch, capsys):
    # Ctrl-C in `--overwrite` over an earlier run's masks said "the same command goes on
    # with the rest": it starts over (--overwrite), and without --overwrite the cases not
    # reached keep the earlier masks as done
    import medseg.predict
    from medseg.cli import main

    for seed in range(3):
        _scan(tmp_path / "scans" / f"case{seed}.nii.gz", seed)
    args = ["predict", "--model", str(tiny_run), "--input", str(tmp_path / "scans"),
            "--output", str(tmp_path / "out"), "--device", "cpu"]
    assert main(args) == 0
    predict_prepared = medseg.predict.predict_prepared
    calls = []

    def stop_at_the_second(*pargs, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return predict_prepared(*pargs, **kwargs)

    monkeypatch.setattr(medseg.predict, "predict_prepared", stop_at_the_second)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "goes on with the rest\n" not in err
    assert ("stopped after 1 of the 3 case(s) to do; the masks written are kept, but the same "
            "command (--overwrite) predicts every case again") in err


def test_the_output_folder_taken_in_by_a_shell_pattern_is_not_read_as_scans(
        tiny_run, tmp_path, capsys):
    # `--input scans/* --output scans/pred`: once the first run made scans/pred, the same
    # command took its masks for scans and was refused (clashing names): it could not go on
    from medseg.cli import main

    scans = tmp_path / "scans"
    for seed in range(2):
        _scan(scans / f"case{seed}.nii.gz", seed)
    out = scans / "pred"

    def command() -> list[str]:  # what the shell makes of scans/*
        return ["predict", "--model", str(tiny_run), "--device", "cpu", "--output", str(out),
                "--input", *sorted(str(p) for p in scans.iterdir())]

    assert main(command()) == 0
    (out / "case1.nii.gz").unlink()  # as if stopped before it
    capsys.readouterr()
    assert main(command()) == 0
    captured = capsys.readouterr()
    assert "predicted 1 of 2 cases" in captured.out and "skipped 1 existing" in captured.out
    assert (f"1 input(s) in {out} (case0.nii.gz, ...) are the --output folder's masks"
            in captured.err)
    # given alone, it is refused as before
    assert main(["predict", "--model", str(tiny_run), "--device", "cpu", "--output", str(out),
                 "--input", str(out)]) == 2
    # scans of their own in the output folder are no masks: refused as before
    _scan(out / "other.nii.gz", 5)
    assert main(command()) == 2


def test_a_step_far_under_one_voxel_gives_one_window_per_voxel_at_once():
    # --step 1e-8 (accepted: above 0) listed a billion starts per axis for a few distinct
    # ones, minutes per case; 1e-320 made the count infinite and stopped the batch
    import time

    from medseg.inference import window_starts

    started = time.monotonic()
    for step in (1e-8, 1e-320, 5e-324):
        assert window_starts(40, 32, step) == list(range(9))
    assert time.monotonic() - started < 1.0
    assert window_starts(40, 32, 0.001) == list(range(9))
    assert window_starts(96, 32, 0.5) == [0, 16, 32, 48, 64]


def test_failed_cases_do_not_keep_their_images_alive_to_the_end_of_the_batch(
        tiny_run, tmp_path, monkeypatch):
    # each failure kept its exception, and through its traceback the frames of the
    # prediction that failed with every array in them (the case's image, the probability
    # buffers): a batch where large cases fail (GPU out of memory) held one set per failure
    # until its end, so that the cases after them failed for want of memory too
    import gc
    import weakref

    import torch

    import medseg.predict

    alive = []

    def out_of_memory(predictor, case, config):
        buffers = torch.zeros(4, *case.image.shape[1:])  # noqa: F841 -- held by the frame
        alive.append(weakref.ref(case))
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(medseg.predict, "predict_prepared", out_of_memory)
    scans = [_scan(tmp_path / "scans" / f"case{seed}.nii.gz", seed) for seed in range(3)]
    results = predict_paths(load_predictor(tiny_run, device="cpu"), scans, tmp_path / "out",
                            PredictConfig())
    assert all("CUDA out of memory" in r.error for r in results)
    gc.collect()
    assert [ref() for ref in alive] == [None, None, None]
    assert all(r.exception.__traceback__ is not None for r in results)  # --debug prints it


def test_masks_that_could_not_be_written_are_not_held_while_the_batch_goes_on(
        tiny_run, tmp_path, monkeypatch):
    # a full disk fails every write, and each failed write's exception, kept until the
    # batch's end, held the frames of the writing with the case's mask in them: hundreds of
    # masks of a large CT piled up in memory
    import gc
    import weakref

    import medseg.predict
    from medseg.errors import MedsegError

    class Held:  # stands for the mask in the writing's frames
        pass

    written, still_held = [], []
    predict_prepared = medseg.predict.predict_prepared

    def full_disk(mask, geometry, target):
        held = Held()
        written.append(weakref.ref(held))
        raise MedsegError("cannot write (No space left on device)", target)

    def predict_and_look(predictor, case, config):
        gc.collect()
        # the write two cases back has ended: the writer was waited for since
        still_held.extend(ref() is not None for ref in written[:-1])
        return predict_prepared(predictor, case, config)

    monkeypatch.setattr(medseg.predict, "write_mask", full_disk)
    monkeypatch.setattr(medseg.predict, "predict_prepared", predict_and_look)
    scans = [_scan(tmp_path / "scans" / f"case{seed}.nii.gz", seed) for seed in range(4)]
    results = predict_paths(load_predictor(tiny_run, device="cpu"), scans, tmp_path / "out",
                            PredictConfig())
    assert all("No space left" in r.error for r in results)
    assert still_held and not any(still_held)


def test_a_case_out_of_memory_in_numpy_fails_alone(tiny_run, tmp_path, monkeypatch, capsys):
    # numpy's "Unable to allocate" (MemoryError) while a large case's mask was put back on its
    # grid or post-processed stopped the whole batch (torch's out of memory, a RuntimeError,
    # failed the case alone); after it, no case was predicted and no summary printed
    import medseg.predict
    from medseg.cli import main

    predict_prepared = medseg.predict.predict_prepared
    postprocess = medseg.predict.postprocess

    def large_case(predictor, case, config):
        if case.geometry.shape[0] == 64:
            np.empty(2**62, np.uint8)  # numpy's own MemoryError
        return predict_prepared(predictor, case, config)

    def large_mask(mask, *args):
        if mask.shape[1] == 64:
            np.empty(2**62, np.uint8)
        return postprocess(mask, *args)

    monkeypatch.setattr(medseg.predict, "predict_prepared", large_case)
    monkeypatch.setattr(medseg.predict, "postprocess", large_mask)
    scans = tmp_path / "scans"
    _scan(scans / "a.nii.gz", 0)
    _scan(scans / "c.nii.gz", 2)
    for name, shape in (("b.nii.gz", (64, 32, 24)), ("b2.nii.gz", (32, 64, 24))):
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.diag([*SMALL_SPACING, 1.0])),
                 scans / name)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_run), "--device", "cpu", "--input", str(scans),
                 "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert "predicted 2 of 4 cases" in captured.out and "failed 2" in captured.out
    assert "b.nii.gz: Unable to allocate" in captured.err
    assert "b2.nii.gz: Unable to allocate" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz"]
