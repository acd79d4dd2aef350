"""Prediction at scale: bounded memory with many classes, batches with a corrupt case, and a
process killed while writing."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SHAPE, SMALL_SPACING

from medseg.cli import main
from medseg.config import Workflow, save_workflow
from medseg.errors import MedsegError
from medseg.model import create_model, save_weights
from medseg.phantoms import make_many_structure_ct, make_phantom
from medseg.plan import Plan, save_plan

MANY_CLASSES = 42
MID_SIZE = (128, 128, 400)


@pytest.fixture(scope="module")
def many_class_run(tmp_path_factory):
    """A 42-class model with untrained weights: enough to measure memory, not accuracy."""
    run = tmp_path_factory.mktemp("many_class_run")
    plan = Plan(target_spacing=[1.0, 1.0, 1.0], patch_size=[64, 64, 64], batch_size=2,
                kernels=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                filters=[4, 8, 16], deep_supervision=False, in_channels=1,
                num_classes=MANY_CLASSES,
                labels={k: f"structure_{k}" for k in range(MANY_CLASSES)}, modalities=["CT"],
                normalization=[{"scheme": "ct", "clip": [-1000.0, 1200.0], "mean": 100.0,
                                "std": 400.0}],
                median_shape=list(MID_SIZE))
    save_plan(plan, run / "plan.json")
    save_workflow(Workflow(), run / "workflow.yaml")
    save_weights(create_model(plan), run / "fold_0" / "checkpoints" / "best.safetensors")
    return run


MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from medseg.config import PredictConfig
    from medseg.predict import load_predictor, predict_paths

    predictor = load_predictor(sys.argv[1])
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    before = rss()
    results = predict_paths(predictor, [Path(sys.argv[2])], Path(sys.argv[3]), PredictConfig())
    assert results[0].error is None, results[0].error
    # VmHWM, not ru_maxrss: that one keeps the parent's (pytest's) high-water mark
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024
    print(json.dumps({"before_mb": before, "peak_mb": peak}))
""")


def test_many_classes_are_predicted_in_bounded_memory(many_class_run, tmp_path):
    """42 classes on 128 x 128 x 400 voxels: the classes x volume float32 array alone would
    be 1050 MB (MONAI's sliding window output plus its softmax and Invertd copies: ~3 GB);
    the streamed prediction, whose class scores span one patch depth (64 of the 400
    slices), must stay well below one such array. (At 192 x 192 x 160, where the float32
    buffer of 64 slices is 40 % of the array, the growth was 0.94-1.03 GB against a 1 GB
    bound: the test failed by chance.)"""
    case = make_many_structure_ct(3, MID_SIZE, (1.0, 1.0, 1.0))
    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(case.image, case.affine), source)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(many_class_run), str(source),
                             str(tmp_path / "out")], capture_output=True, encoding="utf-8",
                            errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    growth = figures["peak_mb"] - figures["before_mb"]
    class_array_mb = MANY_CLASSES * int(np.prod(MID_SIZE)) * 4 / 2**20
    assert growth < 0.8 * class_array_mb, figures  # measured: 0.68
    mask = nib.load(tmp_path / "out" / "ct.nii.gz")
    assert mask.shape == MID_SIZE
    np.testing.assert_allclose(mask.affine, case.affine)


@pytest.fixture()
def three_cases(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, seed in (("a", 1), ("c", 2)):
        phantom = make_phantom(seed, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine),
                 folder / f"{name}.nii.gz")
    (folder / "b.nii.gz").write_bytes(b"\x1f\x8b corrupt")
    return folder


