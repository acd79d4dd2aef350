"""Case records from dataset layouts (MSD, nnU-Net v2 raw, folder pairs) and seeded folds."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import MedsegError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Case:
    """One labelled (or unlabelled) case: one image file per channel, at most one label file."""

    name: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """A collection of cases plus what it says about itself."""

    root: Path
    cases: tuple[Case, ...]
    labels: dict[int, str]
    modalities: tuple[str, ...]  # one per channel: "CT" or "MR"


def load_dataset(
    path: str | Path, layout: str = "auto", modality: str = "auto",
    labels: dict[int, str] | None = None,
) -> Dataset:
    """Read a dataset description; every listed file must exist."""
    root = Path(path)
    if root.is_file() and root.name == "dataset.json":
        root = root.parent
    if not root.is_dir():
        raise MedsegError("dataset folder not found", root)
    layout = _detect_layout(root) if layout == "auto" else layout
    if layout == "msd":
        dataset = _load_msd(root)
    elif layout == "nnunet":
        dataset = _load_nnunet(root)
    elif layout == "folders":
        dataset = _load_folder_pairs(root)
    else:
        raise MedsegError(f"unknown dataset layout '{layout}'", root)
    if labels:
        dataset = Dataset(dataset.root, dataset.cases, dict(labels), dataset.modalities)
    if modality != "auto":
        dataset = Dataset(dataset.root, dataset.cases, dataset.labels,
                          tuple(modality for _ in dataset.modalities))
    if not dataset.cases:
        raise MedsegError("the dataset lists no training cases", root)
    return dataset


def label_names_from_json(path: str | Path) -> dict[int, str]:
    """Label id -> name from an MSD or nnU-Net dataset.json, or a plain labels.json."""
    path = Path(path)
    data = _read_json(path)
    table = data.get("labels", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise MedsegError("no 'labels' mapping found", path)
    try:
        if all(str(key).lstrip("-").isdigit() for key in table):
            return {int(key): str(name) for key, name in table.items()}
        return {int(value): str(name) for name, value in table.items()}  # nnU-Net: name -> id
    except (TypeError, ValueError) as exc:
        raise MedsegError("label ids must be integers", path) from exc


def make_splits(case_names: list[str], n_folds: int = 5, seed: int = 0) -> list[dict]:
    """K seeded folds, as nnU-Net's splits_final.json: [{'train': [...], 'val': [...]}]."""
    if n_folds < 2:
        raise MedsegError(f"train.folds must be at least 2, got {n_folds}")
    if len(case_names) < n_folds:
        raise MedsegError(f"{len(case_names)} cases cannot make {n_folds} folds")
    names = sorted(case_names)
    random.Random(seed).shuffle(names)
    folds = [sorted(names[k::n_folds]) for k in range(n_folds)]
    return [
        {"train": sorted(n for j, f in enumerate(folds) if j != k for n in f), "val": folds[k]}
        for k in range(n_folds)
    ]


def strip_image_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _detect_layout(root: Path) -> str:
    description = root / "dataset.json"
    if description.is_file():
        data = _read_json(description)
        return "msd" if isinstance(data, dict) and "training" in data else "nnunet"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "folders"
    raise MedsegError("no dataset.json and no images/ + labels/ folders", root)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MedsegError("file not found", path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedsegError(f"not valid JSON ({exc})", path) from exc


def _modality_name(text: str) -> str:
    return "CT" if str(text).strip().upper() == "CT" else "MR"


def _existing(path: Path, description: Path) -> Path:
    if not path.is_file():
        raise MedsegError(f"listed in {description.name} but missing: {path}", description)
    return path


def _load_msd(root: Path) -> Dataset:
    description = root / "dataset.json"
    data = _read_json(description)
    entries = data.get("training")
    if not isinstance(entries, list):
        raise MedsegError("'training' must be a list of {image, label}", description)
    cases = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise MedsegError(f"training entry {entry!r} needs 'image' and 'label'", description)
        image = _existing((root / entry["image"]).resolve(), description)
        label = _existing((root / entry["label"]).resolve(), description)
        cases.append(Case(strip_image_suffix(image.name), (image,), label))
    modality = data.get("modality", {"0": "MR"})
    modalities = tuple(_modality_name(modality[k]) for k in sorted(modality, key=int))
    return Dataset(root, tuple(cases), label_names_from_json(description), modalities)


def _load_nnunet(root: Path) -> Dataset:
    description = root / "dataset.json"
    data = _read_json(description)
    channels = data.get("channel_names") or data.get("modality")
    if not isinstance(channels, dict):
        raise MedsegError("'channel_names' is missing", description)
    ending = data.get("file_ending", ".nii.gz")
    cases = []
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        name = label.name[: -len(ending)]
        images = tuple(
            _existing(root / "imagesTr" / f"{name}_{int(k):04d}{ending}", description)
            for k in sorted(channels, key=int)
        )
        cases.append(Case(name, images, label))
    modalities = tuple(_modality_name(channels[k]) for k in sorted(channels, key=int))
    return Dataset(root, tuple(cases), label_names_from_json(description), modalities)


def _load_folder_pairs(root: Path) -> Dataset:
    cases = []
    for image in sorted((root / "images").iterdir()):
        if not image.name.endswith(IMAGE_SUFFIXES):
            continue
        label = root / "labels" / image.name
        if not label.is_file():
            raise MedsegError(f"no label with the same name in {root / 'labels'}", image)
        cases.append(Case(strip_image_suffix(image.name), (image,), label))
    labels_json = root / "labels.json"
    labels = label_names_from_json(labels_json) if labels_json.is_file() else {}
    return Dataset(root, tuple(cases), labels, ("MR",))
