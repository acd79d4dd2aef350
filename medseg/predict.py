"""Segment new volumes with a trained run: preprocess as the plan says, sliding window,
average folds (and mirrored copies), back to the input grid, argmax, write NIfTI.

Inputs are any volume `read_volume` reads (NIfTI, NRRD, MetaImage, DICOM series folders); the
mask lies on the input's exact grid (for DICOM, the series' grid in the same patient space)."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medseg.config import PredictConfig
from medseg.datasets import strip_image_suffix
from medseg.errors import MedsegError
from medseg.io import VOLUME_SUFFIXES, Volume, read_volume, write_mask
from medseg.model import create_model, load_weights
from medseg.plan import Plan, load_plan
from medseg.postprocess import postprocess
from medseg.train import BEST_WEIGHTS, select_precision, sliding_window_logits
from medseg.transforms import IMAGE, case_dict, preprocessing

CHANNEL_SUFFIX = re.compile(r"(.+)_(\d{4})")


@dataclass(frozen=True)
class Predictor:
    """A plan and the fold networks that share it."""

    plan: Plan
    models: tuple[torch.nn.Module, ...]
    folds: tuple[str, ...]
    device: torch.device


@dataclass(frozen=True)
class PredictionResult:
    input: Path
    output: Path | None
    seconds: float
    error: str | None = None
    skipped: bool = False


def load_predictor(run_dir: str | Path, folds: list[int] | None = None,
                   device: str | None = None) -> Predictor:
    """Read plan.json and the best weights of the chosen folds (all trained folds by default)."""
    run_dir = Path(run_dir)
    plan = load_plan(run_dir / "plan.json")
    fold_dirs = sorted(p for p in run_dir.glob("fold_*")
                       if (p / "checkpoints" / BEST_WEIGHTS).is_file())
    if folds is not None:
        wanted = {f"fold_{k}" for k in folds}
        missing = wanted - {p.name for p in fold_dirs}
        if missing:
            raise MedsegError(f"no trained weights for {', '.join(sorted(missing))}", run_dir)
        fold_dirs = [p for p in fold_dirs if p.name in wanted]
    if not fold_dirs:
        raise MedsegError("no trained fold with checkpoints/best.safetensors", run_dir)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = []
    for fold_dir in fold_dirs:
        model = load_weights(create_model(plan), fold_dir / "checkpoints" / BEST_WEIGHTS)
        models.append(model.to(torch_device).eval())
    return Predictor(plan, tuple(models), tuple(p.name for p in fold_dirs), torch_device)


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; a folder of volume files expands to them (sorted), any other folder is
    one DICOM series input."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir()
                           if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))
            paths.extend(found or [item])
        elif item.is_file():
            paths.append(item)
        else:
            raise MedsegError("input not found", item)
    return paths


def output_name(path: Path) -> str:
    """`case_0000.nii.gz` (nnU-Net channel 0) and `case.nii.gz` both give `case.nii.gz`; a
    DICOM folder `case/` or file `case.dcm` gives `case.nii.gz`."""
    stem = strip_image_suffix(path.name)
    if stem.lower().endswith(".dcm"):
        stem = stem[: -len(".dcm")]
    if stem.endswith("_0000"):
        stem = stem[: -len("_0000")]
    return f"{stem}.nii.gz"


def group_channels(paths: list[Path], channels: int) -> list[tuple[Path, ...]]:
    """One tuple of channel files per case. With several channels, files follow nnU-Net's
    naming (`CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ...) and every case needs all of them."""
    if channels == 1:
        return [(path,) for path in paths]
    cases: dict[str, dict[int, Path]] = {}
    for path in paths:
        match = CHANNEL_SUFFIX.fullmatch(strip_image_suffix(path.name))
        if match is None:
            raise MedsegError(f"the model takes {channels} channels: name the files "
                              f"CASE_0000 ... CASE_{channels - 1:04d}", path)
        cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    grouped = []
    for case, files in sorted(cases.items()):
        if sorted(files) != list(range(channels)):
            missing = sorted(set(range(channels)) - set(files))
            raise MedsegError(f"case '{case}' lacks channel(s) {missing} of {channels}",
                              next(iter(files.values())).parent)
        grouped.append(tuple(files[k] for k in range(channels)))
    return grouped


def predict_volume(predictor: Predictor, volume: Volume | Path | list[Volume],
                   config: PredictConfig) -> torch.Tensor:
    """Label map of one case (a read volume, a path to read, or one read volume per channel),
    on the grid of its (first) input volume (int64 tensor)."""
    from monai.transforms import Invertd

    plan = predictor.plan
    channels = volume if isinstance(volume, list) else [volume]
    if len(channels) != plan.in_channels:
        first = channels[0].path if isinstance(channels[0], Volume) else channels[0]
        raise MedsegError(f"the model expects {plan.in_channels} channel(s), got "
                          f"{len(channels)}", first)
    chain = preprocessing(plan, with_label=False)
    data = chain(case_dict(channels))
    image = data[IMAGE]
    probabilities = _ensemble_probabilities(predictor, image.as_tensor()[None], config)
    # Invert orientation and resampling on the class scores (not the labels), then argmax,
    # as nnU-Net does; MONAI's Invertd replays the recorded transforms backwards.
    inverted = Invertd(keys="pred", transform=chain, orig_keys=f"{IMAGE}_0",
                       nearest_interp=False)({"pred": _with_meta(probabilities[0], image),
                                              f"{IMAGE}_0": image})
    return inverted["pred"].as_tensor().argmax(0)


def predict_paths(predictor: Predictor, inputs: list[Path], output_dir: Path,
                  config: PredictConfig, overwrite: bool = False, series_uid: str | None = None,
                  resample_irregular: bool = False, shard: tuple[int, int] = (0, 1)
                  ) -> list[PredictionResult]:
    """Predict each input, writing `<case>.nii.gz` in output_dir; a failing case is reported
    and the batch goes on. `series_uid` and `resample_irregular` apply to DICOM inputs.
    `shard=(i, n)` takes every n-th case from the i-th, so n processes write each case once."""
    index, count = shard
    cases = group_channels(inputs, predictor.plan.in_channels)[index::count]
    _check_postprocess_labels(config, predictor.plan)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for files in tqdm(cases, desc="predict", unit="case", dynamic_ncols=True):
        path = files[0]
        target = output_dir / output_name(path)
        started = time.monotonic()
        if target.exists() and not overwrite:
            results.append(PredictionResult(path, target, 0.0, skipped=True))
            continue
        try:
            volumes = [read_volume(f, np.float32, series_uid, resample_irregular)
                       for f in files]
            mask = predict_volume(predictor, volumes, config).numpy()
            mask = postprocess(mask, volumes[0].geometry.spacing, config.largest_component,
                               config.min_component_ml)
            write_mask(mask, volumes[0].geometry, target)
            results.append(PredictionResult(path, target, time.monotonic() - started))
        except MedsegError as exc:
            tqdm.write(f"medseg: error: {exc}", file=sys.stderr)
            results.append(PredictionResult(path, None, time.monotonic() - started, str(exc)))
    return results


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' (0 <= I < N); without it, torchrun's RANK/WORLD_SIZE when set, else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise MedsegError(f"--shard must look like I/N, got {text!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise MedsegError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _check_postprocess_labels(config: PredictConfig, plan: Plan) -> None:
    known = set(plan.labels) - {0}
    for key, ids in (("predict.largest_component", config.largest_component),
                     ("predict.min_component_ml", list(config.min_component_ml))):
        unknown = sorted(set(ids) - known)
        if unknown:
            raise MedsegError(f"'{key}' names label(s) {unknown}; the model's labels are "
                              f"{sorted(known)}")


def _ensemble_probabilities(predictor: Predictor, image: torch.Tensor,
                            config: PredictConfig) -> torch.Tensor:
    """Mean softmax over folds and, with TTA, over the 8 mirrored copies."""
    flips = [()] + ([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if config.tta else [])
    autocast_dtype = select_precision(config.precision, predictor.device)
    total = None
    with torch.no_grad():
        for model in predictor.models:
            for axes in flips:
                flipped = torch.flip(image, axes) if axes else image
                logits = sliding_window_logits(model, flipped, predictor.plan, config.step,
                                               config.sw_batch_size, autocast_dtype,
                                               predictor.device)
                probabilities = torch.softmax(logits, dim=1)
                probabilities = torch.flip(probabilities, axes) if axes else probabilities
                total = probabilities if total is None else total + probabilities
    return total / (len(predictor.models) * len(flips))


def _with_meta(array: torch.Tensor, like):
    from monai.data import MetaTensor

    return MetaTensor(array, meta=dict(like.meta), applied_operations=list(
        like.applied_operations))
