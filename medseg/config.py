"""Workflow configuration: frozen dataclasses loaded from YAML, with `key=value` overrides.

Unknown keys are errors that name the key and the file; no string in a workflow is executed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg.errors import MedsegError
from medseg.fileio import atomic_write_text, read_user_text

# the networks medseg.model.NETWORKS builds (named here, where workflows are checked)
NETWORK_NAMES = ("dynunet", "segresnet")


@dataclass(frozen=True)
class DatasetConfig:
    """Where the labelled collection lives and how to read it."""

    path: str = ""
    layout: str = "auto"  # auto | msd | nnunet | folders | csv
    modality: str = "auto"  # auto (from dataset.json) | CT | MR
    labels: dict[int, str] | None = None  # overrides the names from dataset.json


@dataclass(frozen=True)
class PlanConfig:
    """Overrides for the automatic plan; `None` means "let the fingerprint decide"."""

    target_spacing: list[float] | None = None
    patch_size: list[int] | None = None
    batch_size: int = 2
    max_patch_voxels: int = 96 * 96 * 96
    base_filters: int = 32
    max_filters: int = 320
    deep_supervision: bool = True
    # network-grid (RAS) axes mirrored in training and by test-time augmentation; leave out
    # an axis along which mirroring changes a label's meaning (hippocampus head and tail)
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])
    res_block: bool = False  # residual convolution blocks (MONAI UnetResBlock) in the U-Net
    network: str = "dynunet"  # dynunet (nnU-Net's U-Net) | segresnet (MONAI SegResNetDS)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the MONAI random transforms used in training."""

    flip_prob: float = 0.5
    # a case smaller than the patch is padded by this many voxels more on each side, so that
    # the random crop also shifts it (otherwise it sits at the same place in every patch)
    shift_voxels: int = 0
    rotate_prob: float = 0.2
    rotate_degrees: float = 15.0
    scale_prob: float = 0.2
    scale_range: float = 0.15
    # elastic deformation (MONAI Rand3DElasticd with batchgenerators' ranges: offsets up to
    # this magnitude, smoothed by a Gaussian of sd 9-13 voxels); nnU-Net leaves it off in 3D
    elastic_prob: float = 0.0
    elastic_magnitude: float = 900.0
    noise_prob: float = 0.1
    noise_std: float = 0.1
    smooth_prob: float = 0.1
    contrast_prob: float = 0.15
    intensity_shift_prob: float = 0.15
    gamma_prob: float = 0.15
    # nnU-Net's other intensity transforms, off unless asked: gamma keeping each patch's mean
    # and sd, gamma of the inverted image, and low resolution simulated by zooming out and in
    gamma_retain_stats: bool = False
    gamma_invert_prob: float = 0.0
    lowres_prob: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's settings."""

    epochs: int = 100
    iterations_per_epoch: int = 50
    optimizer: str = "sgd"  # sgd | adamw
    learning_rate: float = 0.01
    weight_decay: float = 3e-5
    schedule: str = "poly"  # poly | cosine | constant
    val_every: int = 5
    val_max_cases: int | None = None
    foreground_fraction: float = 0.33
    # the background class in the Dice term of Dice+CE (nnU-Net leaves it out)
    dice_include_background: bool = True
    # Dice over the whole batch as one volume (nnU-Net's batch Dice), or per patch
    batch_dice: bool = True
    # cross-entropy against targets softened by this much (MONAI's label_smoothing; 0: off)
    label_smoothing: float = 0.0
    # validate and keep an exponential moving average of the weights (0: off); each step
    # the average moves by (1 - decay) towards the current weights
    ema_decay: float = 0.0
    seed: int = 0
    deterministic: bool = False
    max_minutes: float | None = None
    num_workers: int = 1
    precision: str = "auto"  # auto | bf16 | fp32 | amp
    # where the preprocessed training cases are kept: auto | memory | disk (RUN_DIR/cache)
    cache: str = "auto"
    folds: int = 5
    fold: int = 0
    # shuffles the cases into folds; apart from `seed`, so that runs with another seed are
    # scored on the same held-out cases
    split_seed: int = 0
    # folds of one's own instead of seeded ones: a JSON file shaped as nnU-Net's
    # splits_final.json ([{"train": [...], "val": [...]}, ...]); `folds` is then its length
    splits_file: str | None = None
    # fine-tuning (nnU-Net's -pretrained_weights): the weights a new run starts from, a run
    # folder (its fold_0's best weights), RUN/fold_K, a model archive of medseg export (its
    # lowest fold's) or a .safetensors file; every tensor but the segmentation heads is
    # loaded (medseg.pretrained), a resume never loads it again
    init: str | None = None


