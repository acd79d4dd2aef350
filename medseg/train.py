"""The training loop: patches from cached preprocessed cases, DynUNet, Dice+CE, periodic
sliding-window validation, best/last checkpoints, metrics.jsonl and TensorBoard.

Under torchrun (WORLD_SIZE > 1) the same loop runs in every process with
DistributedDataParallel: each rank trains on its own slots of the epoch's samples, the
validation cases are shared out between the ranks, and rank 0 alone writes files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from medseg.config import TrainConfig, Workflow, workflow_to_dict
from medseg.datasets import Case, Dataset
from medseg.errors import MedsegError, one_line
from medseg.fileio import atomic_path, atomic_write_text, json_safe
from medseg.model import (
    create_model,
    network_mismatch,
    save_weight_tensors,
    save_weights,
    supervised_outputs,
    weight_snapshot,
    weights_file_problem,
)
from medseg.plan import GB, Plan, memory_cache_bytes
from medseg.pretrained import describe as describe_init
from medseg.pretrained import load_init
from medseg.stopping import raise_if_stopped
from medseg.transforms import IMAGE, LABEL, augmentation, case_dict, preprocessing

BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
TRAIN_STATE = "last_state.pt"
FOLD_FOLDER = re.compile(r"fold_(0|[1-9][0-9]*)")  # as train names them: not fold_01
MEMORY_FORMAT = torch.channels_last_3d  # faster 3D convolutions on CPU and CUDA
# train and augment keys that leave a fold's course as it is: what a resume may set (the
# budget, the cache), and what splits.json or the state decide once the fold has started.
# Not train.num_workers: each loader worker draws its own augmentation stream, so another
# number of them is noted (NOTED_COURSE_KEYS), not refused: loader workers that crash (a
# container's small shared memory) must not end a run that fewer of them can finish
OFF_COURSE_KEYS = frozenset({"train.max_minutes", "train.cache", "train.fold", "train.folds",
                             "train.split_seed", "train.splits_file", "train.init"})
NOTED_COURSE_KEYS = frozenset({"train.num_workers"})


@dataclass(frozen=True)
class TrainResult:
    """Where the weights went and how good the best ones were on the validation cases."""

    fold_dir: Path
    best_epoch: int
    best_mean_dice: float | None
    best_dice: dict[str, float]
    epochs_run: int
    seconds: float


@dataclass(frozen=True)
class Ranks:
    """This process among the torchrun processes; rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_ranks() -> Ranks:
    """The ranks of the running process group; a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextmanager
def distributed_session() -> Iterator[Ranks]:
    """Under torchrun (WORLD_SIZE > 1 in the environment), a process group for the block:
    NCCL on CUDA (device cuda:LOCAL_RANK), gloo on the CPU; destroyed at the end, also on
    error. Otherwise nothing: a single process runs without a process group."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        yield Ranks()
        return
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield ranks
        # both ranks tear gloo down together: a rank that destroys its group while the
        # other still has a receive pending can abort at exit ("terminate called ...")
        dist.barrier()
    finally:
        dist.destroy_process_group()