def test_one_corrupt_case_among_three(trained_run, three_cases, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "--model", str(trained_run), "--input", str(three_cases),
            "--output", str(out)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "b.nii.gz" in captured.err
    assert "predicted 2 of 3 cases" in captured.out and "failed 1" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz"]
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert main(args) == 1  # the corrupt case still fails; the other two are not redone
    captured = capsys.readouterr()
    assert "skipped 2 existing" in captured.out and "failed 1" in captured.out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    (out / "c.nii.gz").write_bytes(b"")  # emptied by a copy cut short: no finished mask
    assert main(args) == 1
    assert "predicted 1 of 3 cases" in capsys.readouterr().out
    assert (out / "c.nii.gz").stat().st_size > 0
    # listed again at the end; a mask an earlier run left for it is said to be stale
    assert f"failed: {three_cases / 'b.nii.gz'}" in captured.err
    assert "keep a mask" not in captured.err
    (out / "b.nii.gz").write_bytes((out / "a.nii.gz").read_bytes())
    assert main([*args, "--overwrite"]) == 1
    assert (f"medseg: note: 1 failed case(s) keep a mask in {out} from an earlier run, not "
            f"from this one: b.nii.gz") in capsys.readouterr().err
    (out / "b.nii.gz").write_bytes(b"")  # an empty file is no mask, stale or not
    assert main(args) == 1
    assert "keep a mask" not in capsys.readouterr().err


def test_a_stopped_batch_says_what_it_finished_and_how_to_go_on(trained_run, three_cases,
                                                                tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM printed only 'medseg: interrupted': how many masks were kept, and
    that the same command goes on, were left to guess."""
    import medseg.predict

    predict_prepared = medseg.predict.predict_prepared
    calls = []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict_prepared(*args, **kwargs)

    monkeypatch.setattr(medseg.predict, "predict_prepared", stop_at_the_third)
    (three_cases / "b.nii.gz").write_bytes((three_cases / "a.nii.gz").read_bytes())
    out = tmp_path / "out"
    args = ["predict", "--model", str(trained_run), "--input", str(three_cases),
            "--output", str(out)]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert ("medseg: note: stopped after 2 of the 3 case(s) to do; the masks written are "
            "kept, and the same command goes on with the rest") in err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    monkeypatch.setattr(medseg.predict, "predict_prepared", predict_prepared)
    assert main(args) == 0
    assert "skipped 2 existing" in capsys.readouterr().out


def test_inputs_whose_masks_would_share_a_name_are_refused(trained_run, three_cases,
                                                             tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.nrrd").write_bytes(b"never read")
    args = ["predict", "--model", str(trained_run), "--output", str(tmp_path / "out"),
            "--input", str(three_cases), str(other / "a.nrrd")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "a.nii.gz and " in err and "a.nrrd would both be written as a.nii.gz" in err
    assert err.endswith("give them names of their own, or predict them into different "
                        "--output folders")
    assert not (tmp_path / "out").exists()  # refused before any work
    for patient in ("p1", "p2"):  # PATIENT/CT: 'predict into different folders' for 200?
        (tmp_path / patient / "CT").mkdir(parents=True)
    args[-2:] = [str(tmp_path / "p1" / "CT"), str(tmp_path / "p2" / "CT")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith(
        "would both be written as CT.nii.gz; give their parent folders instead (p1, p2, ...): "
        "a DICOM folder is searched through its subfolders, and the mask is named after the "
        "folder given")


def test_the_clash_advice_names_the_parents_of_series_given_from_their_folder(
        tmp_path, monkeypatch):
    """`--input CT ../p2/CT` from p1: the advice read "give their parent folders instead
    (, p2, ...)", the current folder's name left out."""
    from medseg.predict import _refuse_clashing_outputs

    for patient in ("p1", "p2"):
        (tmp_path / patient / "CT").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "p1")
    with pytest.raises(MedsegError, match=r"CT.nii.gz; give their parent folders instead "
                                          r"\(p1, p2, \.\.\.\)"):
        _refuse_clashing_outputs([("CT.nii.gz", (Path("CT"),)),
                                  ("CT.nii.gz", (Path("../p2/CT"),))], tmp_path / "out")


def test_a_file_named_twice_is_predicted_once(trained_run, three_cases, tmp_path, capsys):
    args = ["predict", "--model", str(trained_run), "--output", str(tmp_path / "out"),
            "--input", str(three_cases / "a.nii.gz"), str(three_cases), "--shard", "0/1"]
    assert main(args) == 1  # b.nii.gz is corrupt
    assert "predicted 2 of 3 cases" in capsys.readouterr().out


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import nibabel
    from medseg.cli import main

    def stalled_save(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
            handle.flush()
        time.sleep(120)

    nibabel.save = stalled_save
    sys.exit(main(sys.argv[1:]))
""")


def test_a_process_killed_while_writing_leaves_no_partial_mask(trained_run, three_cases,
                                                                tmp_path):
    source = three_cases / "a.nii.gz"
    out = tmp_path / "out"
    args = ["predict", "--model", str(trained_run), "--input", str(source), "--output",
            str(out)]
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".a.nii.gz.*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(out.glob(".a.nii.gz.*")), "the writer never started"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "a.nii.gz").exists()

    assert main(args) == 0  # the rerun predicts the case and clears the dead temporary
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]
    assert nib.load(out / "a.nii.gz").shape == nib.load(source).shape


def test_large_cases_are_not_read_while_another_runs():
    """Two large CTs never overlap in memory: read-ahead only beside a small case."""
    import dataclasses

    import torch

    from medseg.predict import READ_AHEAD_BYTES, Predictor, PreparedCase, _read_ahead_fits

    plan = Plan(target_spacing=[1.5] * 3, patch_size=[96, 96, 96], batch_size=2,
                kernels=[[3, 3, 3]], strides=[[1, 1, 1]], filters=[8], deep_supervision=False,
                in_channels=1, num_classes=42, labels={0: "background"}, modalities=["CT"],
                normalization=[{"scheme": "zscore_nonzero"}], median_shape=[96, 96, 96])

    from medseg.io import Geometry

    def case(shape, input_shape):
        return PreparedCase(torch.zeros((1, *shape)), np.eye(4), Geometry(input_shape, np.eye(4)))

    def fits(case, plan):
        return _read_ahead_fits(case, Predictor(plan, (), (), torch.device("cpu")))

    ct_42_classes = case((273, 273, 400), (512, 512, 600))  # 0.8 mm, on a 1.5 mm grid
    assert not fits(ct_42_classes, plan)
    assert fits(case((60, 60, 60), (60, 60, 60)), plan)
    few_classes = dataclasses.replace(plan, num_classes=3)
    # a coarse 3-class network grid is small, but reading the next large CT beside this
    # one's float32 input grid peaked higher than one CT (1.97 against 1.71 GB)
    assert not fits(case((137, 137, 200), (512, 512, 600)), few_classes)
    assert fits(case((137, 137, 200), (256, 256, 200)), few_classes)
    assert READ_AHEAD_BYTES < 2**30


def test_reference_with_shards_is_refused_before_any_work(trained_run, three_cases, tmp_path,
                                                           capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["predict", "--model", str(trained_run), "--input", str(three_cases), "--output",
            str(out), "--reference", str(three_cases)]
    assert main([*args, "--shard", "0/2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "once every shard has finished" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's processes are shards too
    assert main(args) == 2 and not out.exists()


def test_every_case_failing_is_exit_2_with_a_reference_too(trained_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("x", "y"):
        (bad / f"{name}.nii.gz").write_text("not a volume", encoding="utf-8")
    assert main(["predict", "--model", str(trained_run), "--input", str(bad), "--output",
                 str(tmp_path / "out"), "--reference", str(bad)]) == 2


def test_a_case_failing_now_is_not_scored_with_its_earlier_mask(trained_run, three_cases,
                                                                 tmp_path, capsys):
    """--reference scored the mask an earlier run had left for a case that failed now, as
    this run's result."""
    references = tmp_path / "references"
    references.mkdir()
    for name, seed in (("a", 1), ("b", 3), ("c", 2)):
        phantom = make_phantom(seed, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        nib.save(nib.Nifti1Image(phantom.label.astype(np.uint8), phantom.affine),
                 references / f"{name}.nii.gz")
    good_b = make_phantom(3, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    corrupt = (three_cases / "b.nii.gz").read_bytes()
    nib.save(nib.Nifti1Image(good_b.image.astype(np.int16), good_b.affine),
             three_cases / "b.nii.gz")
    out = tmp_path / "out"
    args = ["predict", "--model", str(trained_run), "--input", str(three_cases),
            "--output", str(out)]
    assert main(args) == 0  # an earlier run: b's mask is written
    (three_cases / "b.nii.gz").write_bytes(corrupt)
    capsys.readouterr()
    assert main([*args, "--overwrite", "--reference", str(references)]) == 1
    scored = {line.split(",")[0] for line in
              (out / "evaluation" / "scores.csv").read_text(encoding="utf-8").splitlines()[1:]}
    assert scored == {"a", "c"}


def test_only_fold_k_folders_are_folds(trained_run, tmp_path, capsys):
    """A backup copy `fold_0.bak` was a second fold_0 in the ensemble, and resuming a run
    without folds.json died on int('0.bak')."""
    import shutil

    from medseg.predict import load_predictor

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copytree(run / "fold_0", run / "fold_0.bak")
    assert load_predictor(run).folds == ("fold_0",)
    (run / "folds.json").unlink()  # a run from before folds.json
    assert main(["train", "--resume", str(run)]) == 0
    assert "fold_0: finished already" in capsys.readouterr().out


def test_a_dangling_link_and_a_folder_in_the_way_are_failed_cases(trained_run, three_cases,
                                                                   tmp_path, capsys):
    """A link to an unmounted share inside an --input folder was silently left out, and a
    folder where a mask goes counted as that mask, already written."""
    (three_cases / "b.nii.gz").unlink()
    (three_cases / "d.nii.gz").symlink_to(tmp_path / "unmounted" / "d.nii.gz")
    out = tmp_path / "out"
    (out / "c.nii.gz").mkdir(parents=True)
    assert main(["predict", "--model", str(trained_run), "--input", str(three_cases),
                 "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert "predicted 1 of 3 cases" in captured.out
    assert f"{out / 'c.nii.gz'}: a folder (not a mask) lies where this case's mask goes" \
        in captured.err
    assert "d.nii.gz" in captured.err
    assert (out / "a.nii.gz").is_file() and (out / "c.nii.gz").is_dir()


def test_an_output_beside_a_linked_scan_is_refused(trained_run, three_cases, tmp_path,
                                                   capsys):
    """A folder of links to scans elsewhere, as its own --output: the masks would lie beside
    the links, scans to the next run on that folder (the check looked only at the folder
    the links lead to)."""
    links = tmp_path / "links"
    links.mkdir()
    (links / "x_0000.nii.gz").symlink_to(three_cases / "a.nii.gz")
    for output in (links, three_cases):  # where the link lies, and where it leads
        assert main(["predict", "--model", str(trained_run), "--input",
                     str(links / "x_0000.nii.gz"), "--output", str(output)]) == 2
        assert f"--output {output} is this scan's own folder" in capsys.readouterr().err
    assert sorted(p.name for p in links.iterdir()) == ["x_0000.nii.gz"]
    assert not (three_cases / "x.nii.gz").exists()