@dataclass(frozen=True)
class PredictConfig:
    """Sliding-window inference settings."""

    step: float = 0.5  # window step as a fraction of the patch; overlap = 1 - step
    sw_batch_size: int = 4
    tta: bool = False
    crop_foreground: bool = True  # windows cover only the body (CT) / nonzero region (MR)
    precision: str = "auto"  # auto | bf16 | fp32 | amp
    largest_component: list[int] = field(default_factory=list)  # label ids
    min_component_ml: dict[int, float] = field(default_factory=dict)  # label id -> ml


@dataclass(frozen=True)
class Workflow:
    """A whole workflow file, resolved."""

    name: str = "run"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


def load_workflow(path: str | Path | None, overrides: list[str] | None = None) -> Workflow:
    """Read a YAML workflow (or start from defaults when `path` is None), apply overrides."""
    raw: dict[str, Any] = {}
    source: str = str(path) if path is not None else "<defaults>"
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    source = _Source(source, overrides or [])
    workflow = _build(Workflow, raw, source, prefix="")
    _check_values(workflow, source)
    return _resolve_paths(workflow)


def keys_given(path: str | Path | None, overrides: list[str] | None = None) -> frozenset[str]:
    """The dotted keys (`plan.patch_size`) that a workflow file and its overrides give, null
    ones included: what the workflow says rather than leaves to a default. A section given
    whole counts as its keys."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides or []:
        _apply_override(raw, item)
    given: set[str] = set()
    for section, values in raw.items():
        if isinstance(values, dict):
            given.update(f"{section}.{key}" for key in values)
        else:
            given.add(str(section))
    return frozenset(given)


def workflow_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Workflow:
    """Build a Workflow from a plain dict (as saved in a run folder)."""
    return _build(Workflow, raw, source, prefix="")


def workflow_to_dict(workflow: Workflow) -> dict[str, Any]:
    """Plain-data form of a workflow, suitable for YAML or JSON."""
    return dataclasses.asdict(workflow)


def workflow_yaml(workflow: Workflow) -> str:
    """The resolved workflow as YAML text (what save_workflow writes)."""
    return yaml.safe_dump(workflow_to_dict(workflow), sort_keys=False)


def save_workflow(workflow: Workflow, path: Path) -> None:
    """Write the resolved workflow as YAML (atomically)."""
    atomic_write_text(path, workflow_yaml(workflow))


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML would
    let the second `train:` section replace the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, merged by PyYAML
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):  # `[a, b]: 1`: PyYAML fails on it unnamed
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain name, not a list or a mapping",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads `010` as 8, `0x10` as 16 and `1:30` as 90 (octal, hex, base 60): a workflow
# reads whole numbers as written in decimal, and anything else as text (that an integer key
# then refuses, and a text key keeps as written)
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeySafeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeySafeLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_UniqueKeySafeLoader.add_implicit_resolver(  # YAML 1.1's floats without the base-60 form
    _FLOAT_TAG, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    """Safe YAML, with the errors that PyYAML lets through as Python's own made YAML
    errors: a number of thousands of digits, or lists nested thousands deep."""
    try:
        return yaml.load(text, Loader=_UniqueKeySafeLoader)
    except ValueError as exc:  # int() of more than 4300 digits, a date such as 2024-13-45
        raise _plain_yaml_error(f"cannot read a value ({str(exc).split(':')[0]})") from exc
    except RecursionError:
        raise _plain_yaml_error("nested too deeply") from None


def _plain_yaml_error(problem: str) -> yaml.YAMLError:
    error = yaml.YAMLError(problem)
    error.problem = problem
    return error


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise MedsegError("a folder, not a workflow file", path)
    if not path.exists():
        raise MedsegError("workflow file not found", path)
    try:
        data = _load_yaml(read_user_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise MedsegError(f"not valid YAML{where}{': ' + problem if problem else ''}",
                          path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MedsegError("a workflow must be a mapping of sections", path)
    return data


def override_key(item: str) -> str:
    """The dotted key of a `key=value` override."""
    if "=" not in item:
        raise MedsegError(f"override '{item}' is not of the form key=value")
    return item.split("=", 1)[0].strip()


def _apply_override(raw: dict[str, Any], item: str) -> None:
    keys = override_key(item).split(".")
    text = item.split("=", 1)[1]
    node = raw
    for key in keys[:-1]:
        if node.get(key) is None:  # absent, or a section whose keys are all commented out
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise MedsegError(f"override '{item}': '{key}' is not a section")
    value = _override_value(text, _hint_at(keys), item)
    last = _spelled_as_in(node, keys[-1])
    existing = node.get(last)
    if (dataclasses.is_dataclass(_hint_at(keys)) and isinstance(value, dict)
            and isinstance(existing, dict)):
        value = {**existing, **value}  # `train={seed: 1}` sets a key, as `train.seed=1` does
    node[last] = value


def _spelled_as_in(node: dict, key: str) -> Any:
    """`key` as the mapping spells it: YAML reads `1: liver` as the number 1, which
    `--set dataset.labels.1=kidney` names as the text '1' (and would add beside it)."""
    if key in node:
        return key
    return next((k for k in node if isinstance(k, int) and not isinstance(k, bool)
                 and str(k) == key), key)


# what YAML reads as null: an optional text key given one of these is unset
_YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _override_value(text: str, hint: Any, item: str) -> Any:
    """A `--set` value: YAML, except that a text key takes the text as written (unless
    quoted): `dataset.path=2024.10` names a folder, not the number 2024.1, and YAML would cut
    `runs/my #2` at its comment and refuse `@scans` or `%data`."""
    stripped = text.strip()
    if _takes_text(hint) and stripped[:1] not in ("'", '"'):
        return None if stripped in _YAML_NULLS else stripped
    try:
        return _load_yaml(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None)
        raise MedsegError(f"override '{item}': value is not valid YAML"
                          f"{': ' + problem if problem else ''}") from exc


def _takes_text(hint: Any) -> bool:
    """Whether a workflow key holds text: `str`, or `str | None`."""
    return hint is str or str in typing.get_args(hint)


def _hint_at(keys: list[str]) -> Any:
    """The type of the workflow key `keys` (section, name), or None for an unknown key."""
    hint: Any = Workflow
    for key in keys:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(key)
    return hint


class _Source(str):
    """The workflow file's name that also knows the `--set` options: a bad value is blamed on
    the option that set it, anything else on the file."""

    overrides: dict[str, str]

    def __new__(cls, file: str, overrides: list[str]) -> _Source:
        source = super().__new__(cls, file)
        source.overrides = {override_key(item): item for item in overrides}
        return source

    def of(self, *keys: str) -> str:
        """The --set options that gave `keys` (the key itself, a section holding it, or an
        entry of its mapping), else the file."""
        items = [item for overridden, item in self.overrides.items()
                 if any(overridden == key or key.startswith(f"{overridden}.")
                        or overridden.startswith(f"{key}.") for key in keys)]
        return " ".join(f"--set {item}" for item in items) if items else str(self)


def _origin(source: str, *keys: str) -> str:
    """Where workflow keys got their values: `source`, or the --set options over them."""
    return source.of(*keys) if isinstance(source, _Source) else source


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise MedsegError(f"section '{prefix.rstrip('.') or 'top level'}' must be a mapping",
                          _origin(source, prefix.rstrip(".")))
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # `3:` is a key of the file, too
    if unknown:
        where = f"{prefix}{unknown[0]}"
        raise MedsegError(
            f"unknown workflow key '{where}' (known here: {', '.join(sorted(known))})",
            _origin(source, where))
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            # a section whose keys are all commented out is empty; `train: false` is refused
            values[name] = _build(hint, {} if value is None else value, source,
                                  prefix=f"{key}.")
        else:
            values[name] = _coerce(value, hint, key, source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise MedsegError(f"'{key}' must be a list, got {value!r}", _origin(source, key))
        return [_coerce(v, args[0], key, source) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise MedsegError(f"'{key}' must be a mapping, got {value!r}", _origin(source, key))
        coerced = {_coerce(k, args[0], key, source): _coerce(v, args[1], key, source)
                   for k, v in value.items()}
        if len(coerced) < len(value):  # `1:` and `"1":` are one label id
            raise MedsegError(f"'{key}' gives one key twice, spelled two ways: "
                              f"{list(value)!r}", _origin(source, key))
        return coerced
    scalar = _SCALARS.get(hint)
    if scalar is None:
        return value
    try:
        return scalar(value)
    except _Unfit as unfit:
        raise MedsegError(f"'{key}' must be {unfit}, got {unfit.what}{_shown(value)}"
                          f"{unfit.hint}", _origin(source, key)) from None


def _shown(value: Any, most: int = 60) -> str:
    """A value as a message quotes it: a number of 400 digits is cut short."""
    text = repr(value)
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


class _Unfit(ValueError):
    """A scalar of the wrong kind: says what the key must be, and how to mend it."""

    def __init__(self, must_be: str, what: str = "", hint: str = ""):
        super().__init__(must_be)
        self.what = what
        self.hint = hint


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Unfit("true or false")


_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")  # the loader's whole numbers


def _as_int(value: Any) -> int:
    # text other than the loader's decimal form (a quoted key, '1') is another form: `010`
    # (YAML 1.1's octal 8) or `1_000`, which int() would read one way and YAML another
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        numeric = isinstance(value, str) and value.strip().lstrip("+-")[:1].isdigit()
        raise _Unfit("an integer (written in decimal, without leading zeros)"
                     if numeric else "an integer")
    return value


def _as_float(value: Any) -> float:
    # YAML 1.1 reads 3e-5 (no dot) as a string: a number written so is still a number
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Unfit("a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer of 400 digits
        raise _Unfit("a number") from None
    if not math.isfinite(number):
        raise _Unfit("a finite number")
    return number


def _as_str(value: Any) -> str:
    if isinstance(value, float):  # YAML read `path: 2024.10` as 2024.1
        raise _Unfit("text", what="the number ", hint="; put it in quotes")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Unfit("a string")
    return str(value)


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


_CHOICES = {
    ("dataset", "layout"): ("auto", "msd", "nnunet", "folders", "csv"),
    ("dataset", "modality"): ("auto", "CT", "MR"),
    ("plan", "network"): NETWORK_NAMES,
    ("train", "optimizer"): ("sgd", "adamw"),
    ("train", "schedule"): ("poly", "cosine", "constant"),
    ("train", "precision"): ("auto", "bf16", "fp32", "amp"),
    ("train", "cache"): ("auto", "memory", "disk"),
    ("predict", "precision"): ("auto", "bf16", "fp32", "amp"),
}


@dataclass(frozen=True)
class _Range:
    """Bounds of a numeric workflow value; an open bound excludes the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        # written so that NaN is refused too
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return bool(above and below)

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"above {self.low:g}" if self.low_open else f"at least {self.low:g}")
        if self.high is not None:
            parts.append(f"below {self.high:g}" if self.high_open else f"at most {self.high:g}")
        return " and ".join(parts)