class EpochSampler(torch.utils.data.Sampler[int]):
    """Case indices for one rank. Per epoch, permutations of the cases drawn from
    (seed, epoch) alone are chained to the samples all ranks need together, and rank r takes
    the slots r, r + N, r + 2N, ... (N ranks): in an epoch the ranks see every case (when
    they draw at least as many samples as there are cases) and never share a slot."""

    def __init__(self, n_cases: int, samples_per_rank: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n_cases = n_cases
        self.samples_per_rank = samples_per_rank
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_slots(self, epoch: int) -> torch.Tensor:
        """The case index of every sample slot of the epoch, all ranks together."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        total = self.samples_per_rank * self.world_size
        rounds = -(-total // self.n_cases)
        chained = [torch.randperm(self.n_cases, generator=generator) for _ in range(rounds)]
        return torch.cat(chained)[:total]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_slots(self.epoch)[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank


def select_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CPUs with native bf16 (AVX512-BF16/AMX), fp16 AMP on CUDA."""
    if requested == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if requested == "bf16" else torch.float16
    if requested == "bf16":
        return torch.bfloat16
    if requested == "auto" and (torch.cpu._is_avx512_bf16_supported()
                                or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return None


def train_fold(
    workflow: Workflow, dataset: Dataset, plan: Plan, split: dict, fold_dir: Path,
    device: torch.device | None = None, resume: bool = False,
) -> TrainResult:
    """Train one fold; writes checkpoints/, metrics.jsonl and tensorboard/ under fold_dir.

    With `resume`, continue from checkpoints/last_state.pt: weights, optimizer, scheduler,
    best score and epoch come back, and every random stream is reseeded per epoch from
    (seed, epoch), so a resumed run repeats the uninterrupted one (bit for bit in
    deterministic mode on the CPU). Under torchrun every rank runs this function; rank 0
    writes the files."""
    cfg = workflow.train
    ranks = current_ranks()
    device = device or _default_device(ranks)
    seed_everything(cfg)
    train_data, loader, val_data = _data(workflow, dataset, plan, split, ranks,
                                         fold_dir.parent, device)
    validating = bool(_val_names(split, workflow))
    run = _set_up(workflow, plan, fold_dir, device, ranks, resume)
    checkpoints = fold_dir / "checkpoints"
    metrics_path = fold_dir / "metrics.jsonl"
    writer = _open_fold_files(fold_dir, run.first_epoch, run.best_weights) if ranks.main else None
    net = _distributed(run.model, ranks, device)
    # the run's clock goes on from where the resumed run stopped (the budget is per session)
    elapsed_before = last_elapsed_seconds(metrics_path) if resume and ranks.main else 0.0
    started = time.monotonic()
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    epochs_run = run.first_epoch
    bar = tqdm(total=cfg.epochs * cfg.iterations_per_epoch,
               initial=run.first_epoch * cfg.iterations_per_epoch,
               desc=f"train {fold_dir.name}", unit="it", dynamic_ncols=True,
               disable=not ranks.main)
    try:  # closed on the way out of an interrupt too, before its message is printed
        for epoch in range(run.first_epoch, cfg.epochs):
            raise_if_stopped()
            epoch_start = time.monotonic()
            _reseed(cfg.seed, epoch, train_data, loader, ranks.rank)
            train_loss = _mean_over_ranks(
                _train_epoch(net, loader, run.optimizer, run.scheduler, run.scaler, run.loss_fn,
                             device, run.autocast_dtype, plan, bar, run.ema), ranks, device)
            epochs_run = epoch + 1
            record = {"epoch": epoch, "train_loss": train_loss,
                      "lr": run.optimizer.param_groups[0]["lr"],
                      "epoch_seconds": round(time.monotonic() - epoch_start, 2)}
            record.update(run.first_record)  # the first epoch's: the weights it started from
            run.first_record = {}
            # not at a budget stop between validations: that extra score could become the best,
            # and a resumed run would then not repeat the uninterrupted one
            if validating and ((epoch + 1) % cfg.val_every == 0 or epoch == cfg.epochs - 1):
                _validate_epoch(run, epoch, record, val_data, plan, workflow, device, ranks,
                                checkpoints)
                bar.set_postfix(loss=f"{train_loss:.3f}", dice=f"{record['val_mean_dice']:.3f}")
            # after validation, which the budget counts too; rank 0's clock decides for
            # everyone, so that no rank waits for one that stopped. The last epoch ends the
            # run whatever the clock says: that is no budget stop
            out_of_time = flag_from_main_rank(time.monotonic() > deadline, ranks, device) \
                and epoch + 1 < cfg.epochs
            # the whole run so far, validation included
            record["elapsed_seconds"] = round(elapsed_before + time.monotonic() - started, 2)
            if ranks.main:
                _log(writer, metrics_path, record)
                _save_epoch(run, checkpoints, epoch, ranks, budget_stop=out_of_time)
            if out_of_time:
                if ranks.main:
                    tqdm.write(f"train.max_minutes={cfg.max_minutes} reached after {epoch + 1} "
                               f"epoch{'s' if epoch else ''}")
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    best = run.best
    if not validating or best["mean"] == -math.inf:
        if ranks.main:
            _keep_last_weights_as_best(run.scored, checkpoints, cfg, validating, epochs_run)
        best["epoch"] = epochs_run - 1
    if ranks.distributed:  # also a barrier: every rank returns once rank 0 has written
        _check_replicas(run.model, ranks)
    return TrainResult(fold_dir, best["epoch"],
                       None if best["mean"] == -math.inf else best["mean"], best["dice"],
                       epochs_run, elapsed_before + time.monotonic() - started)


def seed_everything(cfg: TrainConfig) -> None:
    """Seed Python, NumPy, torch and MONAI from train.seed. MONAI's set_determinism also pins
    cuDNN to deterministic convolutions without autotuning, whatever it is asked: with
    train.deterministic false, cuDNN autotunes them (nnU-Net's cudnn.benchmark) instead."""
    from monai.utils import set_determinism

    set_determinism(seed=cfg.seed, use_deterministic_algorithms=cfg.deterministic or None)
    if not cfg.deterministic:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


@dataclass
class _FoldRun:
    """What a fold's training carries from epoch to epoch. `scored` is the module validated
    and saved (the weight average when there is one); `best_weights` is rank 0's copy of
    best.safetensors, kept in the state."""

    model: torch.nn.Module
    scored: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.nn.Module | None
    loss_fn: torch.nn.Module
    autocast_dtype: torch.dtype | None
    first_epoch: int = 0
    best: dict = field(
        default_factory=lambda: {"epoch": -1, "mean": -math.inf, "dice": {}})
    best_weights: dict | None = None
    # what the first epoch's metrics record adds: the train.init weights it started from
    first_record: dict = field(default_factory=dict)
    course: str = ""  # training_course's, saved in the state


def _set_up(workflow: Workflow, plan: Plan, fold_dir: Path, device: torch.device, ranks: Ranks,
            resume: bool) -> _FoldRun:
    """The network, optimizer, schedule, loss and precision; with `resume`, their saved
    state (every rank loads it); otherwise, with train.init, the network starts from those
    weights (heads aside), read before the weight average copies the network."""
    cfg = workflow.train
    model = create_model(plan).to(device, memory_format=MEMORY_FORMAT)
    init = load_init(model, plan, cfg.init, ranks.main) if cfg.init and not resume else None
    if init is not None and ranks.main:
        print(f"{fold_dir.name}: {describe_init(init)}")
    optimizer = _optimizer(model, workflow)
    total_steps = cfg.epochs * cfg.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg.schedule, total_steps))
    loss_fn = loss_function(plan, cfg)
    ema = weight_average(model, cfg.ema_decay)
    # read once: its settings decide the precision (and so the scaler) it is applied to
    state_path = fold_dir / "checkpoints" / TRAIN_STATE
    state = _resume_state(state_path) if resume else None
    autocast_dtype, scaler = _precision_and_scaler(cfg, device, _settings_of(state), ranks)
    run = _FoldRun(model, ema.module if ema is not None else model, optimizer, scheduler,
                   scaler, ema, loss_fn, autocast_dtype,
                   first_record={"init": init} if init is not None else {},
                   course=json.dumps(training_course(workflow)))
    if state is not None:
        run.first_epoch, run.best = _apply_state(state, state_path, model, optimizer,
                                                 scheduler, scaler, ema)
        run.best_weights = _saved_best_weights(state) if ranks.main else None
    return run


