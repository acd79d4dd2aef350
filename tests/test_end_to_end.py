"""Train -> predict -> evaluate through the CLI on phantoms, and the demo's wiring."""

import json

import nibabel as nib
import numpy as np
import yaml
from helpers import REPO, TINY_TRAINING, as_sets

from medseg.cli import main


def test_run_folder_contents(trained_run):
    for name in ("workflow.yaml", "plan.json", "splits.json", "fingerprint.json",
                 "fold_0/metrics.jsonl", "fold_0/checkpoints/best.safetensors",
                 "fold_0/checkpoints/last.safetensors", "fold_0/checkpoints/last_state.pt"):
        assert (trained_run / name).is_file(), name
    assert list((trained_run / "fold_0" / "tensorboard").iterdir())
    splits = json.loads((trained_run / "splits.json").read_text(encoding="utf-8"))
    assert len(splits) == 5
    records = [json.loads(line) for line in
               (trained_run / "fold_0" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert set(records[-1]["val_dice"]) == {"liver", "kidney", "spine"}
    saved = yaml.safe_load((trained_run / "workflow.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["epochs"] == 2  # the resolved workflow, overrides applied


def test_train_predict_evaluate(trained_run, phantom_dataset, tmp_path, capsys):
    code = main(["predict", "--model", str(trained_run), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "pred")])
    assert code == 0
    for image in (phantom_dataset / "imagesTs").iterdir():
        mask = nib.load(tmp_path / "pred" / image.name)
        source = nib.load(image)
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref",
                 str(phantom_dataset / "labelsTs"), "--labels",
                 str(phantom_dataset / "dataset.json"), "--out", str(tmp_path / "eval")])
    assert code == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["structures"]) == {"liver", "kidney", "spine"}
    assert summary["structures"]["liver"]["dice"]["n"] == 2
    assert "liver" in capsys.readouterr().out


def test_demo_wiring_with_a_short_schedule(tmp_path, capsys):
    out = tmp_path / "demo"
    short = [item for item in TINY_TRAINING if not item.startswith("plan.patch_size")]
    code = main(["demo", "--out", str(out), *as_sets(short),
                 "--set", "plan.max_patch_voxels=32768"])
    assert code == 0
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        *(f"phantom_{k:03d}.nii.gz" for k in range(8, 12)), "statistics.csv"]
    assert (out / "evaluation" / "summary.json").is_file()
    assert "demo finished" in capsys.readouterr().out
    # a second run replaces the demo's own folder, and nothing else
    assert main(["demo", "--out", str(out), *as_sets(short),
                 "--set", "plan.max_patch_voxels=32768"]) == 0
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep", encoding="utf-8")
    assert main(["demo", "--out", str(stranger)]) == 2
    assert (stranger / "notes.txt").read_text(encoding="utf-8") == "keep"


def test_predict_with_reference_scores_at_once(trained_run, phantom_dataset, tmp_path):
    code = main(["predict", "--model", str(trained_run), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "pred"),
                 "--reference", str(phantom_dataset / "labelsTs")])
    assert code == 0
    summary_path = tmp_path / "pred" / "evaluation" / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert set(summary["structures"]) == {"liver", "kidney", "spine"}
    assert (tmp_path / "pred" / "evaluation" / "report.html").is_file()


def test_predict_with_reference_scores_this_batch_alone(trained_run, phantom_dataset,
                                                         tmp_path, capsys):
    """Every reference of the folder was scored: one without an input in the batch was a
    failed case (exit 1, the mean Dice halved), and so were masks of earlier runs."""
    import shutil

    images = sorted((phantom_dataset / "imagesTs").iterdir())
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(images[0], batch / images[0].name)
    out = tmp_path / "pred"
    args = ["predict", "--model", str(trained_run), "--input", str(batch), "--output",
            str(out)]
    assert main([*args, "--reference", str(tmp_path / "typo")]) == 2  # before any case
    assert capsys.readouterr().err.strip().endswith("typo: reference folder not found")
    assert not out.exists()
    assert main([*args, "--reference", str(phantom_dataset / "labelsTs")]) == 0
    summary = json.loads((out / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 1 and summary["failed_cases"] == []
    assert "of cases not in this batch were not scored" in capsys.readouterr().err


def test_predict_with_reference_draws_the_overlays_on_the_batch_scans(trained_run,
                                                                     phantom_dataset, tmp_path):
    """The montages of predict --reference were drawn on flat grey: the inputs predicted (here
    named as nnU-Net's channel 0) are the scans under them now, in a CT window."""
    import html
    import shutil

    batch = tmp_path / "batch"
    batch.mkdir()
    for image in sorted((phantom_dataset / "imagesTs").iterdir()):
        shutil.copy(image, batch / image.name.replace(".nii.gz", "_0000.nii.gz"))
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(trained_run), "--input", str(batch), "--output",
                 str(out), "--reference", str(phantom_dataset / "labelsTs")]) == 0
    page = html.unescape((out / "evaluation" / "report.html").read_text(encoding="utf-8"))
    drawn = sorted(line.split(" (")[0] for line in page.splitlines()
                   if line.startswith('<p class="meta">On the scan '))
    assert drawn == sorted(f'<p class="meta">On the scan {path}' for path in batch.iterdir())
    assert "(a CT in Hounsfield units: soft-tissue window, level 40 HU, width 400 HU)" in page
    assert "Drawn without its scan" not in page


def test_another_seed_holds_out_the_same_cases(trained_run, phantom_dataset, tmp_path):
    def splits_of(run, *extra):
        assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                     "--set", f"dataset.path={phantom_dataset}", *as_sets(TINY_TRAINING),
                     "--set", "train.epochs=1", *extra]) == 0
        return json.loads((run / "splits.json").read_text(encoding="utf-8"))

    reference = json.loads((trained_run / "splits.json").read_text(encoding="utf-8"))
    assert splits_of(tmp_path / "seed7", "--set", "train.seed=7") == reference
    assert splits_of(tmp_path / "split7", "--set", "train.split_seed=7") != reference