_POSITIVE_INT = _Range(low=1)
_NOT_NEGATIVE = _Range(low=0)
_POSITIVE = _Range(low=0, low_open=True)
_PROBABILITY = _Range(low=0, high=1)
_SEED = _Range(low=0, high=2**32 - 1)  # NumPy's seeds
# upper bounds far beyond any real use, that catch a typo (100 000 loader processes, 10^8
# filters, 10^12 iterations) before it costs the machine
_WORKERS = _Range(low=0, high=256)
_SHIFT = _Range(low=0, high=256)
_FILTERS = _Range(low=1, high=4096)
_COUNT = _Range(low=1, high=10**7)

# every numeric key, so that a bad value stops at loading with the file named, not deep in
# training with a library's traceback (None, where a key allows it, is not checked)
_RANGES = {
    ("plan", "target_spacing"): _POSITIVE,
    ("plan", "patch_size"): _POSITIVE_INT,
    ("plan", "batch_size"): _POSITIVE_INT,
    ("plan", "max_patch_voxels"): _Range(low=16**3),  # plan.MIN_PATCH_AXIS along each axis
    ("plan", "base_filters"): _FILTERS,
    ("plan", "max_filters"): _FILTERS,
    ("augment", "flip_prob"): _PROBABILITY,
    ("augment", "shift_voxels"): _SHIFT,
    ("augment", "rotate_prob"): _PROBABILITY,
    ("augment", "rotate_degrees"): _Range(low=0, high=180),
    ("augment", "scale_prob"): _PROBABILITY,
    ("augment", "scale_range"): _Range(low=0, high=1, high_open=True),
    ("augment", "elastic_prob"): _PROBABILITY,
    ("augment", "elastic_magnitude"): _NOT_NEGATIVE,
    ("augment", "noise_prob"): _PROBABILITY,
    ("augment", "noise_std"): _NOT_NEGATIVE,
    ("augment", "smooth_prob"): _PROBABILITY,
    ("augment", "contrast_prob"): _PROBABILITY,
    ("augment", "intensity_shift_prob"): _PROBABILITY,
    ("augment", "gamma_prob"): _PROBABILITY,
    ("augment", "gamma_invert_prob"): _PROBABILITY,
    ("augment", "lowres_prob"): _PROBABILITY,
    ("train", "epochs"): _COUNT,
    ("train", "iterations_per_epoch"): _COUNT,
    ("train", "learning_rate"): _POSITIVE,
    ("train", "weight_decay"): _NOT_NEGATIVE,
    ("train", "val_every"): _POSITIVE_INT,
    ("train", "val_max_cases"): _NOT_NEGATIVE,  # 0: no validation
    ("train", "foreground_fraction"): _PROBABILITY,
    ("train", "label_smoothing"): _Range(low=0, high=1, high_open=True),
    ("train", "ema_decay"): _Range(low=0, high=1, high_open=True),
    ("train", "max_minutes"): _POSITIVE,
    ("train", "num_workers"): _WORKERS,
    ("train", "folds"): _Range(low=2),
    ("train", "fold"): _NOT_NEGATIVE,
    ("train", "seed"): _SEED,
    ("train", "split_seed"): _SEED,
    ("predict", "step"): _Range(low=0, high=1, low_open=True),
    ("predict", "sw_batch_size"): _POSITIVE_INT,
    ("predict", "largest_component"): _POSITIVE_INT,
}
_LENGTHS = {("plan", "target_spacing"): 3, ("plan", "patch_size"): 3}