def _validate_epoch(run: _FoldRun, epoch: int, record: dict, val_data, plan: Plan,
                    workflow: Workflow, device: torch.device, ranks: Ranks,
                    checkpoints: Path) -> None:
    """Score the validation cases into `record`; a new best is kept (and saved by rank 0)."""
    dice, mean_dice = _validate(run.scored, val_data, plan, workflow, device, ranks,
                                run.autocast_dtype)
    record.update({"val_dice": dice, "val_mean_dice": mean_dice})
    if mean_dice > run.best["mean"]:  # never for NaN
        run.best = {"epoch": epoch, "mean": mean_dice, "dice": dice}
        if ranks.main:
            run.best_weights = weight_snapshot(run.scored)
            with checkpoint_writing(checkpoints / BEST_WEIGHTS):
                save_weight_tensors(run.best_weights, checkpoints / BEST_WEIGHTS)


def _save_epoch(run: _FoldRun, checkpoints: Path, epoch: int, ranks: Ranks,
                budget_stop: bool) -> None:
    """Rank 0's last weights and training state after each epoch."""
    with checkpoint_writing(checkpoints / LAST_WEIGHTS):
        save_weights(run.scored, checkpoints / LAST_WEIGHTS)
    with checkpoint_writing(checkpoints / TRAIN_STATE):
        _save_state(checkpoints / TRAIN_STATE, run.model, run.optimizer, run.scheduler,
                    run.scaler, epoch, run.best, run.ema,
                    settings={"precision": PRECISION_NAMES[run.autocast_dtype],
                              "world_size": ranks.world_size, "course": run.course},
                    best_weights=run.best_weights, budget_stop=budget_stop)


@contextmanager
def checkpoint_writing(path: Path) -> Iterator[None]:
    """A checkpoint that cannot be written (a full disk: torch says "unexpected pos 737344
    vs 737236", or errno 28) in one line naming it; the temporary file is gone already."""
    try:
        yield
    except OSError as exc:
        raise MedsegError(f"cannot write this checkpoint ({exc.strerror or exc})", path) \
            from exc
    except RuntimeError as exc:  # torch's zip writer reports a failed write so
        if "inline_container" not in str(exc) and "unexpected pos" not in str(exc):
            raise
        free = shutil.disk_usage(path.parent).free
        raise MedsegError(f"cannot write this checkpoint (the write failed; "
                          f"{free / 2**20:.0f} MB free on its disk)", path) from exc


def _precision_and_scaler(cfg: TrainConfig, device: torch.device, saved: dict, ranks: Ranks
                          ) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """The autocast dtype (a resumed run keeps the one it started with) and the gradient
    scaler, enabled for fp16 only: its gradients underflow without loss scaling, where bf16
    has fp32's range and needs none."""
    autocast_dtype = _resumed_precision(cfg.precision, device, saved.get("precision"), ranks)
    _note_world_size(saved.get("world_size"), ranks)
    if cfg.precision == "amp" and device.type != "cuda" and ranks.main:
        tqdm.write("medseg: note: train.precision amp is fp16 on CUDA only; this CPU trains "
                   "in fp32 (bf16 is train.precision bf16)")
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    return autocast_dtype, scaler


def _open_fold_files(fold_dir: Path, first_epoch: int, best_weights: dict | None):
    """Rank 0's files before the first epoch: the checkpoint folder, best.safetensors as the
    resumed state has it, metrics.jsonl cut to the epochs before `first_epoch`, and the
    TensorBoard writer (returned) that continues from there."""
    from torch.utils.tensorboard import SummaryWriter

    checkpoints = fold_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for stale in checkpoints.glob(".*.part*"):  # a process killed while writing left it
        stale.unlink(missing_ok=True)
    if best_weights is not None:
        # a run stopped between a new best.safetensors and its state left that file one
        # epoch ahead of the state; where the epoch then redone does not score the same
        # (CUDA is not bit-exact), the file would no longer be the state's best
        save_weight_tensors(best_weights, checkpoints / BEST_WEIGHTS)
    # from scratch, a fold killed before its first saved state starts a new curve
    _truncate_metrics(fold_dir / "metrics.jsonl", first_epoch)
    return SummaryWriter(str(fold_dir / "tensorboard"), purge_step=first_epoch)


def _validate(scored: torch.nn.Module, val_data, plan: Plan, workflow: Workflow,
              device: torch.device, ranks: Ranks, autocast_dtype: torch.dtype | None
              ) -> tuple[dict[str, float], float]:
    """Every rank scores its share of the validation cases and gets all the scores, so
    that each takes the same best: per-structure mean Dice, and their mean. In the run's
    precision (a resumed `auto` run's is the one it started with, not this machine's)."""
    dice = _mean_dice(_gather_in_case_order(
        _case_scores(scored, val_data, plan, workflow, device, autocast_dtype), ranks))
    return dice, _mean_over_structures(dice)


def _keep_last_weights_as_best(scored: torch.nn.Module, checkpoints: Path, cfg: TrainConfig,
                               validating: bool, epochs_run: int) -> None:
    """No validation cases, none with a structure to score, or a budget stop before the
    first validation: best.safetensors holds the last weights."""
    save_weights(scored, checkpoints / BEST_WEIGHTS)
    if validating and epochs_run < cfg.epochs:
        tqdm.write(f"medseg: note: stopped before the first validation (every "
                   f"{cfg.val_every} epochs): best.safetensors holds the last weights")


def loss_function(plan: Plan, cfg: TrainConfig) -> torch.nn.Module:
    """Dice + cross-entropy (Dice over the whole batch by default, nnU-Net's batch Dice),
    summed over the deep supervision heads with MONAI's halving weights when the plan has
    them. Voxels of the plan's ignore label are left out. DynUNet enlarges its low-resolution
    heads to full size (nearest neighbour) and each is scored against the full-size label;
    SegResNetDS's heads stay small, and DeepSupervisionLoss cuts the label down to each by
    nearest neighbour, which keeps ignored voxels ignored."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    from medseg.losses import DiceCELossIgnoring

    if plan.ignore_label is None:
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=cfg.batch_dice,
                             include_background=cfg.dice_include_background,
                             label_smoothing=cfg.label_smoothing)
    else:
        loss_fn = DiceCELossIgnoring(plan.ignore_label, batch=cfg.batch_dice,
                                     include_background=cfg.dice_include_background,
                                     label_smoothing=cfg.label_smoothing)
    return DeepSupervisionLoss(loss_fn) if plan.deep_supervision else loss_fn


def weight_average(model: torch.nn.Module, decay: float):
    """torch's exponential moving average of the weights (and buffers), or None when
    `decay` is 0. The average is what validation scores and the checkpoints hold."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and values, whatever their device or memory layout."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _default_device(ranks: Ranks) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", ranks.local_rank) if ranks.distributed else torch.device("cuda")


