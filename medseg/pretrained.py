"""Fine-tuning from a trained run: `medseg train --init SOURCE`, the workflow key `train.init`
(nnU-Net's `nnUNetv2_train ... -pretrained_weights FILE`).

SOURCE is a run folder made by `medseg train` (the best weights of its fold_0), one of its
fold_K folders, a model archive of `medseg export` (unpacked, checked against its manifest,
into a temporary folder of its own once per command, removed when it ends; its lowest
fold's weights), or a .safetensors file, read with safetensors (no pickle). The new run builds
its network from its own plan and takes every tensor of the source but the segmentation heads
(medseg.model.SEGMENTATION_HEADS), which keep their fresh initialization: the number of classes
may differ, nothing else. The plan keys that shape the network are taken from the source run's
plan.json where the workflow leaves them unset (adopt_source_network), so that the weights
fit; a network that still differs is refused before the run folder is written, in one line
naming the file, the first differing tensor and the `--set plan.KEY=VALUE` options that make
the plans agree. A resumed fold goes on from its own checkpoint and never reads SOURCE again.

Heavy imports (torch, MONAI) stay inside the functions.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.archive import is_archive
from medseg.errors import MedsegError, one_line
from medseg.fileio import sha256_of_file

if TYPE_CHECKING:
    import torch

    from medseg.config import Workflow
    from medseg.plan import Plan

SOURCES = ("a run folder made by `medseg train`, RUN/fold_K, a model archive of `medseg "
           "export` or a .safetensors file")
NO_FOLD = "no fold is trained"
# checkpoints that torch pickles: medseg does not unpickle them
PICKLED_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".model")
# the workflow keys that decide the network's shape, besides the dataset's channels:
# spacing and patch decide the levels, strides and kernels (as nnU-Net plans them)
NETWORK_KEYS = ("target_spacing", "patch_size", "base_filters", "max_filters", "res_block",
                "network")


@dataclass(frozen=True)
class InitSource:
    """The weights file train.init names, and the plan.json of the run it belongs to (None
    for a file that lies outside a run folder)."""

    weights: Path
    plan: Plan | None = None
    plan_path: Path | None = None
    archive: Path | None = None  # the model archive the run folder was unpacked from

    @property
    def file(self) -> Path:
        """The file the user named: the archive, or the weights."""
        return self.archive or self.weights

    @property
    def plan_file(self) -> Path | None:
        """plan.json as the user knows it (ARCHIVE/plan.json for an archive's)."""
        return None if self.plan_path is None else self.shown(self.plan_path)

    def shown(self, path: Path) -> Path:
        """A file of the source as the user knows it: ARCHIVE/MEMBER for an archive's."""
        return _shown(path, self.plan_path.parent, self.archive) if self.archive else path


def _shown(path: Path, run_dir: Path, archive: Path) -> Path:
    return archive / path.relative_to(run_dir) if run_dir in path.parents else path


# the model archives train.init opened, each unpacked once per command (every fold reads the
# same weights) and removed when it ends (medseg.cli.main calls close_archives), or at exit
_ARCHIVES = contextlib.ExitStack()
_UNPACKED: dict[tuple, Path] = {}


def close_archives() -> None:
    """Remove the archives train.init unpacked: a program that runs many commands (a
    notebook, the tests) keeps no unpacked copy, nor its name, past the command."""
    try:
        _ARCHIVES.close()
    finally:
        _UNPACKED.clear()


atexit.register(close_archives)


def resolve_init(text: str) -> InitSource:
    """The weights file of a train.init value, refused in one line naming the path when it
    is missing or cannot be read as safetensors."""
    from medseg.plan import load_plan

    path = Path(text)
    archive = None
    if path.is_dir():
        weights, run_dir = _weights_in_folder(path), _run_of_folder(path)
    elif is_archive(path) or _is_model_archive(path):
        archive, run_dir = path, _unpacked(path)
        weights = _lowest_fold_weights(run_dir)
    elif path.exists():
        weights, run_dir = path, _run_of_file(path)
    else:
        raise MedsegError(f"train.init: {_missing(path)}", path)
    problem = _unreadable(weights)
    if problem:
        raise MedsegError(f"train.init: not readable as safetensors weights ({problem})",
                          _shown(weights, run_dir, archive) if archive else weights)
    if run_dir is None:
        return InitSource(weights)
    try:
        plan = load_plan(run_dir / "plan.json")
    except MedsegError as exc:  # say why a plan.json beside the weights is read at all
        reason = str(exc)[len(str(exc.path)) + 2:] if exc.path is not None else str(exc)
        shown = _shown(exc.path, run_dir, archive) if archive and exc.path else exc.path
        raise MedsegError(f"train.init: the plan.json of the source run cannot be read "
                          f"({reason.replace(str(run_dir), str(archive))})", shown) from exc
    return InitSource(weights, plan, run_dir / "plan.json", archive)


def _unpacked(archive: Path) -> Path:
    """The archive's run folder, unpacked (and checked) on first use in this process; again
    for an archive replaced since."""
    from medseg.archive import opened_model

    stat = archive.stat()
    key = (str(archive.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _UNPACKED:
        _UNPACKED[key] = _ARCHIVES.enter_context(opened_model(archive))
    return _UNPACKED[key]


def _lowest_fold_weights(run_dir: Path) -> Path:
    """The best weights of an unpacked archive's lowest fold (fold 0 when it holds it): the
    archive holds no other files of a fold, and each of its folds has best weights."""
    from medseg.train import BEST_WEIGHTS, fold_folders

    return min(fold_folders(run_dir))[1] / "checkpoints" / BEST_WEIGHTS


def _is_model_archive(path: Path) -> bool:
    """A zip holding medseg_model.json (safetensors would call it 'header too large')."""
    import zipfile

    from medseg.archive import MANIFEST

    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _missing(path: Path) -> str:
    """Why a train.init path that does not exist is wrong: a fold the run lacks, or none."""
    if _fold_name(path.name) and _is_run(path.parent):
        return f"no such fold in this run ({_trained_folds(path.parent)})"
    return f"not found (train.init takes {SOURCES})"


def _weights_in_folder(path: Path) -> Path:
    """A run folder's fold_0 best weights, or a fold folder's."""
    from medseg.train import BEST_WEIGHTS

    if _is_run(path):
        weights = path / "fold_0" / "checkpoints" / BEST_WEIGHTS
        if not weights.is_file():
            trained = _trained_folds(path)
            advice = ("train it first, or give another source" if trained == NO_FOLD else
                      "give RUN/fold_K")
            raise MedsegError(f"train.init: this run has no fold_0/checkpoints/{BEST_WEIGHTS} "
                              f"({trained}): {advice}", path)
        return weights
    if _fold_name(path.name) and _is_run(path.parent):
        weights = path / "checkpoints" / BEST_WEIGHTS
        if not weights.is_file():
            raise MedsegError(f"train.init: this fold has no checkpoints/{BEST_WEIGHTS} "
                              f"({_trained_folds(path.parent)})", path)
        return weights
    raise MedsegError(f"train.init: a folder that is not a medseg run (no plan.json) nor one "
                      f"of its fold_K folders; train.init takes {SOURCES}", path)


def _run_of_folder(path: Path) -> Path:
    return path if _is_run(path) else path.parent


def _run_of_file(path: Path) -> Path | None:
    """The run folder of RUN/fold_K/checkpoints/FILE, else None."""
    parts = path.resolve().parents
    if (len(parts) >= 3 and parts[0].name == "checkpoints" and _fold_name(parts[1].name)
            and _is_run(parts[2])):
        return parts[2]
    return None


def _is_run(path: Path) -> bool:
    return (path / "plan.json").is_file()


def _fold_name(name: str) -> bool:
    from medseg.train import FOLD_FOLDER

    return FOLD_FOLDER.fullmatch(name) is not None


def _trained_folds(run_dir: Path) -> str:
    from medseg.train import BEST_WEIGHTS, fold_folders

    trained = [p.name for _, p in fold_folders(run_dir)
               if (p / "checkpoints" / BEST_WEIGHTS).is_file()]
    return f"trained: {', '.join(trained)}" if trained else NO_FOLD


def _unreadable(weights: Path) -> str | None:
    from medseg.model import weights_file_problem

    problem = weights_file_problem(weights)
    if problem and weights.suffix.lower() in PICKLED_SUFFIXES:
        problem += ("; medseg reads weights without pickle: save the state dict with "
                    "safetensors.torch.save_file")
    return problem


def adopt_source_network(workflow: Workflow, source: InitSource,
                         given: frozenset[str] | None, note: bool = True) -> Workflow:
    """The workflow with the network-shaping plan keys (NETWORK_KEYS) that it leaves unset
    (not in `given`, the keys its file and --set options give) taken from the source run's
    plan, so that the source's weights fit; a note names the keys that changed. Unchanged
    for a file outside a run folder, or with `given` None."""
    if source.plan is None or given is None:
        return workflow
    plan = source.plan
    values = {"target_spacing": list(plan.target_spacing), "patch_size": list(plan.patch_size),
              "base_filters": plan.filters[0], "res_block": plan.res_block,
              "network": plan.network}
    if plan.network == "dynunet":  # the cap is DynUNet's (segresnet doubles uncapped)
        values["max_filters"] = max(plan.filters)
    taken = {key: value for key, value in values.items()
             if f"plan.{key}" not in given and getattr(workflow.plan, key) != value}
    if note:
        _note_automatic_keys(workflow, source, given, values)
    base = taken.get("base_filters", workflow.plan.base_filters)
    if taken.get("max_filters", base) < base:  # the workflow's base_filters is above it
        del taken["max_filters"]
    if not taken:
        return workflow
    if note:
        keys = ", ".join(f"plan.{key}={_yaml(value)}" for key, value in taken.items())
        print(f"medseg: note: train.init: {keys} taken from {source.plan_file} so that "
              f"its weights fit (give a key in the workflow to plan it otherwise; `null` "
              f"for the automatic plan)", file=sys.stderr)
    return dataclasses.replace(workflow, plan=dataclasses.replace(workflow.plan, **taken))


def _note_automatic_keys(workflow: Workflow, source: InitSource, given: frozenset[str],
                         values: dict) -> None:
    """A workflow that gives a network key as null (a run's saved workflow.yaml lists every
    key so) plans it from the new data: say so, since the source's weights may then not
    fit, and the refusal that follows would not tell why."""
    automatic = [key for key in ("target_spacing", "patch_size") if f"plan.{key}" in given
                 and getattr(workflow.plan, key) is None and values.get(key) is not None]
    if automatic:
        keys = " and ".join(f"plan.{key}: null" for key in automatic)
        print(f"medseg: note: train.init: the workflow gives {keys} (as a run's saved "
              f"workflow.yaml does), so this dataset's plan decides, not {source.plan_file}; "
              f"leave the key out of the workflow to take the source's", file=sys.stderr)


def _yaml(value) -> str:
    """A value as `--set` takes it: [1, 2] without spaces, true/false in lower case."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


@dataclass
class _Transfer:
    """What a source file gives a network: each of the network's tensors to load, by its
    name, from the file's name; the file's head tensors skipped; and what does not fit."""

    loads: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    wrong: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, file's, ours
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def misfit(self) -> str | None:
        """Why the file does not fit, in a few words (None when it does)."""
        parts = []
        if self.wrong:
            name, theirs, ours = self.wrong[0]
            parts.append(f"{len(self.wrong)} tensor(s) of another shape (the first: {name}, "
                         f"{list(theirs)} in the file, {list(ours)} here)")
        if self.missing:
            parts.append(f"{len(self.missing)} tensor(s) of this network not in the file (the "
                         f"first: {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} tensor(s) of the file not in this network "
                         f"(the first: {self.unexpected[0]})")
        return ", ".join(parts) or None


def _transfer(model: torch.nn.Module, shapes: dict[str, tuple]) -> _Transfer:
    """Match the file's tensors (name -> shape) to the model's, heads left out, in the
    model's order (so that the first difference is the one nearest the input)."""
    from medseg.model import canonical_names, is_segmentation_head

    canonical = canonical_names(model)
    state = model.state_dict()
    ours: dict[str, tuple] = {}
    for name in state:
        ours.setdefault(canonical[name], tuple(state[canonical[name]].shape))
    theirs = {canonical.get(name, name): name for name in shapes}  # an alias: its tensor
    transfer = _Transfer()
    transfer.skipped = [name for name in shapes if is_segmentation_head(canonical.get(name, name))]
    for name, shape in ours.items():
        if is_segmentation_head(name):
            continue
        if name not in theirs:
            transfer.missing.append(name)
        elif tuple(shapes[theirs[name]]) != shape:
            transfer.wrong.append((name, tuple(shapes[theirs[name]]), shape))
        else:
            transfer.loads[name] = theirs[name]
    transfer.unexpected = [name for name in theirs if name not in ours
                           and not is_segmentation_head(name)]
    return transfer


def _shapes(source: InitSource) -> dict[str, tuple]:
    """The file's tensor shapes by name, from its header alone."""
    from medseg.model import stored_shapes

    try:
        return stored_shapes(source.weights)
    except Exception as exc:  # safetensors raises its own error types
        raise MedsegError(f"train.init: not readable as safetensors weights "
                          f"({one_line(str(exc))})", source.shown(source.weights)) from exc


def keep_source_topology(source: InitSource, plan: Plan, quiet: bool = False) -> Plan:
    """`plan` with the source run's levels, strides and kernels where the source was planned
    on the same spacing, patch and widths by an earlier medseg, whose rules differed (it
    pooled a lone axis of 8 to 11 voxels, and ran 3-wide kernels across a one-voxel axis):
    its weights keep fitting the network they were trained in."""
    old = source.plan
    if old is None or (old.kernels, old.strides) == (plan.kernels, plan.strides):
        return plan
    shorter, longer = sorted((old.filters, plan.filters), key=len)
    if (old.target_spacing, old.patch_size, old.network) != (
            plan.target_spacing, plan.patch_size, plan.network) or \
            longer[:len(shorter)] != shorter:
        return plan
    if not quiet:
        print(f"medseg: note: train.init: the levels, strides and kernels of "
              f"{source.plan_file} are kept ({len(old.strides)} levels; the planner now makes "
              f"{len(plan.strides)} of this spacing and patch), so that its weights fit",
              file=sys.stderr)
    return dataclasses.replace(plan, kernels=old.kernels, strides=old.strides,
                               filters=old.filters)


def refuse_unfit(source: InitSource, plan: Plan) -> None:
    """Refuse, before any training, a source whose weights do not fit the network of `plan`
    (heads aside): one line naming the file, the first differing tensor, how the plans
    differ and the --set options that make them agree."""
    from medseg.model import create_model

    shapes = _shapes(source)
    _refuse_misfit(source, shapes, _transfer(create_model(plan), shapes), plan)


def note_other_modalities(source: InitSource, plan: Plan, quiet: bool = False) -> None:
    """A note when the source run was trained on other modalities (an MR model fine-tuned on
    CT): its first layers learned another normalization's intensities, which fit, but from
    further away than nnU-Net's fine-tuning assumes."""
    if not quiet and source.plan is not None and source.plan.modalities != plan.modalities:
        print(f"medseg: note: train.init: {source.plan_file} was trained on "
              f"{', '.join(source.plan.modalities)}, this run on "
              f"{', '.join(plan.modalities)}: the weights load, but expect less from them",
              file=sys.stderr)


def _refuse_misfit(source: InitSource, shapes: dict[str, tuple], transfer: _Transfer,
                   plan: Plan) -> None:
    misfit = transfer.misfit()
    if misfit:
        raise MedsegError(f"train.init: these weights do not fit this run's network (heads "
                          f"aside): {misfit}; {_advice(source, shapes, plan)}",
                          source.shown(source.weights))


def load_init(model: torch.nn.Module, plan: Plan, text: str, main_rank: bool = True) -> dict:
    """Copy every tensor of train.init's weights but the segmentation heads into `model`
    (built from `plan`); returns what was loaded, for the fold's log (the file's SHA-256
    on the main rank alone, which writes the log)."""
    import torch
    from safetensors import safe_open

    source = resolve_init(text)
    shapes = _shapes(source)
    transfer = _transfer(model, shapes)
    _refuse_misfit(source, shapes, transfer, plan)
    state = model.state_dict()
    try:
        with safe_open(str(source.weights), framework="pt") as stored, torch.no_grad():
            for name, stored_name in transfer.loads.items():
                state[name].copy_(stored.get_tensor(stored_name))
    except Exception as exc:  # safetensors raises its own error types
        raise MedsegError(f"train.init: not readable as safetensors weights "
                          f"({one_line(str(exc))})", source.shown(source.weights)) from exc
    return {"source": str(source.file),
            "sha256": _sha256(source.file) if main_rank else None,
            "tensors_loaded": len(transfer.loads), "tensors_skipped": transfer.skipped}


def _sha256(path: Path) -> str:
    """The file's SHA-256, hashed once per train command for all its folds (weights of
    gigabytes take a while), again only for a file changed or replaced since."""
    stat = path.stat()
    return _sha256_of_version(str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                              stat.st_ctime_ns, stat.st_ino)


@functools.lru_cache(maxsize=4)
def _sha256_of_version(path: str, *version: int) -> str:
    return sha256_of_file(Path(path))


def describe(record: dict) -> str:
    """load_init's record as a line of the console."""
    from medseg.model import SEGMENTATION_HEADS

    heads = list(dict.fromkeys(SEGMENTATION_HEADS.match(name).group(1)
                               for name in record["tensors_skipped"]))
    skipped = len(record["tensors_skipped"])
    what = f" (segmentation heads: {', '.join(heads)})" if heads else ""
    return (f"initialized from {record['source']}: {record['tensors_loaded']} tensors loaded, "
            f"{skipped} skipped{what}")


def _advice(source: InitSource, shapes: dict[str, tuple], plan: Plan) -> str:
    """How the source's network differs from the plan's, and the --set options that make
    them agree: from the source run's plan.json, or read off the file's tensors."""
    theirs = _network_of_plan(source.plan) if source.plan else _network_of_file(shapes)
    ours = _network_of_plan(plan)
    where = "its run's plan.json" if source.plan else "the file"
    differences, options = [], []
    for key in ("network", "in_channels", "filters", "strides", "kernels", "res_block"):
        if theirs.get(key) is None or theirs[key] == ours[key]:
            continue
        differences.append(f"{key} {_yaml(theirs[key])} there, {_yaml(ours[key])} here")
        options += _options(key, theirs, source.plan)
    if not differences and source.plan:
        return ("its run's plan.json and this plan agree on the network's shape: the file "
                "does not hold what that plan builds")
    if not differences:
        return ("the file does not tell how its network differs: give the run folder it "
                "came from (RUN_DIR or RUN_DIR/fold_K), whose plan.json does")
    fix = (f": --set {' --set '.join(dict.fromkeys(options))} makes the plans agree"
           if options else "")
    channels = ("; no plan key changes the input channels (the dataset's): fine-tune on data of "
                "the source's channels" if theirs.get("in_channels") not in (None, ours[
                    "in_channels"]) else "")
    return f"{where} differs: {', '.join(differences)}{fix}{channels}"


def _options(key: str, theirs: dict, plan: Plan | None) -> list[str]:
    """The --set options that give this plan the source's `key`."""
    if key == "network":
        return [f"plan.network={theirs['network']}"]
    if key == "res_block":
        return [f"plan.res_block={_yaml(theirs['res_block'])}"]
    if key == "filters":
        capped = ([f"plan.max_filters={max(theirs['filters'])}"]
                  if theirs.get("network") == "dynunet" else [])
        return [f"plan.base_filters={theirs['filters'][0]}", *capped]
    if key in ("strides", "kernels") and plan is not None:
        return [f"plan.target_spacing={_yaml(plan.target_spacing)}",
                f"plan.patch_size={_yaml(plan.patch_size)}"]
    return []


def _network_of_plan(plan: Plan) -> dict:
    return {"network": plan.network, "in_channels": plan.in_channels,
            "filters": list(plan.filters), "strides": [list(s) for s in plan.strides],
            "kernels": [list(k) for k in plan.kernels], "res_block": plan.res_block}


def _network_of_file(shapes: dict[str, tuple]) -> dict:
    """What a weights file outside a run folder tells of its network: the input channels,
    filters and kernel sizes per level, read off each level's first convolution, and
    residual blocks ({} for a network medseg does not build)."""
    if "input_block.conv1.conv.weight" in shapes:  # DynUNet
        levels = sum(1 for name in shapes if name.endswith(".conv1.conv.weight")
                     and name.startswith("downsamples."))
        convs = ["input_block", *(f"downsamples.{i}" for i in range(levels)), "bottleneck"]
        firsts = [shapes.get(f"{conv}.conv1.conv.weight") for conv in convs]
        if any(shape is None for shape in firsts):
            return {}
        # a residual block projects its input where it strides (MONAI UnetResBlock's conv3)
        residual = any(name.startswith("downsamples.") and ".conv3." in name for name in shapes)
        return {"network": "dynunet", "in_channels": firsts[0][1],
                "filters": [shape[0] for shape in firsts],
                "kernels": [list(shape[2:]) for shape in firsts], "res_block": residual}
    first = shapes.get("encoder.conv_init.weight")
    if first is not None:  # SegResNetDS: a width doubled at every level
        levels = len({name.split(".")[2] for name in shapes
                      if name.startswith("encoder.layers.")})
        return {"network": "segresnet", "in_channels": first[1],
                "filters": [first[0] * 2**i for i in range(levels)]}
    return {}