def check_in_range(key: str, value: float | list | None, source: str) -> None:
    """Refuse a value out of the range of workflow key `key` ("section.name"), naming
    `source` (the workflow file, or the command-line option that set the value)."""
    allowed = _RANGES[tuple(key.split("."))]
    for item in value if isinstance(value, list) else [value]:
        if item is not None and not allowed.admits(item):
            raise MedsegError(f"'{key}' must be {allowed}, got {value}", _origin(source, key))


def _check_values(workflow: Workflow, source: str) -> None:
    _check_choices(workflow, source)
    _check_numbers(workflow, source)
    _check_labels(workflow, source)
    _check_relations(workflow, source)


def _check_choices(workflow: Workflow, source: str) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(workflow, section), key)
        if value not in allowed:
            raise MedsegError(
                f"'{section}.{key}' is {value!r}; choose one of {', '.join(allowed)}",
                _origin(source, f"{section}.{key}"))
    axes = workflow.plan.mirror_axes
    if any(axis not in (0, 1, 2) for axis in axes) or len(set(axes)) != len(axes):
        raise MedsegError(f"'plan.mirror_axes' must be distinct axes among 0, 1, 2, got {axes}",
                          _origin(source, "plan.mirror_axes"))


def _check_numbers(workflow: Workflow, source: str) -> None:
    for section, key in _RANGES:
        if (section, key) == ("train", "folds") and workflow.train.splits_file:
            continue  # the splits file decides, and one train/val split is a fine one
        check_in_range(f"{section}.{key}", getattr(getattr(workflow, section), key), source)
    for (section, key), length in _LENGTHS.items():
        value = getattr(getattr(workflow, section), key)
        if value is not None and len(value) != length:
            raise MedsegError(f"'{section}.{key}' must list {length} values (one per axis), "
                              f"got {value}", _origin(source, f"{section}.{key}"))