def _distributed(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel under torchrun, else the model itself."""
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # the 1x1x1 output convolutions can get gradients with other strides than their
    # channels_last weights along the size-1 axes: the same memory layout, nothing to fix
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def flag_from_main_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """Rank 0's value of `flag`, on every rank."""
    return bool(_int_from_main(int(flag), ranks, device))


def _int_from_main(number: int, ranks: Ranks, device: torch.device) -> int:
    """Rank 0's value of `number`, on every rank."""
    if not ranks.distributed:
        return number
    value = torch.tensor([number], dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return int(value.item())


def _mean_over_ranks(value: float, ranks: Ranks, device: torch.device) -> float:
    if not ranks.distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / ranks.world_size


def _gather_in_case_order(items: list, ranks: Ranks) -> list:
    """Every rank's items, on every rank, in case order (rank r holds cases r::world_size)."""
    if not ranks.distributed:
        return items
    shards: list = [None] * ranks.world_size
    dist.all_gather_object(shards, items)
    count = sum(len(shard) for shard in shards)
    return [shards[i % ranks.world_size][i // ranks.world_size] for i in range(count)]


def _check_replicas(model: torch.nn.Module, ranks: Ranks) -> None:
    """DDP keeps the copies of the weights equal; a difference would mean that rank 0's
    checkpoints are not what the other ranks trained, so it is an error."""
    digests: list = [None] * ranks.world_size
    dist.all_gather_object(digests, weights_digest(model.state_dict()))
    if len(set(digests)) > 1:
        raise RuntimeError(f"the weights differ between the ranks after training: {digests}")
    if ranks.main:
        tqdm.write(f"weights identical on all {ranks.world_size} processes "
                   f"(sha256 {digests[0]})")


def _val_names(split: dict, workflow: Workflow) -> list[str]:
    return split["val"][: workflow.train.val_max_cases]


def _data(workflow: Workflow, dataset: Dataset, plan: Plan, split: dict, ranks: Ranks,
          run_dir: Path | None = None, device: torch.device | None = None):
    """The training samples (the random part of the chain re-run every time), their loader,
    and this rank's share of the preprocessed validation cases (None when it has none):
    held in memory, or read from RUN_DIR/cache (`train.cache`; without a run folder, the
    cases are held in memory)."""
    device = device or torch.device("cpu")
    by_name = {case.name: case for case in dataset.cases}
    train_cases = [by_name[name] for name in split["train"]]
    val_cases = [by_name[name] for name in _val_names(split, workflow)]
    if run_dir is not None and _cache_mode(workflow, plan, run_dir, ranks, device) == "disk":
        return _disk_data(workflow, dataset, plan, train_cases, val_cases, ranks, run_dir,
                          device)
    return _memory_data(workflow, plan, train_cases, val_cases, ranks)


def _memory_data(workflow: Workflow, plan: Plan, train_cases: list[Case],
                 val_cases: list[Case], ranks: Ranks):
    """Every preprocessed case held in memory (MONAI's CacheDataset)."""
    from monai.data import CacheDataset

    cfg = workflow.train
    val_cases = val_cases[ranks.rank::ranks.world_size]
    chain = preprocessing(plan, with_label=True)
    train_transform = _compose(chain, augmentation(plan, workflow.augment,
                                                   cfg.foreground_fraction))
    # MONAI's own bar ("Loading dataset"): preprocessing a large CT collection takes minutes
    train_data = CacheDataset(_dicts(train_cases), train_transform, num_workers=cfg.num_workers,
                              progress=ranks.main)
    val_data = CacheDataset(_dicts(val_cases), chain, num_workers=cfg.num_workers,
                            progress=ranks.main) if val_cases else None
    return train_data, _loader(train_data, workflow, plan, ranks), val_data


def _disk_data(workflow: Workflow, dataset: Dataset, plan: Plan, train_cases: list[Case],
               val_cases: list[Case], ranks: Ranks, run_dir: Path, device: torch.device):
    """The cases in RUN_DIR/cache (built first where missing or stale): training reads a
    patch from a case's memory-mapped files, validation one case at a time."""
    from medseg.cache import (
        CACHE_FOLDER,
        DiskCache,
        DiskCases,
        DiskPatches,
        cache_key,
        patches_from_files,
        split_chain,
    )

    deterministic, random_part = split_chain(
        augmentation(plan, workflow.augment, workflow.train.foreground_fraction))
    pad_size = [p + 2 * workflow.augment.shift_voxels for p in plan.patch_size]
    cache = DiskCache(run_dir / CACHE_FOLDER, cache_key(plan, deterministic, pad_size),
                      dataset.root)
    needed = list({case.name: case for case in [*train_cases, *val_cases]}.values())
    _fill_disk_cache(cache, needed, dataset, plan, workflow, deterministic, pad_size, ranks,
                     device)
    train_data = DiskPatches(cache.cached(train_cases), patches_from_files(random_part))
    mine = val_cases[ranks.rank::ranks.world_size]
    val_data = DiskCases(cache.cached(mine)) if mine else None
    return train_data, _loader(train_data, workflow, plan, ranks), val_data


def _fill_disk_cache(cache, cases: list[Case], dataset: Dataset, plan: Plan,
                     workflow: Workflow, deterministic, pad_size: list[int], ranks: Ranks,
                     device: torch.device) -> None:
    """Rank 0 writes the cases the cache lacks, after checking the free space; the other
    ranks wait for it case by case (a barrier per case: one barrier for a build of hours
    would pass the process group's timeout), then all read the finished cache."""
    from medseg.cache import build_threads, case_preparer, disk_estimates, fingerprint_shapes
    from medseg.fileio import physical_memory

    missing: list[Case] = []
    shapes = None
    if ranks.main:
        cache.tidy()
        missing = cache.missing(cases)
        if missing:
            shapes = fingerprint_shapes(cache.folder.parent, plan)
            cache.refuse_without_space(disk_estimates(shapes, missing, list(dataset.cases),
                                                      plan, pad_size), len(missing))
    count = _int_from_main(len(missing), ranks, device)
    barrier = dist.barrier if ranks.distributed else None
    if ranks.main and missing:
        prepare = case_preparer(preprocessing(plan, with_label=True), deterministic,
                                plan.label_id_count)
        threads = build_threads(workflow.train.num_workers, shapes, plan.in_channels,
                                physical_memory())
        cache.build(missing, prepare, threads, barrier)
    elif not ranks.main:
        for _ in range(count):
            dist.barrier()


def _cache_mode(workflow: Workflow, plan: Plan, run_dir: Path, ranks: Ranks,
                device: torch.device) -> str:
    """`train.cache`, with `auto` resolved by rank 0 from the run's fingerprint (the other
    ranks may start before rank 0 has written it) for every rank."""
    from medseg.cache import CACHE_FOLDER, choose_cache, fingerprint_shapes
    from medseg.fileio import physical_memory

    if workflow.train.cache == "memory":
        refuse_memory_cache_beyond_memory(run_dir, plan)
    if workflow.train.cache != "auto":
        return workflow.train.cache
    disk = False
    if ranks.main:
        shapes = fingerprint_shapes(run_dir, plan)
        estimate = None if shapes is None else memory_cache_bytes(shapes, plan.in_channels)
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
        mode, why = choose_cache("auto", estimate, physical_memory(), processes)
        disk = mode == "disk"
        if disk:
            tqdm.write(f"medseg: train.cache auto chose disk: {why}; the preprocessed cases "
                       f"go to {run_dir / CACHE_FOLDER}")
    return "disk" if flag_from_main_rank(disk, ranks, device) else "memory"


def refuse_memory_cache_beyond_memory(run_dir: Path, plan: Plan) -> None:
    """`train.cache: memory` (a new run's, or one a resume set) for cases that would take
    more than twice this machine's memory: refused in one line rather than killed later."""
    from medseg.cache import fingerprint_shapes
    from medseg.fileio import physical_memory

    shapes, memory = fingerprint_shapes(run_dir, plan), physical_memory()
    if shapes is None or memory is None:
        return
    need = memory_cache_bytes(shapes, plan.in_channels)
    if need > 2 * memory:
        raise MedsegError(f"'train.cache' memory would hold the cases in about "
                          f"{need / GB:.3g} GB; this machine has {memory / GB:.3g} GB: set "
                          f"'train.cache' to disk (or auto)", run_dir / "workflow.yaml")


def _loader(train_data, workflow: Workflow, plan: Plan, ranks: Ranks):
    from monai.data import DataLoader

    cfg = workflow.train
    sampler = EpochSampler(len(train_data), cfg.iterations_per_epoch * plan.batch_size,
                           cfg.seed, ranks.rank, ranks.world_size)
    # workers are not persistent: each epoch's workers are seeded from the reseeded main
    # process, which makes an epoch's patches a function of (seed, epoch, rank) alone
    return DataLoader(train_data, batch_size=plan.batch_size, sampler=sampler,
                      num_workers=cfg.num_workers, persistent_workers=False)


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 100_003 + epoch + rank * 1_000_003) % 2**31


def _reseed(seed: int, epoch: int, train_data, loader, rank: int = 0) -> None:
    """Every random stream of an epoch from (seed, epoch): torch, NumPy, Python, the MONAI
    transforms (in-process loading) and the sampler. The augmentation streams also depend on
    the rank, so that the ranks do not draw the same crops and flips."""
    import random

    epoch_seed = _epoch_seed(seed, epoch, rank)
    torch.manual_seed(epoch_seed)
    np.random.seed(epoch_seed)
    random.seed(epoch_seed)
    train_data.transform.set_random_state(seed=epoch_seed)
    loader.sampler.set_epoch(epoch)


def _case_scores(model, val_data, plan: Plan, workflow: Workflow, device,
                 autocast_dtype: torch.dtype | None) -> list[dict]:
    """score_case's per-structure scores of each validation case (none for None)."""
    from medseg.metrics import leave_out_ignored, score_case

    # the named labels only: an id the dataset skips ({0, 1, 3}) has nothing to score
    labels = dict(plan.labels)
    per_case = []
    model.eval()
    with torch.no_grad():
        for item in val_data or []:
            logits = sliding_window_logits(model, _plain(item[IMAGE])[None], plan,
                                           workflow.predict.step, workflow.predict.sw_batch_size,
                                           autocast_dtype, device)
            prediction = logits.argmax(1)[0].numpy()
            reference = _plain(item[LABEL])[0].numpy().astype(np.int64)
            prediction, reference = leave_out_ignored(prediction, reference, plan.ignore_label)
            per_case.append(score_case(prediction, reference, labels,
                                       tuple(plan.target_spacing), surface=False))
    model.train()
    return per_case


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor without MONAI's metadata (the memory cache's cases are MetaTensors)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def _mean_dice(per_case: list[dict]) -> dict[str, float]:
    """Per structure, the mean Dice over the cases that have it in the reference or the
    prediction (NaN, as in `medseg evaluate`, when no case has it)."""
    return {name: _mean_of_scored([scores[name]["dice"] for scores in per_case])
            for name in per_case[0]}


def _mean_over_structures(dice: dict[str, float]) -> float:
    """The validation score that picks the best checkpoint: structures no case has are left
    out; NaN when there is none to score."""
    return _mean_of_scored(list(dice.values()))


def _mean_of_scored(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN (and no numpy warning) when none is."""
    scored = [v for v in values if not math.isnan(v)]
    return float(np.mean(scored)) if scored else math.nan


def sliding_window_logits(model, image: torch.Tensor, plan: Plan, step: float,
                          sw_batch_size: int, autocast_dtype, device) -> torch.Tensor:
    """Gaussian-weighted sliding window over a (1, C, ...) image; float32 logits on the CPU."""
    from monai.inferers import sliding_window_inference

    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        logits = sliding_window_inference(
            image.to(device), roi_size=plan.patch_size, sw_batch_size=sw_batch_size,
            predictor=model, overlap=1.0 - step, mode="gaussian", sw_device=device,
            device=torch.device("cpu"),
        )
    return logits.float()


def _train_epoch(model, loader, optimizer, scheduler, scaler, loss_fn, device, autocast_dtype,
                 plan: Plan, bar, ema=None) -> float:
    model.train()
    losses = []
    for batch in loader:
        raise_if_stopped()  # a Ctrl-C that Python dropped inside a finalizer
        image = batch[IMAGE].to(device, memory_format=MEMORY_FORMAT)
        label = batch[LABEL].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            output = model(image)
        if plan.deep_supervision:
            output = supervised_outputs(output)
        else:
            output = output.float()
        loss = loss_fn(output, label)
        scaler.scale(loss).backward()  # without fp16 the scaler passes everything through
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        if ema is not None:  # a DDP wrapper's parameters are its network's, in order
            ema.update_parameters(model)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
    return float(np.mean(losses))


def _optimizer(model, workflow: Workflow) -> torch.optim.Optimizer:
    cfg = workflow.train
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.99,
                           nesterov=True, weight_decay=cfg.weight_decay)


def _schedule(name: str, total_steps: int):
    if name == "poly":
        return lambda step: (1 - min(step, total_steps - 1) / total_steps) ** 0.9
    if name == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return lambda step: 1.0


def _compose(*chains):
    from monai.transforms import Compose

    return Compose([t for chain in chains for t in chain.transforms])


def _dicts(cases: list[Case]) -> list[dict]:
    return [case_dict(case.images, case.label) for case in cases]


def _log(writer, metrics_path: Path, record: dict) -> None:
    epoch = record["epoch"]
    writer.add_scalar("train/loss", record["train_loss"], epoch)
    writer.add_scalar("train/lr", record["lr"], epoch)
    scalars = {f"val_dice/{name}": value for name, value in record.get("val_dice", {}).items()}
    if "val_mean_dice" in record:
        scalars["val/mean_dice"] = record["val_mean_dice"]
    for tag, value in scalars.items():
        if not math.isnan(value):  # a structure no validation case has
            writer.add_scalar(tag, value, epoch)
    writer.flush()
    with metrics_path.open("a", encoding="utf-8") as handle:  # JSON has no NaN: null
        handle.write(json.dumps(json_safe(record)) + "\n")


def _save_state(path: Path, model, optimizer, scheduler, scaler, epoch: int, best: dict,
                ema=None, settings: dict | None = None,
                best_weights: dict[str, torch.Tensor] | None = None,
                budget_stop: bool = False) -> None:
    """Everything resume needs, in one atomic file of tensors and plain numbers (it loads
    with `weights_only=True`). `settings`: how the run trained (the precision `auto` chose,
    the number of processes), which a resume keeps or reports; `best_weights`: what
    best.safetensors holds, which a resume writes again; `budget_stop`: this epoch ends the
    session at its train.max_minutes (the fold is done as asked, not interrupted)."""
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "best": best, "settings": dict(settings or {}), "budget_stop": bool(budget_stop)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if best_weights is not None:
        state["best_weights"] = best_weights
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# what reading or applying a training state can raise: a damaged or foreign file (an empty
# one: EOFError; a pickle that is not a plain state: UnpicklingError) or a state that does
# not fit
STATE_ERRORS = (RuntimeError, KeyError, ValueError, TypeError, OSError, EOFError,
                pickle.UnpicklingError)


def _read_state(path: Path, mmap: bool = False) -> dict:
    """A saved training state, without pickle's code execution (weights_only)."""
    with warnings.catch_warnings():  # torch's notes on a foreign pickle: it is refused
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _load_state(path: Path, model, optimizer, scheduler, scaler, ema=None
                ) -> tuple[int, dict]:
    """Restore a training state; returns the next epoch and the best score so far."""
    return _apply_state(_resume_state(path), path, model, optimizer, scheduler, scaler, ema)


def check_resumable(fold_dir: Path, plan: Plan, workflow: Workflow | None = None) -> None:
    """Refuse, in one line, a fold whose training state cannot be read or holds another
    network than the plan's (a fold copied from another run), or that trained on other
    `workflow` keys than the run folder's workflow.yaml now gives (edited by hand): before a
    resume caches its dataset, rewrites workflow.yaml or trains an earlier fold.
    Memory-mapped: only the file's index is read."""
    path = fold_dir / "checkpoints" / TRAIN_STATE
    state = _resume_state(path, mmap=True)
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise MedsegError("cannot resume from this training state (it holds no network "
                          "weights)", path)
    problem = network_mismatch(create_model(plan), {
        name: tuple(tensor.shape) for name, tensor in weights.items()
        if isinstance(tensor, torch.Tensor)})
    if problem:
        raise MedsegError(f"cannot resume from this training state: its network is not "
                          f"plan.json's ({problem}; copied from another run?)", path)
    if workflow is not None:
        _refuse_other_course(_settings_of(state).get("course"), workflow, fold_dir)


def training_course(workflow: Workflow) -> dict:
    """The train and augment keys that a fold's training follows (less OFF_COURSE_KEYS)."""
    data = workflow_to_dict(workflow)
    return {f"{section}.{key}": value for section in ("train", "augment")
            for key, value in data[section].items()
            if f"{section}.{key}" not in OFF_COURSE_KEYS}


def check_course(run_dir: Path, workflow: Workflow) -> None:
    """Refuse a workflow that differs from the course the run's first fold with a readable
    training state followed (none: nothing to compare)."""
    for _, fold_dir in fold_folders(run_dir):
        try:
            state = _read_state(fold_dir / "checkpoints" / TRAIN_STATE, mmap=True)
        except STATE_ERRORS:
            continue
        if isinstance(state, dict) and "course" in _settings_of(state):
            _refuse_other_course(_settings_of(state)["course"], workflow, fold_dir)
            return


def _refuse_other_course(saved, workflow: Workflow, fold_dir: Path) -> None:
    """A workflow.yaml edited since the fold started (`train.epochs` raised by hand) would
    go on with a changed schedule, or say what the run never did (a learning rate the
    restored optimizer overrides). States from before the course was saved are not checked;
    keys only one side knows (another medseg version's) are left out."""
    try:
        started = json.loads(saved) if isinstance(saved, str) else None
    except ValueError:
        started = None
    if not isinstance(started, dict):
        return
    from medseg.runs import RESUME_OVERRIDES

    now = json.loads(json.dumps(training_course(workflow)))  # as saved: a tuple is a list
    for key, value in started.items():
        if key in now and now[key] != value and key in NOTED_COURSE_KEYS:
            _note_other_workers(key, now[key], value, fold_dir)
        elif key in now and now[key] != value:
            raise MedsegError(f"'{key}' is {now[key]!r} here, but {fold_dir.name} trained with "
                              f"{value!r}: a resumed run goes on as it began (of its keys, "
                              f"--set may change {', '.join(RESUME_OVERRIDES)}); put it back, "
                              f"or start a new run", fold_dir.parent / "workflow.yaml")


def _note_other_workers(key: str, now, started, fold_dir: Path) -> None:
    if current_ranks().main:
        tqdm.write(f"medseg: note: {fold_dir.name} trained with {key} {started!r} and goes on "
                   f"with {now!r}: each loader worker draws its own augmentation, so the curve "
                   f"will not repeat an uninterrupted run")


def _resume_state(path: Path, mmap: bool = False) -> dict:
    """The saved training state to resume from, refused in one line when unreadable."""
    if not path.is_file():
        raise MedsegError("no training state to resume from", path)
    try:
        with open(path, "rb") as handle:  # is_zipfile alone would call an unreadable file
            archive = zipfile.is_zipfile(handle)  # "not a checkpoint"
    except OSError as exc:
        raise MedsegError(f"cannot read this training state ({exc.strerror or exc})",
                          path) from exc
    if not archive:  # torch.save's archive; torch's own error (with mmap) advised saving
        # with _use_new_zipfile_serialization instead
        raise MedsegError("cannot resume from this training state (the file is empty, cut "
                          "short or not a torch checkpoint)", path)
    try:
        state = _read_state(path, mmap=mmap)
    except STATE_ERRORS as exc:
        raise MedsegError(f"cannot resume from this training state ({_state_problem(exc)})",
                          path) from exc
    if not isinstance(state, dict):
        raise MedsegError("cannot resume from this training state (not a medseg training "
                          "state)", path)
    return state


def _apply_state(state: dict, path: Path, model, optimizer, scheduler, scaler, ema=None
                 ) -> tuple[int, dict]:
    """Put a read state (`path`'s) into the training objects; returns the next epoch and the
    best score so far."""
    try:
        next_epoch, best = int(state["epoch"]) + 1, dict(state["best"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when the scaler was off; absent in older states
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if "ema" not in state:
                raise KeyError("it holds no weight average, but train.ema_decay is set")
            ema.load_state_dict(state["ema"])
    except STATE_ERRORS as exc:
        raise MedsegError(f"cannot resume from this training state ({_state_problem(exc)})",
                          path) from exc
    return next_epoch, best


def _saved_best_weights(state: dict) -> dict[str, torch.Tensor] | None:
    """best.safetensors as the state knows it (None in states from before it was kept)."""
    weights = state.get("best_weights")
    if isinstance(weights, dict) and all(isinstance(t, torch.Tensor) for t in weights.values()):
        return weights
    return None


def _state_problem(exc: BaseException) -> str:
    """Why a state could not be read, without torch's advice to load it with weights_only
    off (running a file's pickled code is not the fix for a damaged state)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a medseg training state, or a damaged one"
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    # the first sentence: torch goes on with advice about weights_only
    return one_line(str(exc)).split(". ")[0] or type(exc).__name__


def _settings_of(state: dict | None) -> dict:
    """How a saved run trained ({} without a state, or for a state from before settings)."""
    settings = (state or {}).get("settings", {})
    return dict(settings) if isinstance(settings, dict) else {}


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _resumed_precision(requested: str, device: torch.device, saved: str | None,
                       ranks: Ranks) -> torch.dtype | None:
    """The autocast dtype; a resumed `auto` run keeps what `auto` chose when it started (on
    another machine it could choose otherwise, and the curve would change course)."""
    chosen = select_precision(requested, device)
    by_name = {name: dtype for dtype, name in PRECISION_NAMES.items()}
    if requested != "auto" or saved not in by_name or by_name[saved] == chosen:
        return chosen
    if saved == "fp16" and device.type != "cuda":  # fp16 autocast is CUDA's
        if ranks.main:
            tqdm.write(f"medseg: note: this run trained in fp16 on CUDA; it goes on in "
                       f"{PRECISION_NAMES[chosen]} here, so its curve changes course")
        return chosen
    if ranks.main:
        tqdm.write(f"medseg: note: train.precision auto chose {saved} when this run started "
                   f"(here it would choose {PRECISION_NAMES[chosen]}); the run goes on in "
                   f"{saved}")
    return by_name[saved]


def _note_world_size(saved: int | None, ranks: Ranks) -> None:
    if saved is not None and int(saved) != ranks.world_size and ranks.main:
        tqdm.write(f"medseg: note: this run trained with {saved} process(es), and goes on with "
                   f"{ranks.world_size}: each step's batch is {ranks.world_size} x batch_size "
                   f"now, so the curve will not repeat an uninterrupted run")


def finished_fold(fold_dir: Path, epochs: int) -> TrainResult | None:
    """The result of a fold whose saved state already holds all `epochs` (None when it does
    not, or cannot be read: resuming then says why)."""
    try:
        state = _read_state(fold_dir / "checkpoints" / TRAIN_STATE, mmap=True)
        done, best = int(state["epoch"]) + 1, dict(state["best"])
    except STATE_ERRORS:
        return None
    if done < epochs:
        return None
    scored = best.get("mean", -math.inf) != -math.inf
    return TrainResult(fold_dir, int(best["epoch"]) if scored else done - 1,
                       float(best["mean"]) if scored else None, dict(best.get("dice", {})),
                       done, last_elapsed_seconds(fold_dir / "metrics.jsonl"))


def restore_best_weights(fold_dir: Path) -> str | None:
    """Write checkpoints/best.safetensors again from the training state's copy when the file
    is missing (deleted by hand) or cannot be opened (cut short by a full disk or a copy):
    `predict` cannot use the fold without it. Returns what was wrong with the file ("missing"
    or "unreadable (why)"), None when nothing was. Refused when the state holds no copy (a
    state from before the copy was kept)."""
    path = fold_dir / "checkpoints" / BEST_WEIGHTS
    problem = weights_file_problem(path) if path.is_file() else "missing"
    if problem is None:
        return None
    if problem != "missing":
        problem = f"unreadable ({problem})"
    state = _resume_state(fold_dir / "checkpoints" / TRAIN_STATE)
    weights = _saved_best_weights(state)
    last = fold_dir / "checkpoints" / LAST_WEIGHTS
    never_scored = dict(state.get("best", {})).get("mean", -math.inf) == -math.inf
    if weights is None and never_scored and last.is_file() and weights_file_problem(last) is None:
        # no validation scored: best.safetensors held the last weights
        with atomic_path(path) as tmp:
            shutil.copyfile(last, tmp)
        return problem
    if weights is None:
        raise MedsegError(f"{problem}, and the training state holds no copy of it: train the "
                          f"fold again", path)
    save_weight_tensors(weights, path)
    return problem


class SavedProgress(NamedTuple):
    """How far a fold's saved state got: epochs done, and whether its last session ended at
    its train.max_minutes (None: a state from before that was recorded)."""

    epochs_done: int
    budget_stop: bool | None


def saved_progress(fold_dir: Path) -> SavedProgress | None:
    """The fold's saved progress, read once (None when its state cannot be read)."""
    try:
        state = _read_state(fold_dir / "checkpoints" / TRAIN_STATE, mmap=True)
        if not isinstance(state, dict):  # a foreign file
            return None
        done, flag = int(state["epoch"]) + 1, state.get("budget_stop")
    except STATE_ERRORS:
        return None
    return SavedProgress(done, flag if isinstance(flag, bool) else None)


def fold_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's fold_K folders by K; other names (`fold_0.bak`, a copy) are not folds."""
    folds = [(int(match.group(1)), path) for path in run_dir.glob("fold_*")
             if path.is_dir() and (match := FOLD_FOLDER.fullmatch(path.name))]
    return sorted(folds)


def last_elapsed_seconds(path: Path) -> float:
    """`elapsed_seconds` of the last complete metrics.jsonl line, 0 without one."""
    return float(last_metrics_record(path).get("elapsed_seconds", 0.0))


def last_metrics_record(path: Path) -> dict:
    """The last complete metrics.jsonl line with an elapsed time ({} without one)."""
    if not path.is_file():
        return {}
    for line in reversed(_metrics_lines(path)):
        try:
            record = json.loads(line)
            float(record["elapsed_seconds"])
        except (ValueError, KeyError, TypeError):
            continue
        return record
    return {}


def last_epoch_recorded(path: Path) -> int | None:
    """The highest epoch of metrics.jsonl's whole lines (None without one)."""
    if not path.is_file():
        return None
    epochs = [_metrics_epoch(line) for line in _metrics_lines(path)]
    finite = [int(epoch) for epoch in epochs if epoch != math.inf]
    return max(finite, default=None)


def _metrics_lines(path: Path, all_lines: bool = False) -> list[str]:
    """metrics.jsonl's lines, less those holding bytes that are not UTF-8 (a damaged disk
    block), which are dropped like a half-written line (`all_lines`: every line, such bytes
    replaced by U+FFFD)."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    return lines if all_lines else [line for line in lines if "\ufffd" not in line]


def _metrics_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; a blank or half-written line (the process was
    killed while appending it) counts as after every epoch, so that it is dropped."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _truncate_metrics(path: Path, next_epoch: int) -> None:
    """Drop metric lines of epochs after the saved state (written just before a crash)."""
    if not path.is_file():
        return
    lines = _metrics_lines(path, all_lines=True)
    _note_damaged_lines(path, lines)
    kept = [line for line in lines if "\ufffd" not in line and _metrics_epoch(line) < next_epoch]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _note_damaged_lines(path: Path, lines: list[str]) -> None:
    """A half-written last line is what a kill leaves; an unreadable line before others is
    damage, and its epoch's record is lost: said, not dropped in silence."""
    damaged = sum(1 for line in lines[:-1] if line.strip() and
                  ("\ufffd" in line or math.isinf(_metrics_epoch(line))))
    if damaged:
        tqdm.write(f"medseg: note: {path}: {damaged} damaged line{'s' if damaged > 1 else ''} "
                   f"before the last could not be read and {'are' if damaged > 1 else 'is'} "
                   f"left out (their epochs' records are lost)", file=sys.stderr)
