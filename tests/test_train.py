"""Training loop guarantees: exact resume, clean wall-clock stop."""

import json

import torch
from helpers import REPO, TINY_TRAINING, as_sets

from medseg.cli import main

DETERMINISTIC = [*TINY_TRAINING, "train.deterministic=true", "train.num_workers=0",
                 "train.seed=3"]


def train(out, dataset, *extra):
    return main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={dataset}", *DETERMINISTIC, *extra])])


def final_state(run):
    return torch.load(run / "fold_0" / "checkpoints" / "last_state.pt", weights_only=True)


def test_resume_repeats_the_uninterrupted_run(tmp_path, phantom_dataset):
    assert train(tmp_path / "straight", phantom_dataset) == 0
    # the same run, stopped by the wall-clock budget after its first epoch, then resumed
    assert train(tmp_path / "split", phantom_dataset, "train.max_minutes=0.00001") == 0
    first = [json.loads(line) for line in
             (tmp_path / "split" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in first] == [0]  # stopped cleanly after one epoch
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0

    straight, split = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert straight["epoch"] == split["epoch"] == 1
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert straight["scheduler"]["last_epoch"] == split["scheduler"]["last_epoch"]
    curve = [json.loads(line) for line in
             (tmp_path / "split" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in
                 (tmp_path / "straight" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in curve] == [0, 1]
    assert [r["train_loss"] for r in curve] == [r["train_loss"] for r in reference]


def test_resume_refuses_extra_arguments(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--set", "train.epochs=3"]) == 2
    assert "--resume takes the run folder alone" in capsys.readouterr().err


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "workflow.yaml: workflow file not found" in err[0]
