"""Training under torchrun: the epoch sampler, and two gloo processes on the CPU that share
one run folder (stopped by the wall-clock budget, then resumed, both under torchrun)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_TRAINING, as_sets

from medseg.model import create_model, load_weights
from medseg.plan import load_plan
from medseg.train import EpochSampler, weights_digest


def rank_samples(n_cases: int, per_rank: int, world_size: int, seed: int,
                 epoch: int) -> list[list[int]]:
    samplers = [EpochSampler(n_cases, per_rank, seed, rank, world_size)
                for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize(("n_cases", "per_rank", "world_size"),
                         [(7, 6, 2), (10, 4, 3), (5, 5, 1), (4, 12, 4)])
def test_sampler_ranks_cover_every_case_in_disjoint_slots(n_cases, per_rank, world_size):
    for epoch in range(3):
        ranks = rank_samples(n_cases, per_rank, world_size, seed=11, epoch=epoch)
        assert all(len(samples) == per_rank for samples in ranks)
        # slot k of rank r is slot k * N + r of the epoch: the ranks share out the slots
        slots = EpochSampler(n_cases, per_rank, 11, 0, world_size).epoch_slots(epoch).tolist()
        interleaved = [ranks[i % world_size][i // world_size] for i in range(len(slots))]
        assert interleaved == slots
        # the first n_cases slots are one permutation: every case, once
        assert sorted(slots[:n_cases]) == list(range(n_cases))
        counts = [slots.count(case) for case in range(n_cases)]
        assert max(counts) - min(counts) <= 1


def test_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(9, 8, seed=5, rank=1, world_size=2)
    walked = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        walked.append(list(sampler))
    fresh = EpochSampler(9, 8, seed=5, rank=1, world_size=2)
    fresh.set_epoch(3)  # as after a resume: no earlier epoch drawn
    assert list(fresh) == walked[3] == list(sampler)
    assert len({tuple(samples) for samples in walked}) == 4
    other_seed = EpochSampler(9, 8, seed=6, rank=1, world_size=2)
    other_seed.set_epoch(3)
    assert list(other_seed) != walked[3]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "medseg.cli", "train", *args]
    return subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace",
                          cwd=REPO, env=env, timeout=180)


def run_files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")
            if p.is_file() and p.parent.name != "tensorboard"}


def test_two_processes_train_and_resume_one_run(tmp_path, phantom_dataset):
    run = tmp_path / "run"
    first = torchrun(str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                     *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING,
                               "train.max_minutes=0.00001", "train.ema_decay=0.9"]))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "max_minutes=1e-05 reached after 1 epoch" in first.stdout
    resumed = torchrun("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # one set of outputs: rank 1 wrote nothing of its own
    fold = run / "fold_0"
    assert run_files(run) == {
        "workflow.yaml", "plan.json", "splits.json", "folds.json", "fingerprint.json",
        "fold_0/metrics.jsonl", "fold_0/checkpoints/best.safetensors",
        "fold_0/checkpoints/last.safetensors", "fold_0/checkpoints/last_state.pt"}
    assert len(list((fold / "tensorboard").iterdir())) == 2  # one event file per launch
    lines = (fold / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert all("val_mean_dice" in json.loads(line) for line in lines)
    assert resumed.stdout.count("fold_0: best mean Dice") == 1

    # the ranks ended with the same weights, and rank 0 saved them
    digests = re.findall(r"weights identical on all 2 processes \(sha256 (\w+)\)",
                         resumed.stdout)
    state = torch.load(fold / "checkpoints" / "last_state.pt", weights_only=True)
    assert state["epoch"] == 1
    assert not any(name.startswith("module.") for name in state["model"])
    # the weight average followed the unwrapped network (no DDP "module." inside its own)
    assert state["ema"] and not any(name.startswith("module.module.") for name in state["ema"])
    assert digests == [weights_digest(state["model"])]
    load_weights(create_model(load_plan(run / "plan.json")),
                 fold / "checkpoints" / "best.safetensors")
