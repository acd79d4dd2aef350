"""train.py's per-epoch sampling and seeding, the ranks' shares, the wall-clock budget, the
atomic training state and the learning-rate schedule: each test fails when the guarantee it
names is broken (a mutation audit found these unguarded)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, TINY_TRAINING

import medseg.train
from medseg.errors import MedsegError
from medseg.train import (
    EpochSampler,
    Ranks,
    _data,
    _epoch_seed,
    _reseed,
    _schedule,
    train_fold,
)
from medseg.transforms import IMAGE

# no validation (train.val_max_cases=0): the tests of the loop need its epochs alone
NO_VALIDATION = "train.val_max_cases=0"


def _workflow(dataset_path: Path, *extra: str):
    from medseg.config import load_workflow

    return load_workflow(REPO / "workflows" / "demo.yaml",
                         [f"dataset.path={dataset_path}", *TINY_TRAINING, *extra])


@pytest.fixture(scope="module")
def prepared(phantom_dataset):
    """The demo workflow at TINY_TRAINING on the phantoms, as `medseg train` prepares it:
    (workflow, dataset, plan, fold 0's split). The plan holds for any train.* override."""
    from medseg.datasets import load_dataset, make_splits
    from medseg.plan import fingerprint, make_plan

    workflow = _workflow(phantom_dataset)
    ds, cfg = workflow.dataset, workflow.train
    dataset = load_dataset(ds.path, ds.layout, ds.modality, ds.labels)
    splits = make_splits([case.name for case in dataset.cases], cfg.folds, cfg.split_seed,
                         source=dataset.root)
    plan = make_plan(fingerprint(dataset, seed=cfg.seed, progress=False), workflow.plan)
    return workflow, dataset, plan, splits[0]


def _loader_order(loader) -> list[int]:
    """The case indices the loader draws this epoch, in order."""
    return [index for batch in loader.batch_sampler for index in batch]


def _metrics(fold_dir: Path) -> list[dict]:
    lines = (fold_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_each_epoch_reseeds_the_loaders_case_order(prepared):
    """Mutation: `loader.sampler.set_epoch(epoch)` in _reseed replaced by `pass` (every
    epoch would draw epoch 0's case order)."""
    workflow, dataset, plan, split = prepared
    seed = workflow.train.seed
    train_data, loader, _ = _data(workflow, dataset, plan, split, Ranks())
    orders = {}
    for epoch in (0, 3, 1):  # any order of epochs, as after a resume
        _reseed(seed, epoch, train_data, loader)
        fresh = EpochSampler(len(train_data), len(loader.sampler), seed)
        fresh.set_epoch(epoch)
        orders[epoch] = _loader_order(loader)
        assert orders[epoch] == list(fresh), epoch
    assert orders[0] != orders[3]


def test_the_ranks_loaders_share_out_the_epochs_slots(prepared):
    """Mutation: _data builds the EpochSampler with rank 0 instead of `ranks.rank` (under
    DDP every rank would train the same slots)."""
    workflow, dataset, plan, split = prepared
    cfg = workflow.train
    n_cases = len(split["train"])
    per_rank_samples = cfg.iterations_per_epoch * plan.batch_size
    assert 2 * per_rank_samples >= n_cases  # else an epoch cannot see every case
    epoch = 2
    orders = []
    for rank in (0, 1):
        train_data, loader, _ = _data(workflow, dataset, plan, split, Ranks(rank, 2))
        assert len(train_data) == n_cases  # every rank caches all training cases
        _reseed(cfg.seed, epoch, train_data, loader, rank)
        orders.append(_loader_order(loader))
    assert [len(order) for order in orders] == [per_rank_samples] * 2
    # slot k of rank r is slot 2k + r of the epoch
    interleaved = [orders[i % 2][i // 2] for i in range(2 * per_rank_samples)]
    assert sorted(interleaved[:n_cases]) == list(range(n_cases))  # every case, once
    assert interleaved == EpochSampler(n_cases, per_rank_samples, cfg.seed, 0,
                                       2).epoch_slots(epoch).tolist()


def test_max_minutes_is_minutes_on_the_runs_clock(monkeypatch, tmp_path, prepared,
                                                   phantom_dataset):
    """Mutation: the deadline `started + max_minutes * 60` read as seconds (`+ max_minutes`).
    On a fake clock each epoch takes 25 s: a one-minute budget stops after the third epoch
    (75 s), neither after the first nor never."""
    _, dataset, plan, split = prepared
    workflow = _workflow(phantom_dataset, "train.epochs=6", "train.iterations_per_epoch=1",
                         "train.max_minutes=1", NO_VALIDATION)
    clock = SimpleNamespace(now=1000.0)
    # train.py's own clock only (tqdm, torch and the rest keep the real one)
    monkeypatch.setattr(medseg.train, "time", SimpleNamespace(monotonic=lambda: clock.now))
    train_epoch = medseg.train._train_epoch

    def epoch_of_25_seconds(*args, **kwargs):
        clock.now += 25.0
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(medseg.train, "_train_epoch", epoch_of_25_seconds)
    fold_dir = tmp_path / "fold_0"
    result = train_fold(workflow, dataset, plan, split, fold_dir)
    assert result.epochs_run == 3
    records = _metrics(fold_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["elapsed_seconds"] for r in records] == [25.0, 50.0, 75.0]
    state = torch.load(fold_dir / "checkpoints" / "last_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["budget_stop"] is True


def test_max_minutes_counts_the_validation_of_the_epoch(monkeypatch, tmp_path, prepared,
                                                        phantom_dataset):
    """The budget was checked before the epoch's validation: an epoch of 10 s whose
    validation takes 100 s passed a one-minute budget, yet the next epoch trained and
    validated too (200 s of a 60 s budget). The last epoch is no budget stop."""
    _, dataset, plan, split = prepared
    workflow = _workflow(phantom_dataset, "train.epochs=4", "train.iterations_per_epoch=1",
                         "train.max_minutes=1", "train.val_every=1")
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(medseg.train, "time", SimpleNamespace(monotonic=lambda: clock.now))
    train_epoch, validate_epoch = medseg.train._train_epoch, medseg.train._validate_epoch

    def epoch_of_10_seconds(*args, **kwargs):
        clock.now += 10.0
        return train_epoch(*args, **kwargs)

    def validation_of_100_seconds(*args, **kwargs):
        clock.now += 100.0
        return validate_epoch(*args, **kwargs)

    monkeypatch.setattr(medseg.train, "_train_epoch", epoch_of_10_seconds)
    monkeypatch.setattr(medseg.train, "_validate_epoch", validation_of_100_seconds)
    fold_dir = tmp_path / "fold_0"
    assert train_fold(workflow, dataset, plan, split, fold_dir).epochs_run == 1
    assert [r["elapsed_seconds"] for r in _metrics(fold_dir)] == [110.0]
    state = torch.load(fold_dir / "checkpoints" / "last_state.pt", weights_only=True)
    assert state["budget_stop"] is True

    one_epoch = _workflow(phantom_dataset, "train.epochs=1", "train.iterations_per_epoch=1",
                          "train.max_minutes=1", "train.val_every=1")
    last_dir = tmp_path / "one"
    assert train_fold(one_epoch, dataset, plan, split, last_dir).epochs_run == 1
    state = torch.load(last_dir / "checkpoints" / "last_state.pt", weights_only=True)
    assert state["budget_stop"] is False, "all its epochs ran: not stopped by the budget"


def test_a_full_disk_while_saving_a_checkpoint_names_the_file(monkeypatch, tmp_path,
                                                              prepared, phantom_dataset):
    """torch's zip writer reports a full disk as "unexpected pos 737344 vs 737236", a
    RuntimeError naming no file."""
    _, dataset, plan, split = prepared
    workflow = _workflow(phantom_dataset, "train.epochs=1", "train.iterations_per_epoch=1",
                         NO_VALIDATION)

    def full_disk(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                           "737344 vs 737236")

    monkeypatch.setattr(medseg.train.torch, "save", full_disk)
    fold_dir = tmp_path / "fold_0"
    with pytest.raises(MedsegError, match=r"last_state.pt: cannot write this checkpoint "
                                          r"\(the write failed; \d+ MB free on its disk\)"):
        train_fold(workflow, dataset, plan, split, fold_dir)
    assert not list((fold_dir / "checkpoints").glob(".*part*"))


def test_a_resume_removes_what_a_killed_save_left_behind(tmp_path, prepared,
                                                         phantom_dataset):
    """A SIGKILL while the state was written left .last_state.pt.XXXX.part.pt (tens of MB)
    that no resume removed, one more per kill."""
    _, dataset, plan, split = prepared
    workflow = _workflow(phantom_dataset, "train.epochs=2", "train.iterations_per_epoch=1",
                         NO_VALIDATION)
    fold_dir = tmp_path / "fold_0"
    train_fold(dataclasses.replace(workflow, train=dataclasses.replace(workflow.train,
                                                                       epochs=1)),
               dataset, plan, split, fold_dir)
    leftover = fold_dir / "checkpoints" / ".last_state.pt.51x_k9pl.part.pt"
    leftover.write_bytes(b"half a state")
    train_fold(workflow, dataset, plan, split, fold_dir, resume=True)
    assert not leftover.exists()


def test_a_state_save_that_fails_halfway_leaves_the_previous_state(monkeypatch, tmp_path,
                                                                    prepared, phantom_dataset):
    """Mutation: _save_state writes last_state.pt in place instead of through atomic_path (a
    crash or a full disk during the save would destroy the last good state)."""
    _, dataset, plan, split = prepared
    workflow = _workflow(phantom_dataset, "train.epochs=2", "train.iterations_per_epoch=1",
                         NO_VALIDATION)
    real_save = torch.save
    saves = []

    def disk_full_on_the_second_save(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 1:  # epoch 0's state
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        with open(f, "wb") as handle:  # half of epoch 1's state reaches the file
            handle.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_on_the_second_save)
    fold_dir = tmp_path / "fold_0"
    with pytest.raises(MedsegError, match=r"last_state.pt: cannot write this checkpoint "
                                          r"\(No space left on device\)"):
        train_fold(workflow, dataset, plan, split, fold_dir)
    assert len(saves) == 2
    checkpoints = fold_dir / "checkpoints"
    state = torch.load(checkpoints / "last_state.pt", weights_only=True)
    assert state["epoch"] == 0
    # no temporary left beside it
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.safetensors",
                                                             "last_state.pt"]


def test_schedule_values():
    """Mutations: the poly exponent 0.9 changed (3), the cosine curve changed, the constant
    schedule not constant."""
    total = 100
    poly = _schedule("poly", total)
    assert poly(0) == 1.0
    assert poly(50) == pytest.approx(0.5 ** 0.9)
    assert poly(75) == pytest.approx(0.25 ** 0.9)
    cosine = _schedule("cosine", total)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(50) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.0, abs=1e-12)
    constant = _schedule("constant", total)
    assert [constant(step) for step in (0, 50, 100)] == [1.0, 1.0, 1.0]


# the schedule's factor after `step` of `total` optimizer steps, written out independently
EXPECTED_FACTOR = {
    # poly stops one step short of 0 (the last step still learns)
    "poly": lambda step, total: (1 - min(step, total - 1) / total) ** 0.9,
    "cosine": lambda step, total: 0.5 * (1 + math.cos(math.pi * step / total)),
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED_FACTOR))
def test_the_logged_learning_rate_follows_the_schedule(tmp_path, prepared, phantom_dataset,
                                                       schedule):
    """Mutations: as test_schedule_values, seen where a user sees the rate (metrics.jsonl:
    the rate after each epoch's scheduler steps)."""
    _, dataset, plan, split = prepared
    epochs, per_epoch = 3, 2
    workflow = _workflow(phantom_dataset, f"train.schedule={schedule}", f"train.epochs={epochs}",
                         f"train.iterations_per_epoch={per_epoch}", NO_VALIDATION)
    fold_dir = tmp_path / "fold_0"
    train_fold(workflow, dataset, plan, split, fold_dir)
    total = epochs * per_epoch
    base = workflow.train.learning_rate
    expected = [base * EXPECTED_FACTOR[schedule]((epoch + 1) * per_epoch, total)
                for epoch in range(epochs)]
    assert [r["lr"] for r in _metrics(fold_dir)] == pytest.approx(expected, abs=1e-12)


def test_the_ranks_draw_their_own_patches_and_repeat_them(prepared):
    """Mutation: the augmentation seed does not depend on the rank (_epoch_seed without its
    rank term, or _reseed not passing the rank on): every rank would draw the same crops,
    flips and noise for a case."""
    workflow, dataset, plan, split = prepared
    seed = workflow.train.seed
    train_data, loader, _ = _data(workflow, dataset, plan, split, Ranks())

    def first_patch(rank: int) -> torch.Tensor:
        _reseed(seed, 1, train_data, loader, rank)
        item = train_data[0]  # the same case on every rank: only the random draws differ
        item = item[0] if isinstance(item, list) else item  # num_samples=1: a list of one
        return item[IMAGE].as_tensor() if hasattr(item[IMAGE], "as_tensor") else item[IMAGE]

    assert _epoch_seed(seed, 1, 0) != _epoch_seed(seed, 1, 1)
    rank0, rank1 = first_patch(0), first_patch(1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(first_patch(0), rank0)  # reproducible for a rank
    assert torch.equal(first_patch(1), rank1)


def test_train_fold_reseeds_each_epoch_with_its_rank(monkeypatch, tmp_path, prepared,
                                                     phantom_dataset):
    """Mutation: train_fold calls _reseed without `ranks.rank` (the default, rank 0, for
    every rank). Runs the loop as rank 1 of 2 without a process group: a Ranks that is not
    `distributed` leaves out the collective calls, which one process cannot make."""
    _, dataset, plan, split = prepared
    workflow = _workflow(phantom_dataset, "train.epochs=2", "train.iterations_per_epoch=1",
                         NO_VALIDATION)

    class SecondOfTwoAlone(Ranks):
        @property
        def distributed(self) -> bool:
            return False

    monkeypatch.setattr(medseg.train, "current_ranks", lambda: SecondOfTwoAlone(1, 2))
    reseed = medseg.train._reseed
    seen = []

    def recording_reseed(seed, epoch, train_data, loader, rank=0):
        seen.append((epoch, rank))
        return reseed(seed, epoch, train_data, loader, rank)

    monkeypatch.setattr(medseg.train, "_reseed", recording_reseed)
    fold_dir = tmp_path / "fold_0"
    result = train_fold(workflow, dataset, plan, split, fold_dir)
    assert result.epochs_run == 2
    assert seen == [(0, 1), (1, 1)]
    assert not fold_dir.exists()  # rank 1 writes nothing


def test_saved_progress_reads_epochs_and_budget_stop_and_tolerates_foreign_files(tmp_path):
    from medseg.train import TRAIN_STATE, SavedProgress, saved_progress

    checkpoints = tmp_path / "fold_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert saved_progress(tmp_path / "fold_0") is None  # no state at all
    torch.save({"epoch": 4, "budget_stop": True}, checkpoints / TRAIN_STATE)
    assert saved_progress(tmp_path / "fold_0") == SavedProgress(5, True)
    torch.save({"epoch": 0}, checkpoints / TRAIN_STATE)  # from before budget_stop was saved
    assert saved_progress(tmp_path / "fold_0") == SavedProgress(1, None)
    for foreign in ([1, 2], torch.zeros(3), {"budget_stop": False}):
        torch.save(foreign, checkpoints / TRAIN_STATE)
        assert saved_progress(tmp_path / "fold_0") is None
