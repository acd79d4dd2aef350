"""Dataset fingerprint and the training plan derived from it (nnU-Net's experiment planning).

fingerprint(dataset) -> Fingerprint; make_plan(fingerprint, plan_config) -> Plan; both are
saved as JSON in the run folder so a person can read them and later stages reuse them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medseg.config import NETWORK_NAMES, PlanConfig
from medseg.datasets import (
    LABEL_AS_CHANNEL,
    MODALITIES,
    Case,
    Dataset,
    id_past_a_gap,
    label_id_problem,
    label_name_problem,
)
from medseg.errors import MedsegError
from medseg.fileio import atomic_write_json
from medseg.io import (
    MAX_VOXELS,
    Geometry,
    Volume,
    grid_mismatch,
    on_grid_of,
    read_label_map,
    read_volume,
    voxels_digest,
)

SAMPLES_PER_CASE = 10_000
MAX_LEVELS = 6  # resolution levels of the U-Net, bottleneck included
ANISOTROPY_RATIO = 3.0
LONE_AXIS_MIN = 12  # voxels an axis needs to be pooled while no other is (nnU-Net's 3 x 4)
MIN_PATCH_AXIS = 16  # voxels: two down-samplings (DynUNet needs them) of an axis at least 8
GB = 2**30


@dataclass(frozen=True)
class Fingerprint:
    """What the planner needs to know about a dataset; spacings and shapes in RAS axis order."""

    spacings: list[list[float]]
    shapes: list[list[int]]
    intensity: list[dict[str, float]]  # per channel, over foreground voxels
    class_voxels: dict[int, int]
    modalities: list[str]
    labels: dict[int, str]
    ignore_label: int | None = None  # unannotated voxels, counted in no class
    cases: list[str] = dataclasses.field(default_factory=list)  # names, in spacings' order


@dataclass(frozen=True)
class Plan:
    """Everything the transforms, the network and inference need; saved as plan.json."""

    target_spacing: list[float]
    patch_size: list[int]
    batch_size: int
    kernels: list[list[int]]
    strides: list[list[int]]
    filters: list[int]
    deep_supervision: bool
    in_channels: int
    num_classes: int
    labels: dict[int, str]
    modalities: list[str]
    normalization: list[dict]
    median_shape: list[int]
    mirror_axes: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    res_block: bool = False
    network: str = "dynunet"
    # nnU-Net's 'ignore' label: voxels of this id (num_classes) are left out of the loss
    # and of validation; the network has no output for it
    ignore_label: int | None = None

    @property
    def label_id_count(self) -> int:
        """How many ids a training label map holds: the classes, and 'ignore' past them."""
        return self.num_classes + (self.ignore_label is not None)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["labels"] = {str(k): v for k, v in self.labels.items()}
        if self.ignore_label is None:  # the plan.json of a dataset without one is unchanged
            del data["ignore_label"]
        return data

    @staticmethod
    def from_json(data: dict) -> Plan:
        """A plan.json's content, checked: a hand-edited value of the wrong type or length
        is named here rather than failing deep in the network or the transforms."""
        problem = _plan_problem(data) if isinstance(data, dict) else "not a JSON object"
        if problem:
            raise ValueError(problem)
        data = dict(data)
        data["labels"] = {int(k): v for k, v in data["labels"].items()}
        return Plan(**data)


def fingerprint(dataset: Dataset, seed: int = 0, progress: bool = True) -> Fingerprint:
    """Read every case once: spacing, shape, foreground intensities, class frequencies.
    `progress` shows a bar (torchrun's other ranks pass False)."""
    # a label map's gap, before any reading, naming the file that gave the map
    refuse_label_gaps(dataset.labels, dataset.labels_from or dataset.root)
    rng = np.random.default_rng(seed)
    spacings, shapes, class_voxels = [], [], {}
    holder: dict[int, Path] = {}  # the first label file that holds each id
    samples: list[list[np.ndarray]] = [[] for _ in dataset.modalities]
    ranges: list[list[tuple[float, float]]] = [[] for _ in dataset.modalities]
    first_with_voxels: dict[str, str] = {}
    for case in tqdm(dataset.cases, desc="fingerprint", unit="case", leave=False,
                     disable=not progress):
        label = read_label_map(case.label) if case.label else None
        digests = []
        for channel, image_path in enumerate(case.images):
            image = read_volume(image_path)
            digests.append(voxels_digest(image.data))
            if channel == 0:
                label = _label_on_grid(image, label) if label is not None else None
                spacings.append(_ras_ordered(image.affine, image.spacing))
                shapes.append(_ras_ordered(image.affine, image.spatial_shape))
                first = (image.path, image.geometry)  # not its voxels: memory
            else:  # the label lies on channel 0's grid already
                _check_channel_grid(image, first)
            _sample_intensities(image, label, rng, samples[channel], dataset.ignore_label)
            ranges[channel].append((float(image.data.min()), float(image.data.max())))
        if label is not None:
            digests.append(voxels_digest(label.data))
            _refuse_label_as_channel(digests, label, case, dataset.ignore_label)
        _refuse_duplicate(first_with_voxels, "+".join(digests), case)
        if label is not None:
            check_label_values(label, dataset.labels, dataset.ignore_label)
            _count_classes(label, class_voxels, dataset.ignore_label)
            for label_id in class_voxels:
                holder.setdefault(label_id, case.label)
    if any(case.label for case in dataset.cases):
        refuse_no_foreground(class_voxels, dataset.root)
        _note_structures_without_voxels(dataset.labels, class_voxels, progress)
        if not dataset.labels:  # ids read from the label files (a map was checked above)
            refuse_label_gaps(class_voxels, holder.get(id_past_a_gap(class_voxels),
                                                       dataset.root))
    _note_modality_doubts(dataset, ranges, progress)
    intensity = [_intensity_stats(np.concatenate(s) if s else np.zeros(1)) for s in samples]
    labels = dataset.labels or {k: ("background" if k == 0 else f"label_{k}")
                                for k in sorted(class_voxels)}
    return Fingerprint(
        spacings=[[float(v) for v in s] for s in spacings],
        shapes=[[int(v) for v in s] for s in shapes],
        intensity=intensity,
        class_voxels={int(k): int(v) for k, v in sorted(class_voxels.items())},
        modalities=list(dataset.modalities),
        labels=labels,
        ignore_label=dataset.ignore_label,
        cases=[case.name for case in dataset.cases],
    )


# CT in Hounsfield units has air (-1000) around the body and fat (-100) within it; MR
# magnitudes are never far below 0
CT_AIR_BELOW = -500.0
CT_LOWEST_ABOVE = -100.0


def intensity_doubt(modality: str, lowest: float, highest: float) -> str | None:
    """Why an image of this value range looks unlike its channel's modality (None: it
    does not): a CT read as MR (the folders layout defaults to MR) is z-scored over its
    nonzero voxels, and an MR given to a CT model is clipped as if it were HU."""
    if lowest == highest:
        return f"every voxel is {lowest:g}"
    if modality == "MR" and lowest <= CT_AIR_BELOW:
        return f"values down to {lowest:g} look like CT Hounsfield units, not MR"
    if modality == "CT" and lowest > CT_LOWEST_ABOVE:
        return (f"no value below {CT_LOWEST_ABOVE:g} (its lowest is {lowest:g}): not a CT in "
                f"Hounsfield units?")
    return None


def modality_hint(channels: int) -> str:
    """Where a channel's modality is set: dataset.modality sets every channel alike, which
    would turn a dataset's noNorm or CT channels into MR ones."""
    if channels == 1:
        return "set dataset.modality to what the images are"
    return ("name the channel's modality in dataset.json (channel_names or modality); "
            "dataset.modality would set every channel alike")


def _note_modality_doubts(dataset: Dataset, ranges: list[list[tuple[float, float]]],
                          progress: bool) -> None:
    """One note per channel whose images look unlike its modality, before a plan
    normalizes them so (torchrun's other ranks, `progress` False, stay quiet)."""
    for channel, (modality, found) in enumerate(zip(dataset.modalities, ranges, strict=True)):
        doubts = [(case, doubt) for case, (low, high) in zip(dataset.cases, found, strict=True)
                  if (doubt := intensity_doubt(modality, low, high))]
        if doubts and progress:
            case, doubt = doubts[0]
            hint = f" ({modality_hint(len(dataset.modalities))})"
            tqdm.write(f"medseg: note: channel {channel} is planned as {modality}, but "
                       f"{len(doubts)} of {len(found)} cases look otherwise ({case.name}: "
                       f"{doubt}){hint}", file=sys.stderr)


def _sample_intensities(image: Volume, label: Volume | None, rng: np.random.Generator,
                        samples: list[np.ndarray], ignore_label: int | None = None) -> None:
    """Up to SAMPLES_PER_CASE voxels of the image's foreground (of all of it, unlabelled).
    Unannotated voxels ('ignore') are not foreground: they may be air or anything else."""
    if label is None:
        values = image.data.ravel()
    else:
        foreground = label.data > 0
        if ignore_label is not None:
            foreground &= label.data != ignore_label
        values = image.data[foreground]
    if values.size:
        take = min(SAMPLES_PER_CASE, values.size)
        samples.append(rng.choice(values, size=take, replace=False))


def _refuse_label_as_channel(digests: list[str], label: Volume, case: Case,
                             ignore_label: int | None) -> None:
    """An image channel with the voxels of the case's label (`digests`: the channels', then
    the label's), as `medseg check` finds it: a CSV column of label files, a copy of the
    label among the channels; the network would be given the answer to copy."""
    *channels, label_digest = digests
    for file, digest in zip(case.images, channels, strict=True):
        background = [v for v in (0, ignore_label) if v is not None]
        if digest == label_digest and np.isin(label.data, background, invert=True).any():
            raise MedsegError(f"{LABEL_AS_CHANNEL} (the label: {case.label})", file)


def _refuse_duplicate(first_with_voxels: dict[str, str], digest: str, case: Case) -> None:
    """The same voxels in every channel and label as an earlier case (`medseg check`'s
    duplicate case): one copy could be trained on and the other validated on. One image
    with two raters' labels is two cases."""
    first = first_with_voxels.setdefault(digest, case.name)
    if first != case.name:
        raise MedsegError(f"same voxels as case {first} in every channel and the label: a "
                          f"duplicate case (one copy could be trained on and the other "
                          f"validated on); remove one", case.images[0])


def _count_classes(label: Volume, class_voxels: dict[int, int], ignore_label: int | None
                   ) -> None:
    ids, counts = np.unique(label.data, return_counts=True)
    for label_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
        if label_id != ignore_label:
            class_voxels[label_id] = class_voxels.get(label_id, 0) + count


def resampled_shapes(spacings: list[list[float]], shapes: list[list[int]],
                     target: list[float]) -> list[list[float]]:
    """Each case's shape at the target spacing (voxels per axis, not rounded)."""
    goal = np.asarray(target, dtype=float)
    return [list(np.asarray(shape, float) * np.asarray(spacing, float) / goal)
            for shape, spacing in zip(shapes, spacings, strict=True)]


def memory_cache_bytes(shapes: list[list[float]], channels: int) -> float:
    """What caching every case in memory takes: float32 channels and label per voxel."""
    return sum(float(np.prod(shape)) for shape in shapes) * 4 * (channels + 1)


def refuse_unaffordable_spacing(fp: Fingerprint, plan: Plan, memory_bytes: int | None,
                                cache: str = "memory", spacing_given: bool = True) -> None:
    """A target spacing far finer than the data's (0.01 mm for 1 mm voxels) makes the
    resampled cases too large to allocate: a case beyond 2^31 voxels is refused in one line
    whatever `cache` (train.cache) is. The memory cache holds every case as float32 channels
    and label; with `cache` memory, more than twice the machine's memory is refused too (auto
    and disk keep a large dataset on disk instead, whose free space is checked when the
    cache is built). `spacing_given`: the workflow set plan.target_spacing; otherwise the
    message names the data's own spacing, which no coarser setting of it is to blame for."""
    shapes = resampled_shapes(fp.spacings, fp.shapes, plan.target_spacing)
    largest = max((float(np.prod(shape)) for shape in shapes), default=0.0)
    cached = memory_cache_bytes(shapes, plan.in_channels)
    mm = "[" + ", ".join(f"{s:.4g}" for s in plan.target_spacing) + "] mm"
    spacing = (f"'plan.target_spacing' {mm}" if spacing_given else
               f"the data's own spacing {mm} (planned from its median spacing; "
               f"'plan.target_spacing' is not set)")
    if largest > MAX_VOXELS:
        fix = "choose a coarser spacing" if spacing_given else \
            "set a coarser 'plan.target_spacing'"
        raise MedsegError(f"{spacing} would resample the largest case to {largest:.3g} voxels, "
                          f"more than 2^31: {fix}")
    if cache == "memory" and memory_bytes is not None and cached > 2 * memory_bytes:
        fix = "choose a coarser spacing, or " if spacing_given else ""
        raise MedsegError(f"{spacing} would resample the largest case to {largest:.3g} voxels "
                          f"and cache the dataset in about {cached / GB:.3g} GB; this machine "
                          f"has {memory_bytes / GB:.3g} GB: {fix}set 'train.cache' to disk "
                          f"(or auto) to keep the cases on disk")


def make_plan(fp: Fingerprint, config: PlanConfig) -> Plan:
    """Target spacing, patch size, network topology and normalization from a fingerprint."""
    spacing = config.target_spacing or target_spacing(fp.spacings, fp.shapes)
    spacing = [float(s) for s in spacing]
    median_shape = _median_resampled_shape(fp.spacings, fp.shapes, spacing)
    patch = config.patch_size or initial_patch_size(median_shape, spacing,
                                                    config.max_patch_voxels)
    if config.patch_size is None:
        patch, kernels, strides = _divisible_topology(patch, spacing)
    else:
        kernels, strides = kernels_and_strides(patch, spacing)
        patch = list(patch)
    _check_patch(patch, strides)
    _refuse_huge_patch(patch, config)
    _check_network(config.network, strides)
    # SegResNetDS doubles its width at every level with no cap: the plan says what is built
    cap = config.max_filters if config.network == "dynunet" else math.inf
    filters = [int(min(config.base_filters * 2**i, cap)) for i in range(len(strides))]
    num_classes = max(max(fp.labels), max(fp.class_voxels, default=0)) + 1
    return Plan(
        target_spacing=spacing,
        patch_size=[int(p) for p in patch],
        batch_size=config.batch_size,
        kernels=kernels,
        strides=strides,
        filters=filters,
        deep_supervision=config.deep_supervision,
        in_channels=len(fp.modalities),
        num_classes=num_classes,
        labels=dict(fp.labels),
        modalities=list(fp.modalities),
        normalization=[_normalization(m, s) for m, s in zip(fp.modalities, fp.intensity,
                                                              strict=True)],
        median_shape=median_shape,
        mirror_axes=sorted(config.mirror_axes),  # checked with the workflow
        res_block=config.res_block,
        network=config.network,
        ignore_label=fp.ignore_label,
    )


def target_spacing(spacings: list[list[float]], shapes: list[list[int]]) -> list[float]:
    """Median spacing; for a strongly anisotropic axis, its 10th percentile (as nnU-Net)."""
    spacing_array = np.asarray(spacings, dtype=float)
    target = np.median(spacing_array, axis=0)
    coarse = int(np.argmax(target))
    others = [i for i in range(3) if i != coarse]
    if target[coarse] > ANISOTROPY_RATIO * max(target[others]):
        median_shape = np.median(np.asarray(shapes, dtype=float), axis=0)
        if median_shape[coarse] * ANISOTROPY_RATIO < min(median_shape[others]):
            target[coarse] = max(np.percentile(spacing_array[:, coarse], 10),
                                 max(target[others]))
    return [float(s) for s in target]


def initial_patch_size(median_shape: list[int], spacing: list[float], budget: int) -> list[int]:
    """Start from the median shape; shrink the physically longest axis of those above
    MIN_PATCH_AXIS until within budget, or until none is left. An axis shorter than that
    stays as it is (a slab of 3 slices is not padded to 16 and pooled into its padding, as
    nnU-Net plans it), unless every axis is: DynUNet's two down-samplings need one axis of
    MIN_PATCH_AXIS, so such small cases are padded."""
    patch = [max(1, int(s)) for s in median_shape]
    if max(patch) < MIN_PATCH_AXIS:
        patch = [max(MIN_PATCH_AXIS, p) for p in patch]
    while math.prod(patch) > budget:
        shrinkable = [i for i in range(3) if patch[i] > MIN_PATCH_AXIS]
        if not shrinkable:
            break
        longest = max(patch[i] * spacing[i] for i in shrinkable)
        for axis in shrinkable:  # axes of one length shrink together (a CT's rows, columns)
            if patch[axis] * spacing[axis] >= longest * (1 - 1e-6):
                patch[axis] = max(MIN_PATCH_AXIS, int(patch[axis] * 0.9))
    return patch


def _divisible_topology(patch: list[int], spacing: list[float]
                        ) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """The patch rounded up to what its down-sampling divides, with the topology of the
    rounded patch (rounding up can leave an axis enough voxels for one more pooling, which
    changes the factor to round to: repeated until it settles, as nnU-Net plans on the
    patch it trains)."""
    for _ in range(MAX_LEVELS + 1):
        kernels, strides = kernels_and_strides(patch, spacing)
        rounded = _divisible_patch(patch, strides)
        if rounded == list(patch):
            break
        patch = rounded
    return list(patch), kernels, strides


def kernels_and_strides(patch: list[int], spacing: list[float]
                        ) -> tuple[list[list[int]], list[list[int]]]:
    """DynUNet topology as nnU-Net plans it: at each level, pool the axes that still have at
    least 8 voxels and are finer than twice the finest of those (an axis pooled alone needs
    LONE_AXIS_MIN); a kernel is 3 wide along an
    axis from the level where that axis is finer than twice the finest spacing on, and 1
    wide along an axis of one voxel."""
    sizes, spacings = [float(p) for p in patch], list(spacing)
    kernel = [1, 1, 1]
    kernels, strides = [], [[1, 1, 1]]
    while len(strides) < MAX_LEVELS:
        poolable = [i for i in range(3) if sizes[i] >= 8]
        if not poolable:
            break
        # the finest of the axes that can still pool: an axis that ran out of voxels keeps
        # its fine spacing and would otherwise stop the others early
        finest = min(spacings[i] for i in poolable)
        stride = [2 if i in poolable and spacings[i] / finest < 2 else 1 for i in range(3)]
        if _lone_axis_too_short(stride, sizes, levels=len(strides)):
            break
        kernel = [3 if k == 3 or sp / min(spacings) < 2 else 1
                  for k, sp in zip(kernel, spacings, strict=True)]
        kernels.append(list(kernel))
        sizes = [size / s for size, s in zip(sizes, stride, strict=True)]
        spacings = [sp * s for sp, s in zip(spacings, stride, strict=True)]
        strides.append(stride)
    kernels.append([3, 3, 3])
    # an axis of one voxel (single slices) is never pooled: a 3-wide kernel across it would
    # read only its zero padding, three times the work of nnU-Net's 2D convolutions
    flat = [i for i in range(3) if patch[i] == 1]
    return [[1 if i in flat else k for i, k in enumerate(kernel)] for kernel in kernels], strides


def _lone_axis_too_short(stride: list[int], sizes: list[float], levels: int) -> bool:
    """nnU-Net pools an axis alone only while it has LONE_AXIS_MIN voxels (3 x its 4-voxel
    bottleneck edge): no level halves one axis of 8 to 11 while the others stay. The two
    down-samplings DynUNet needs (`levels` below 3) are made anyway."""
    pooled = [size for size, s in zip(sizes, stride, strict=True) if s == 2]
    return levels >= 3 and len(pooled) == 1 and pooled[0] < LONE_AXIS_MIN


def _is_int(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_positive_number(value) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _ints3(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_int(v) for v in value)


_PLAN_KEYS = {  # key -> (check, what it must be); the _OPTIONAL_PLAN_KEYS may be absent
    "target_spacing": (lambda v: isinstance(v, list) and len(v) == 3
                       and all(_is_positive_number(x) for x in v), "3 positive numbers (mm)"),
    "patch_size": (_ints3, "3 positive integers"),
    "median_shape": (_ints3, "3 positive integers"),
    "batch_size": (_is_int, "a positive integer"),
    "kernels": (lambda v: isinstance(v, list) and len(v) >= 3 and all(map(_ints3, v)),
                "a list of at least 3 lists of 3 positive integers"),
    "strides": (lambda v: isinstance(v, list) and len(v) >= 3 and all(map(_ints3, v)),
                "a list of at least 3 lists of 3 positive integers"),
    "filters": (lambda v: isinstance(v, list) and v and all(_is_int(x) for x in v),
                "a list of positive integers"),
    "deep_supervision": (lambda v: isinstance(v, bool), "true or false"),
    "res_block": (lambda v: isinstance(v, bool), "true or false"),
    "in_channels": (_is_int, "a positive integer"),
    "num_classes": (lambda v: _is_int(v, low=2), "an integer of at least 2"),
    "labels": (lambda v: isinstance(v, dict) and v
               and all(_WHOLE.fullmatch(str(k)) and isinstance(n, str) for k, n in v.items()),
               "a mapping of label ids to names"),
    "modalities": (lambda v: isinstance(v, list) and all(m in MODALITIES for m in v),
                   f"a list of {', '.join(map(repr, MODALITIES))}, one per channel"),
    "normalization": (lambda v: isinstance(v, list) and all(map(_valid_normalization, v)),
                      "a list of {'scheme': 'zscore_nonzero'}, {'scheme': 'ct', 'clip': "
                      "[low, high], 'mean': m, 'std': s > 0}, {'scheme': 'none'}, "
                      "{'scheme': 'rescale_to_0_1'} or {'scheme': 'rgb_to_0_1'}, one per "
                      "channel"),
    "mirror_axes": (lambda v: isinstance(v, list) and len(set(v)) == len(v)
                    and all(_is_int(a, low=0) and a <= 2 for a in v),
                    "a list of distinct axes among 0, 1, 2"),
    "network": (lambda v: v in NETWORK_NAMES, " or ".join(map(repr, NETWORK_NAMES))),
    "ignore_label": (lambda v: v is None or _is_int(v), "null or a positive integer"),
}
_OPTIONAL_PLAN_KEYS = {"mirror_axes", "res_block", "network", "ignore_label"}
_WHOLE = re.compile(r"0|[1-9][0-9]*")


def _valid_normalization(norm) -> bool:
    if not isinstance(norm, dict):
        return False
    if norm.get("scheme") in FIXED_SCHEMES.values():
        return True
    clip = norm.get("clip")
    return (norm.get("scheme") == "ct" and isinstance(clip, list) and len(clip) == 2
            and all(isinstance(c, int | float) and math.isfinite(c) for c in clip)
            and isinstance(norm.get("mean"), int | float) and _is_positive_number(norm.get("std")))


def _plan_problem(data: dict) -> str | None:
    """The first thing wrong with a plan.json's content, or None."""
    for key, (check, meaning) in _PLAN_KEYS.items():
        if key not in data:
            if key in _OPTIONAL_PLAN_KEYS:
                continue
            return f"'{key}' is missing"
        if not check(data[key]):
            return f"'{key}' must be {meaning}, not {json.dumps(data[key])}"
    unknown = sorted(set(data) - set(_PLAN_KEYS))
    if unknown:
        return f"unknown key(s) {', '.join(map(repr, unknown))}"
    channels = data["in_channels"]
    if len(data["modalities"]) != channels or len(data["normalization"]) != channels:
        return (f"'modalities' and 'normalization' must have one entry per channel "
                f"(in_channels {channels})")
    if not len(data["kernels"]) == len(data["strides"]) == len(data["filters"]):
        return "'kernels', 'strides' and 'filters' must have one entry per network level"
    ids = [int(k) for k in data["labels"]]
    if max(ids) >= data["num_classes"]:
        return f"label id {max(ids)} is beyond 'num_classes' {data['num_classes']}"
    if data.get("ignore_label") not in (None, data["num_classes"]):
        return (f"'ignore_label' must be 'num_classes' ({data['num_classes']}), the id past "
                f"the classes, not {data['ignore_label']}")
    names = label_name_problem({int(k): n for k, n in data["labels"].items()})
    return f"'labels': {names}" if names else None


def save_plan(plan: Plan, path: Path) -> None:
    atomic_write_json(path, plan.to_json())


def load_plan(path: Path) -> Plan:
    if not path.is_file():
        raise MedsegError("plan.json not found (is this a medseg run folder?)", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedsegError(f"not valid JSON ({exc})", path) from exc
    try:
        return Plan.from_json(data)
    except ValueError as exc:  # what _plan_problem found
        raise MedsegError(f"not a plan medseg can read: {exc}", path) from exc


def fingerprint_json(fp: Fingerprint) -> dict:
    """The fingerprint as fingerprint.json holds it."""
    data = dataclasses.asdict(fp)
    data["labels"] = {str(k): v for k, v in fp.labels.items()}
    data["class_voxels"] = {str(k): v for k, v in fp.class_voxels.items()}
    return data


def save_fingerprint(fp: Fingerprint, path: Path) -> None:
    atomic_write_json(path, fingerprint_json(fp))


# the normalization of every modality but CT, whose scheme holds the dataset's statistics
FIXED_SCHEMES = {"MR": "zscore_nonzero", "noNorm": "none", "rescale_to_0_1": "rescale_to_0_1",
                 "rgb_to_0_1": "rgb_to_0_1"}


def _normalization(modality: str, stats: dict[str, float]) -> dict:
    if modality == "CT":
        return {"scheme": "ct", "clip": [stats["p00_5"], stats["p99_5"]],
                "mean": stats["mean"], "std": stats["std"]}
    return {"scheme": FIXED_SCHEMES[modality]}


def _intensity_stats(values: np.ndarray) -> dict[str, float]:
    return {
        "p00_5": float(np.percentile(values, 0.5)),
        "p99_5": float(np.percentile(values, 99.5)),
        "mean": float(values.mean()),
        "std": float(max(values.std(), 1e-8)),
    }


def ras_grid(geometry) -> tuple[list[int], list[float]]:
    """A volume's shape and spacing in R, A, S order, as the fingerprint records them."""
    return (_ras_ordered(geometry.affine, tuple(int(v) for v in geometry.shape)),
            _ras_ordered(geometry.affine, geometry.spacing))


def _ras_ordered(affine: np.ndarray, values: tuple) -> list:
    """Reorder per-voxel-axis values (spacing, shape) into R, A, S order."""
    order = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    ras = [None, None, None]
    for voxel_axis, world_axis in enumerate(order):
        ras[world_axis] = values[voxel_axis]
    return ras


def _median_resampled_shape(spacings, shapes, spacing) -> list[int]:
    """At least 1 per axis: a target spacing coarser than twice the cases' extent (one 3 mm
    slice planned at 8 mm) still resamples them to one voxel, and plan.json needs 1 or more."""
    physical = np.asarray(spacings, dtype=float) * np.asarray(shapes, dtype=float)
    return [max(1, int(round(v))) for v in np.median(physical, axis=0) / np.asarray(spacing)]


def _divisible_patch(patch: list[int], strides: list[list[int]]) -> list[int]:
    factors = np.prod(np.asarray(strides), axis=0)
    return [int(math.ceil(p / f) * f) for p, f in zip(patch, factors, strict=True)]


def _check_patch(patch: list[int], strides: list[list[int]]) -> None:
    if len(strides) < 3:  # DynUNet needs two down-samplings
        raise MedsegError(f"plan.patch_size {patch} is too small for a U-Net: at least one "
                          f"axis needs {MIN_PATCH_AXIS} voxels to be down-sampled twice")
    factors = np.prod(np.asarray(strides), axis=0)
    bad = [int(f) for p, f in zip(patch, factors, strict=True) if p % f]
    if bad:
        good = _divisible_patch(patch, strides)
        raise MedsegError(f"plan.patch_size {patch} must be divisible by the network's "
                          f"down-sampling {[int(f) for f in factors]}; try {good}")


def _refuse_huge_patch(patch: list[int], config: PlanConfig) -> None:
    """A batch of patches beyond 2^31 voxels asks for hundreds of GB of activations: refuse
    it naming the key, before the run folder is trained into (torch's own error is a
    failed allocation of so many bytes)."""
    voxels = math.prod(patch) * config.batch_size
    if voxels > MAX_VOXELS:
        key = "plan.patch_size" if config.patch_size else "plan.max_patch_voxels"
        raise MedsegError(f"'{key}' makes patches of {patch} (batch {config.batch_size}): "
                          f"{voxels:.3g} voxels per training step, beyond 2^31")


def _check_network(network: str, strides: list[list[int]]) -> None:
    """SegResNetDS halves every axis at every level; the plan's strides must too."""
    if network == "segresnet" and any(2 ** (len(strides) - 1) != f
                                      for f in np.prod(np.asarray(strides), axis=0)):
        raise MedsegError(f"'plan.network: segresnet' halves every axis at every level, but "
                          f"this plan's strides {strides} do not (anisotropic spacing or "
                          "patch); use dynunet")


def _check_same_grid(image, label) -> None:
    mismatch = grid_mismatch(label.geometry, image.geometry)
    if mismatch:
        raise MedsegError(f"label {label.path.name} is not on the image's grid: {mismatch}",
                          image.path)


def _check_channel_grid(image, first: tuple[Path, Geometry]) -> None:
    mismatch = grid_mismatch(image.geometry, first[1])
    if mismatch:
        raise MedsegError(f"not on the grid of {first[0].name}, the case's first channel: "
                          f"{mismatch}", image.path)


def _label_on_grid(image, label):
    """The label on the image's grid (reordered when it stores the same voxels in another
    axis order or direction), so that its voxels pair with the image's."""
    try:
        return on_grid_of(label, image)
    except MedsegError:
        _check_same_grid(image, label)  # refuses: training's message names label and image
        raise


def check_label_values(label, labels: dict[int, str], ignore_label: int | None = None
                       ) -> set[int]:
    """Refuse label values outside `labels` (the structures and background) and 'ignore';
    without a map, negative ones. Returns the values found, 'ignore' left out."""
    values = set(np.unique(label.data).tolist()) - {ignore_label}
    if not labels:  # ids taken from the data: class indices, so never negative
        negative = sorted(v for v in values if v < 0)
        if negative:
            raise MedsegError(f"label values {negative} are negative: labels are class "
                              f"numbers 0, 1, 2, ...", label.path)
        return values
    unknown = sorted(values - set(labels))
    if unknown:
        raise MedsegError(f"label values {unknown} are not in the dataset's label map",
                          label.path)
    return values


def refuse_label_gaps(ids, where: Path) -> None:
    """Refuse ids that do not run 0, 1, 2, ..., naming `where`: the label map, or the first
    label file that holds the id past the gap."""
    problem = label_id_problem(ids)
    if problem:
        holds = "" if where.is_dir() else f"holds id {id_past_a_gap(ids)}; "
        raise MedsegError(f"{holds}label ids must run 0, 1, 2, ... without a gap for training "
                          f"(as nnU-Net requires): {problem}; renumber the label files and "
                          f"the label map", where)


def _note_structures_without_voxels(labels: dict[int, str], class_voxels: dict[int, int],
                                    progress: bool) -> None:
    """Structures of the label map that no label file holds (a TotalSegmentator map of 118
    names for a dataset of 41): the network still has an output for each, which it never
    learns to leave empty."""
    empty = [name for label_id, name in sorted(labels.items())
             if label_id != 0 and not class_voxels.get(label_id)]
    if empty and progress:
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        tqdm.write(f"medseg: note: {len(empty)} of {len(labels) - 1} structures of the label "
                   f"map have no voxel in any case ({', '.join(empty[:3])}{more}): the network "
                   f"cannot learn them", file=sys.stderr)


def no_structure(values: Collection[int], ignore: int | None) -> str:
    """What a label holding no structure voxel holds, in `values` (its values, 'ignore'
    among them where present), as `medseg check` warns of it."""
    if ignore not in values:
        return "label is empty (background only)"
    if 0 not in values:
        return "label holds no structure ('ignore' only: no voxel is annotated)"
    return "label holds no structure (background and 'ignore' only)"


def refuse_no_foreground(found: Iterable[int], root: Path) -> None:
    """A segmentation network needs at least one structure in some case to learn from:
    `found`, the label ids the labels hold ('ignore' left out; class_voxels' keys), must
    hold one besides background 0."""
    if not any(label_id != 0 for label_id in found):
        raise MedsegError("no case's label has a voxel of any structure (all background): "
                          "nothing to learn", root)


def describe_plan(plan: Plan, fp: Fingerprint) -> str:
    """The plan in lines a person reads before training (`medseg plan`): where each number
    comes from, level by level, channel by channel, class by class."""
    spacings = np.asarray(fp.spacings, dtype=float)
    extent = _numbers(np.multiply(plan.patch_size, plan.target_spacing))
    lines = [
        f"target spacing (mm, R A S): {_numbers(plan.target_spacing)}{_spacing_reason(plan, fp)}"
        f"; the cases' median {_numbers(np.median(spacings, axis=0))}, from "
        f"{_numbers(spacings.min(axis=0))} to {_numbers(spacings.max(axis=0))}",
        f"median shape at that spacing: {plan.median_shape}",
        f"patch {plan.patch_size} voxels ({extent} mm), "
        f"batch {plan.batch_size}, mirror axes {plan.mirror_axes}",
        f"network: {plan.network}{', residual blocks' if plan.res_block else ''}"
        f"{', deep supervision' if plan.deep_supervision else ''}",
    ]
    for level, (kernel, stride, width) in enumerate(zip(plan.kernels, plan.strides,
                                                        plan.filters, strict=True)):
        lines.append(f"  level {level}: kernel {kernel}, stride {stride}, {width} filters")
    for channel, (modality, norm) in enumerate(zip(plan.modalities, plan.normalization,
                                                   strict=True)):
        lines.append(f"channel {channel} ({modality}): {_normalization_text(norm)}")
    total = sum(count for label, count in fp.class_voxels.items() if label > 0) or 1
    for label, name in sorted(plan.labels.items()):
        if label > 0:
            share = fp.class_voxels.get(label, 0) / total
            lines.append(f"class {label} {name}: {share:.1%} of the structure voxels")
    return "\n".join(lines)


def _spacing_reason(plan: Plan, fp: Fingerprint) -> str:
    """Why the target spacing is not the cases' median: set by the workflow, or the 10th
    percentile along a strongly anisotropic axis (nnU-Net's rule)."""
    auto = target_spacing(fp.spacings, fp.shapes)
    if not np.allclose(plan.target_spacing, auto, rtol=1e-6, atol=0):
        return " (set by plan.target_spacing)"
    median = np.median(np.asarray(fp.spacings, dtype=float), axis=0)
    changed = [axis for axis in range(3) if not math.isclose(auto[axis], median[axis])]
    if not changed:
        return ""
    axis = "RAS"[changed[0]]
    return (f" (along {axis} the cases' 10th percentile, no finer than the other axes, not "
            f"their median: that axis's "
            f"spacing is over {ANISOTROPY_RATIO:g}x the others' and its voxels under 1/"
            f"{ANISOTROPY_RATIO:g} of theirs, as nnU-Net plans it)")


def _numbers(values) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


def _normalization_text(norm: dict) -> str:
    if norm["scheme"] == "ct":
        low, high = norm["clip"]
        return (f"clipped to [{low:.4g}, {high:.4g}] (the structures' 0.5 and 99.5 "
                f"percentiles), then (x - {norm['mean']:.4g}) / {norm['std']:.4g}")
    return {"zscore_nonzero": "z-score of each case over its nonzero voxels",
            "none": "as stored", "rescale_to_0_1": "rescaled to [0, 1] per case",
            "rgb_to_0_1": "divided by 255"}.get(norm["scheme"], norm["scheme"])