def _check_labels(workflow: Workflow, source: str) -> None:
    if workflow.dataset.labels:
        from medseg.datasets import ignore_label_problem, label_id_problem, label_name_problem

        # as training reads it: background may go unnamed
        labels = {0: "background", **workflow.dataset.labels}
        gap = label_id_problem(labels)
        # names first; an 'ignore' past a gap ({1: a, 2: b, 5: ignore}) is misplaced rather
        # than gapped; a gap otherwise (training's classes are 0..N-1)
        problem = (label_name_problem(labels) or ignore_label_problem(labels)
                   or (gap and f"label ids must run 0, 1, 2, ... without a gap: {gap}"))
        if problem:
            raise MedsegError(f"'dataset.labels': {problem}", _origin(source, "dataset.labels"))
    for label, ml in workflow.predict.min_component_ml.items():
        if not (_POSITIVE_INT.admits(label) and _NOT_NEGATIVE.admits(ml)):
            raise MedsegError("'predict.min_component_ml' maps label ids (at least 1) to ml "
                              f"(at least 0), got {label}: {ml}",
                              _origin(source, "predict.min_component_ml"))


def _check_relations(workflow: Workflow, source: str) -> None:
    """Values that are fine alone but not together."""
    if workflow.plan.max_filters < workflow.plan.base_filters:
        raise MedsegError(f"'plan.max_filters' ({workflow.plan.max_filters}) is below "
                          f"'plan.base_filters' ({workflow.plan.base_filters})",
                          _origin(source, "plan.max_filters", "plan.base_filters"))
    if workflow.train.fold >= workflow.train.folds and not workflow.train.splits_file:
        raise MedsegError(f"'train.fold' must be below 'train.folds' ({workflow.train.folds}), "
                          f"got {workflow.train.fold}",
                          _origin(source, "train.fold", "train.folds"))


def _resolve_paths(workflow: Workflow) -> Workflow:
    """Relative dataset, splits and init paths are taken from the current working directory."""
    if workflow.dataset.path:
        workflow = dataclasses.replace(workflow, dataset=dataclasses.replace(
            workflow.dataset, path=_absolute(workflow.dataset.path)))
    for key in ("splits_file", "init"):
        if getattr(workflow.train, key):
            workflow = dataclasses.replace(workflow, train=dataclasses.replace(
                workflow.train, **{key: _absolute(getattr(workflow.train, key))}))
    return workflow


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())
