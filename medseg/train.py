"""The training loop: patches from cached preprocessed cases, DynUNet, Dice+CE, periodic
sliding-window validation, best/last checkpoints, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medseg.config import Workflow
from medseg.datasets import Case, Dataset
from medseg.fileio import atomic_path
from medseg.model import create_model, save_weights
from medseg.plan import Plan
from medseg.transforms import IMAGE, LABEL, augmentation, case_dict, preprocessing

BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
TRAIN_STATE = "last_state.pt"


@dataclass(frozen=True)
class TrainResult:
    """Where the weights went and how good the best ones were on the validation cases."""

    fold_dir: Path
    best_epoch: int
    best_mean_dice: float | None
    best_dice: dict[str, float]
    epochs_run: int
    seconds: float


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
    device: torch.device | None = None,
) -> TrainResult:
    """Train one fold; writes checkpoints/, metrics.jsonl and tensorboard/ under fold_dir."""
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DeepSupervisionLoss, DiceCELoss
    from monai.utils import set_determinism
    from torch.utils.tensorboard import SummaryWriter

    cfg = workflow.train
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_determinism(seed=cfg.seed, use_deterministic_algorithms=cfg.deterministic or None)
    by_name = {case.name: case for case in dataset.cases}
    train_cases = [by_name[name] for name in split["train"]]
    val_cases = [by_name[name] for name in split["val"]][: cfg.val_max_cases]

    chain = preprocessing(plan, with_label=True)
    train_transform = _compose(chain, augmentation(plan, workflow.augment,
                                                   cfg.foreground_fraction))
    train_data = CacheDataset(_dicts(train_cases), train_transform, num_workers=cfg.num_workers,
                              progress=False)
    sampler = torch.utils.data.RandomSampler(
        train_data, replacement=True,
        num_samples=cfg.iterations_per_epoch * plan.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    loader = DataLoader(train_data, batch_size=plan.batch_size, sampler=sampler,
                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    val_data = CacheDataset(_dicts(val_cases), chain, num_workers=cfg.num_workers,
                            progress=False) if val_cases else None

    model = create_model(plan).to(device)
    optimizer = _optimizer(model, workflow)
    total_steps = cfg.epochs * cfg.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg.schedule, total_steps))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    if plan.deep_supervision:
        loss_fn = DeepSupervisionLoss(loss_fn)
    autocast_dtype = select_precision(cfg.precision, device)

    checkpoints = fold_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(fold_dir / "tensorboard"))
    metrics_path = fold_dir / "metrics.jsonl"
    started = time.monotonic()
    best_epoch, best_mean, best_dice = -1, -math.inf, {}
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    epochs_run = 0
    bar = tqdm(total=total_steps, desc=f"train {fold_dir.name}", unit="it", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        epoch_start = time.monotonic()
        train_loss = _train_epoch(model, loader, optimizer, scheduler, loss_fn, device,
                                  autocast_dtype, plan, bar)
        epochs_run = epoch + 1
        record = {"epoch": epoch, "train_loss": train_loss,
                  "lr": optimizer.param_groups[0]["lr"],
                  "epoch_seconds": round(time.monotonic() - epoch_start, 2),
                  "elapsed_seconds": round(time.monotonic() - started, 2)}
        out_of_time = time.monotonic() > deadline
        last_epoch = epoch == cfg.epochs - 1 or out_of_time
        if val_data is not None and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
            dice = validate(model, val_data, plan, workflow, device)
            mean_dice = float(np.mean(list(dice.values())))
            record.update({"val_dice": dice, "val_mean_dice": mean_dice})
            if mean_dice > best_mean:
                best_epoch, best_mean, best_dice = epoch, mean_dice, dice
                save_weights(model, checkpoints / BEST_WEIGHTS)
            bar.set_postfix(loss=f"{train_loss:.3f}", dice=f"{mean_dice:.3f}")
        _log(writer, metrics_path, record)
        save_weights(model, checkpoints / LAST_WEIGHTS)
        _save_state(checkpoints / TRAIN_STATE, optimizer, scheduler, epoch)
        if out_of_time:
            tqdm.write(f"train.max_minutes={cfg.max_minutes} reached after epoch {epoch + 1}")
            break
    bar.close()
    writer.close()
    if val_data is None:  # no validation cases: the last weights are the ones to keep
        save_weights(model, checkpoints / BEST_WEIGHTS)
        best_epoch = epochs_run - 1
    return TrainResult(fold_dir, best_epoch, None if best_mean == -math.inf else best_mean,
                       best_dice, epochs_run, time.monotonic() - started)


def validate(model, val_data, plan: Plan, workflow: Workflow, device) -> dict[str, float]:
    """Mean Dice per structure over the validation cases, in the preprocessed space."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    model.eval()
    with torch.no_grad():
        for item in val_data:
            logits = sliding_window_logits(model, item[IMAGE].as_tensor()[None], plan,
                                           workflow.predict.step, workflow.predict.sw_batch_size,
                                           select_precision(workflow.train.precision, device),
                                           device)
            prediction = one_hot(logits.argmax(1, keepdim=True), plan.num_classes)
            reference = one_hot(item[LABEL].as_tensor()[None].long(), plan.num_classes)
            metric(prediction, reference)
    model.train()
    scores = metric.aggregate().tolist()
    names = [plan.labels.get(k, f"label_{k}") for k in range(1, plan.num_classes)]
    return {name: float(score) for name, score in zip(names, scores, strict=True)}


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


def _train_epoch(model, loader, optimizer, scheduler, loss_fn, device, autocast_dtype,
                 plan: Plan, bar) -> float:
    model.train()
    losses = []
    for batch in loader:
        image, label = batch[IMAGE].to(device), batch[LABEL].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            output = model(image)
        if plan.deep_supervision:
            output = list(torch.unbind(output.float(), dim=1))
        else:
            output = output.float()
        loss = loss_fn(output, label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        optimizer.step()
        scheduler.step()
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
    for name, value in record.get("val_dice", {}).items():
        writer.add_scalar(f"val_dice/{name}", value, epoch)
    if "val_mean_dice" in record:
        writer.add_scalar("val/mean_dice", record["val_mean_dice"], epoch)
    writer.flush()
    with metrics_path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _save_state(path: Path, optimizer, scheduler, epoch: int) -> None:
    """Optimizer and scheduler state as plain tensors and numbers (loadable weights_only)."""
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
