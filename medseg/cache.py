"""Where training keeps its preprocessed cases (`train.cache`), and the on-disk cache.

`memory`: MONAI's CacheDataset holds every case in RAM. `disk`: the deterministic part of
the training chain (preprocessing, padding to the patch, class indices) runs once per case
and is written to RUN_DIR/cache/ as plain .npy files (image float32 C x X x Y x Z, label as
a small integer type, the flat voxel indices of each class), beside a JSON manifest that ties
them to the plan and to the case files' sizes and times. Training maps a case's files
(`np.load(mmap_mode="r")`) and copies out only the patch that MONAI's random crop chose, so
a process holds about a patch per case it reads, not the case.

MONAI's PersistentDataset is not used: it writes each case with torch.save (a pickle, which
medseg never loads for data) and loads the whole case back for every patch, so its memory
per sample is a case, not a patch."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai import transforms as mt
from monai.utils import fall_back_tuple
from tqdm import tqdm

from medseg.errors import MedsegError, one_line
from medseg.fileio import atomic_path, atomic_write_json
from medseg.plan import GB, resampled_shapes
from medseg.stopping import raise_if_stopped
from medseg.transforms import (
    IMAGE,
    INDICES_POSTFIX,
    LABEL,
    SAMPLES_PER_CLASS,
    case_dict,
    padded_crop_box,
)

if TYPE_CHECKING:
    from medseg.datasets import Case
    from medseg.plan import Plan

CACHE_FOLDER = "cache"  # in the run folder, shared by its folds
MANIFEST = "manifest.json"
FORMAT = 1  # of the files and the manifest; another number rebuilds the cache
# `auto` caches in memory while the estimate (times the processes on this machine) stays
# under this share of the machine's memory: the rest is for the network, the batches, the
# validation's sliding window and everything else running there
MEMORY_SHARE = 0.5
INDICES_KEY = LABEL + INDICES_POSTFIX
ENTRY_KEYS = {"sources", "stem", "files", "shape", "counts", "box"}  # of a manifest's case
SPARE_SHARE = 0.1  # free space kept beyond the cache's estimate
# what a cached case passes through: a change in any of them prepares the cases again
PREPROCESSING_MODULES = ("transforms.py", "reader.py", "io.py", "itkio.py", "dicom.py",
                         "dicom_frames.py", "dicom_resample.py", "cache.py")
PREPROCESSING_LIBRARIES = ("monai", "torch", "numpy", "nibabel", "SimpleITK", "pydicom")


def choose_cache(requested: str, estimate: float | None, memory: int | None,
                 processes: int = 1) -> tuple[str, str]:
    """`train.cache` resolved: (memory or disk, why). `auto` is memory while `processes`
    copies of the estimated cache stay under MEMORY_SHARE of the machine's memory, disk
    otherwise; memory when either figure is unknown (as before there was a disk cache)."""
    if requested != "auto":
        return requested, f"train.cache is {requested}"
    if estimate is None or memory is None:
        return "memory", "the size of the cache is unknown"
    need = estimate * processes
    each = f" ({processes} processes, a copy each)" if processes > 1 else ""
    if need < MEMORY_SHARE * memory:
        return "memory", f"the cases take about {need / GB:.3g} GB{each}"
    return "disk", (f"the cases would take about {need / GB:.3g} GB of memory{each}, more "
                    f"than {MEMORY_SHARE:.0%} of this machine's {memory / GB:.3g} GB")


# about how many copies of a case (float32 channels and label at the plan's spacing) a thread
# holds while it prepares one: the read volume, its resampled and padded forms, the indices
COPIES_WHILE_PREPARING = 4


def build_threads(requested: int, shapes: list[list[float]] | None, channels: int,
                  memory: int | None) -> int:
    """How many cases to prepare at once: `requested` (train.num_workers), fewer when that
    many large cases would not fit in MEMORY_SHARE of the machine's memory: disk mode is
    chosen when memory is short, and each thread holds a case while it prepares it."""
    if not shapes or memory is None:
        return max(1, requested)
    largest = max(float(np.prod(shape)) for shape in shapes) * 4 * (channels + 1)
    fitting = int(MEMORY_SHARE * memory // (COPIES_WHILE_PREPARING * largest))
    return max(1, min(requested, fitting))


def fingerprint_shapes(run_dir: Path, plan: Plan) -> list[list[float]] | None:
    """The run's cases at the plan's spacing, from its fingerprint.json (None without one)."""
    try:
        data = json.loads((run_dir / "fingerprint.json").read_text(encoding="utf-8"))
        return resampled_shapes(data["spacings"], data["shapes"], plan.target_spacing)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def split_chain(chain: mt.Compose) -> tuple[mt.Compose, mt.Compose]:
    """The deterministic head of a chain and the rest, split where MONAI's CacheDataset
    splits it (the first random transform, or the first that is not a Transform)."""
    first = chain.get_index_of_first(
        lambda t: isinstance(t, mt.RandomizableTrait) or not isinstance(t, mt.Transform))
    first = len(chain.transforms) if first is None else first
    return mt.Compose(chain.transforms[:first]), mt.Compose(chain.transforms[first:])


class PatchFromFilesd(mt.Randomizable, mt.MapTransform):
    """MONAI's RandCropByLabelClassesd for a case read as memory maps: MONAI draws the
    centres (the crop's own randomize: the same draws as in memory) and computes the box
    (SpatialCrop), and only that box is copied out of the files, as float32.

    Given the memory maps, RandCropByLabelClassesd itself copies nothing (measured: 4 MB
    more resident for a 64^3 patch of a 256^3 case), but its patches are views into the
    read-only file mapping: they keep the whole case mapped for as long as they live,
    would crash an in-place transform, and keep the label's integer type, where the
    memory cache has float32 (the transforms after it would not do the same)."""

    def __init__(self, crop: mt.RandCropByLabelClassesd) -> None:
        mt.MapTransform.__init__(self, crop.keys)
        self.crop = crop

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> PatchFromFilesd:
        super().set_random_state(seed, state)
        self.crop.set_random_state(seed, state)
        return self

    def randomize(self, data: dict) -> None:
        self.crop.randomize(data[self.crop.label_key], data[self.crop.indices_key], None)

    def __call__(self, data: dict) -> list[dict]:
        self.randomize(data)
        rest = {key: value for key, value in data.items() if key != self.crop.indices_key}
        shape = data[self.crop.label_key].shape[1:]
        roi = fall_back_tuple(self.crop.cropper.spatial_size, shape)
        # the larger crop a rotation needs (ForegroundOversampledCropd), padded as in memory
        size = list(getattr(self.crop, "crop_size", roi))
        patches = []
        for center in self.crop.cropper.centers:
            if size == list(roi):
                box = mt.SpatialCrop(roi_center=tuple(center), roi_size=roi).slices
                border = None
            else:
                box, border = padded_crop_box([int(c) for c in center], size, shape)
            patch = dict(rest)
            for key in self.key_iterator(rest):
                voxels = np.array(rest[key][(slice(None), *box)], dtype=np.float32)
                if border is not None and any(map(any, border)):
                    voxels = np.pad(voxels, [(0, 0), *border])
                patch[key] = torch.from_numpy(voxels)
            patches.append(patch)
        return patches


def patches_from_files(random_chain: mt.Compose) -> mt.Compose:
    """The random part of the training chain with its first step, the class-balanced crop,
    reading from the files. It draws the same as in memory: Compose seeds its random steps
    in order, and the crop's seed goes on to the same RandCropByLabelClassesd."""
    first, *rest = random_chain.transforms
    if not isinstance(first, mt.RandCropByLabelClassesd):
        raise TypeError(f"the random chain starts with {type(first).__name__}, not the crop")
    return mt.Compose([PatchFromFilesd(first), *rest])


@dataclasses.dataclass(frozen=True)
class CachedCase:
    """One case's files in the cache. `box`: where the case lies in its padded arrays."""

    image: Path
    label: Path
    indices: Path
    shape: tuple[int, ...]  # the padded image's, channels first
    counts: tuple[int, ...]  # indices per class, in order
    box: tuple[tuple[int, int], ...]

    def mapped(self) -> dict:
        """The padded case as read-only memory maps, and the class indices; nothing is read
        but the headers until it is sliced."""
        image, label, flat = (_mapped(path) for path in (self.image, self.label, self.indices))
        if tuple(image.shape) != self.shape or tuple(label.shape) != (1, *self.shape[1:]):
            raise MedsegError(f"holds an array of another shape than the cache manifest's; "
                              f"delete {self.image.parent} to rebuild it", self.image)
        bounds = np.cumsum([0, *self.counts])
        return {IMAGE: image, LABEL: label,
                INDICES_KEY: [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]}

    def whole(self) -> dict:
        """The case as preprocessing left it (without the padding), in memory: validation."""
        arrays = self.mapped()
        box = (slice(None), *(slice(a, b) for a, b in self.box))
        return {IMAGE: torch.from_numpy(np.array(arrays[IMAGE][box])),
                LABEL: torch.from_numpy(np.array(arrays[LABEL][box]))}


def _mapped(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # EOFError: emptied since it was listed
        why = one_line(str(exc)).split(". ")[0][:200] or type(exc).__name__
        if "pickled" in why:  # numpy's reading of any file without the .npy magic, with
            # advice to load it "unsafely" (pickle), against the project's rule
            why = "not a NumPy array file: damaged or overwritten"
        raise MedsegError(f"cannot read this file of the disk cache ({why}); delete "
                          f"{path.parent} to rebuild it", path) from exc


class DiskPatches(torch.utils.data.Dataset):
    """Training samples: a case's memory maps through the random chain (its first step the
    crop from the files). Like CacheDataset, its one random attribute is `transform`, which
    the epoch's reseeding and MONAI's worker seeding (set_rnd) find alike."""

    def __init__(self, cases: list[CachedCase], transform: mt.Compose) -> None:
        self.transform = transform
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int):
        return self.transform(self.cases[index].mapped())


class DiskCases:
    """Validation cases read from the cache one at a time, as they are scored."""

    def __init__(self, cases: list[CachedCase]) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[dict]:
        for case in self.cases:
            yield case.whole()


class DiskCache:
    """RUN_DIR/cache: the manifest and the case files it lists. Only one process writes it
    (rank 0, under the run folder's lock); the others read it once it is complete."""

    def __init__(self, folder: Path, key: str, root: Path) -> None:
        self.folder = folder
        self.key = key
        self.root = root  # the dataset's: case files are recorded relative to it
        self.manifest = folder / MANIFEST

    def entries(self) -> dict[str, dict]:
        """The manifest's cases, if it was written for this key (else none)."""
        try:
            data = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("key") != self.key:
            return {}
        cases = data.get("cases")
        return dict(cases) if isinstance(cases, dict) else {}

    def missing(self, cases: list[Case]) -> list[Case]:
        """The cases without a complete, current entry (their files changed, or some of
        their cache files are missing or of another size)."""
        entries = self.entries()
        return [case for case in cases
                if not self._current(entries.get(case.name), case)]

    def _current(self, entry: dict | None, case: Case) -> bool:
        if not isinstance(entry, dict) or not ENTRY_KEYS <= entry.keys():
            return False
        if entry["sources"] != _sources(case, self.root) or not _well_formed(entry, case):
            return False
        try:
            return all((self.folder / name).stat().st_size == size
                       for name, size in entry["files"].items())
        except (OSError, KeyError, AttributeError):
            return False

    def tidy(self) -> None:
        """Make the folder; remove what a killed build left (temporary files), and case
        files that the manifest does not list (a changed plan's, a case gone)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        listed = {name for entry in self.entries().values() if isinstance(entry, dict)
                  for name in entry.get("files", {})}
        if not listed:  # a manifest of another plan, or none: start afresh
            self.manifest.unlink(missing_ok=True)
        for path in self.folder.iterdir():
            stale = path.name.startswith(".") and ".part" in path.name
            if path.is_file() and (stale or (path.suffix == ".npy" and path.name not in listed)):
                path.unlink(missing_ok=True)

    def refuse_without_space(self, needed: float, count: int) -> None:
        """Refuse, naming the folder, when its disk has less free space than `needed`."""
        free = shutil.disk_usage(self.folder).free
        if needed * (1 + SPARE_SHARE) > free:  # checkpoints and the rest need room too
            raise MedsegError(f"the disk cache of {count} case(s) needs about "
                              f"{needed / GB:.3g} GB and its disk has {free / GB:.3g} GB free: "
                              f"free some space or put the run folder on a larger disk",
                              self.folder)

    def build(self, cases: list[Case], prepare: Callable[[Case], dict], workers: int,
              after_each: Callable[[], None] | None = None, progress: bool = True) -> None:
        """Prepare and write each case (`workers` at a time), adding it to the manifest as
        soon as its files are in place; `after_each` runs after each case (the other ranks'
        barrier)."""
        entries = self.entries()
        bar = tqdm(total=len(cases), desc="disk cache", unit="case", disable=not progress)
        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        pending: set = set()
        try:
            pending = {pool.submit(self._write_case, case, prepare) for case in cases}
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    self._record(entries, *self._written(future))
                    bar.update(1)
                    if after_each is not None:
                        after_each()
                raise_if_stopped()  # after recording: a case written by then is kept
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            self._record_finished(entries, pending)

    def _record(self, entries: dict, name: str, entry: dict) -> None:
        entries[name] = entry
        atomic_write_json(self.manifest, {"format": FORMAT, "key": self.key, "cases": entries})

    def _record_finished(self, entries: dict, futures: set) -> None:
        """After a stop: the cases that finished while the pool wound down are kept too."""
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._record(entries, *future.result())

    def _written(self, future) -> tuple[str, dict]:
        """A case's manifest entry, once written; a disk that filled up (or any other
        failure to write) is named with the cache folder."""
        try:
            return future.result()
        except OSError as exc:
            raise MedsegError(f"cannot write the disk cache ({exc.strerror or exc}); the "
                              f"cases written so far are kept", self.folder) from exc

    def _write_case(self, case: Case, prepare: Callable[[Case], dict]) -> tuple[str, dict]:
        sources = _sources(case, self.root)  # before reading: a file changed meanwhile rebuilds
        arrays = prepare(case)
        stem = _stem(case.name)
        files = {}
        for part in ("image", "label", "indices"):
            name = f"{stem}.{part}.npy"
            with atomic_path(self.folder / name) as tmp, tmp.open("wb") as handle:
                np.save(handle, arrays[part], allow_pickle=False)
            files[name] = (self.folder / name).stat().st_size
        return case.name, {"sources": sources, "stem": stem, "files": files,
                           "shape": list(arrays["image"].shape), "counts": arrays["counts"],
                           "box": arrays["box"]}

    def cached(self, cases: list[Case]) -> list[CachedCase]:
        """The cached cases, in order; refused (naming the manifest) when one is missing."""
        entries = self.entries()
        absent = [case.name for case in cases if case.name not in entries]
        if absent:
            raise MedsegError(f"lists no cached case {absent[0]} (of {len(absent)}); delete "
                              f"{self.folder} to rebuild it", self.manifest)
        cached = [self._cached(entries[case.name]) for case in cases]
        for case in cached:  # every header read here, in this process: a damaged file is
            case.mapped()  # named now, not from inside a loader worker during training
        return cached

    def _cached(self, entry: dict) -> CachedCase:
        stem = entry["stem"]
        return CachedCase(self.folder / f"{stem}.image.npy", self.folder / f"{stem}.label.npy",
                          self.folder / f"{stem}.indices.npy", tuple(entry["shape"]),
                          tuple(entry["counts"]), tuple(tuple(b) for b in entry["box"]))


def cache_key(plan: Plan, deterministic: mt.Compose, pad_size: list[int]) -> str:
    """What the cached arrays depend on: the plan, the deterministic steps after
    preprocessing, the padded size, the indices kept per class, the format, the code that
    reads and preprocesses a case (medseg's own modules, hashed: a fix there must not leave
    a resumed run on arrays the memory cache would no longer make), and the versions of the
    libraries under it."""
    what = {"format": FORMAT, "plan": plan.to_json(), "pad": list(pad_size),
            "steps": [type(t).__name__ for t in deterministic.transforms],
            "samples_per_class": SAMPLES_PER_CLASS, "code": _code_digest(),
            "libraries": _library_versions()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _code_digest() -> str:
    """SHA-256 of the medseg modules a cached case passes through."""
    import medseg

    digest = hashlib.sha256()
    for module in PREPROCESSING_MODULES:
        digest.update((Path(medseg.__file__).parent / module).read_bytes())
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in PREPROCESSING_LIBRARIES}


def case_preparer(preprocess: mt.Compose, deterministic: mt.Compose, label_id_count: int
                  ) -> Callable[[Case], dict]:
    """The function that runs a case through preprocessing and the deterministic steps and
    returns its arrays as the cache stores them, with where the case lies in its padding."""
    label_type = (np.uint8 if label_id_count <= 2**8 else
                  np.uint16 if label_id_count <= 2**16 else np.int32)

    def prepare(case: Case) -> dict:
        item = preprocess(case_dict(case.images, case.label))
        own = np.asarray(item[IMAGE].shape[1:])  # the case's size, before any padding
        start = np.zeros(3, dtype=int)
        for step in deterministic.transforms:
            if isinstance(step, mt.SpatialPadd):  # the case moves by the padding before it
                before = step.padder.compute_pad_width(item[IMAGE].shape[1:])[1:]
                start += [int(b) for b, _ in before]
            item = step(item)
        indices = [_numpy(i).astype(np.int64).ravel() for i in item[INDICES_KEY]]
        return {"image": np.ascontiguousarray(_numpy(item[IMAGE]), dtype=np.float32),
                "label": np.ascontiguousarray(_numpy(item[LABEL]), dtype=label_type),
                "indices": np.concatenate(indices) if indices else np.zeros(0, np.int64),
                "counts": [len(i) for i in indices],
                "box": [[int(a), int(a + n)] for a, n in zip(start, own, strict=True)]}

    return prepare


def _well_formed(entry: dict, case: Case) -> bool:
    """A manifest entry as _write_case writes it for this case: its files named from the
    case (a hand-edited stem cannot point elsewhere), a 4-D shape, a count per class, a box
    of three [start, end] pairs."""
    stem = _stem(case.name)
    files = entry["files"]
    return (entry["stem"] == stem and isinstance(files, dict)
            and set(files) == {f"{stem}.{part}.npy" for part in ("image", "label", "indices")}
            and _whole_numbers(entry["shape"], 4) and _whole_numbers(entry["counts"])
            and isinstance(entry["box"], list) and len(entry["box"]) == 3
            and all(_whole_numbers(pair, 2) for pair in entry["box"]))


def _whole_numbers(values, length: int | None = None) -> bool:
    return (isinstance(values, list) and (length is None or len(values) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values))


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def disk_estimates(shapes: list[list[float]] | None, cases: list[Case], all_cases: list[Case],
                   plan: Plan, pad_size: list[int]) -> float:
    """About how many bytes the cache files of `cases` take: each case padded to the patch,
    float32 channels, a byte or two of label, the class indices. From the fingerprint's
    shapes (in the dataset's case order), or the plan's median shape without them."""
    label_bytes = 1 if plan.label_id_count <= 2**8 else 2
    if shapes is None or len(shapes) != len(all_cases):
        by_name = {}
    else:
        by_name = {case.name: shape for case, shape in zip(all_cases, shapes, strict=True)}
    total = 0.0
    for case in cases:
        shape = by_name.get(case.name, plan.median_shape)
        voxels = math.prod(max(math.ceil(s), p) for s, p in zip(shape, pad_size, strict=True))
        total += voxels * (4 * plan.in_channels + label_bytes)
        total += min(voxels, plan.num_classes * SAMPLES_PER_CLASS) * 8  # a class a voxel
    return total


def _sources(case: Case, root: Path) -> list[list]:
    """Each file of the case (a DICOM series folder: its files together) with its size and
    modification time: a changed one makes the case's entry stale."""
    stamps = []
    for path in (*case.images, *([case.label] if case.label else [])):
        path = Path(path)
        stamps.append([_relative(path, root), *_size_and_time(path)])
    return stamps


def _size_and_time(path: Path) -> tuple[int, int]:
    with contextlib.suppress(OSError):
        if path.is_dir():
            sizes, times = [], []
            for folder, _, names in os.walk(path):
                for name in names:
                    status = os.stat(os.path.join(folder, name))
                    sizes.append(status.st_size)
                    times.append(max(status.st_mtime_ns, status.st_ctime_ns))
            return sum(sizes), max(times, default=0)
        status = path.stat()
        # the change time too: `cp -p` and `rsync -a` put back the modification time of a
        # file they rewrote, and an uncompressed label keeps its size
        return status.st_size, max(status.st_mtime_ns, status.st_ctime_ns)
    return -1, -1


def _relative(path: Path, root: Path) -> str:
    """Relative to the dataset (which may move: `--resume --set dataset.path=`)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _stem(name: str) -> str:
    """A file name for a case: its name, made safe, and a digest of it, so that two names
    that differ only in case or in characters made safe never share files."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:80]
    return f"{safe}.{hashlib.sha256(name.encode()).hexdigest()[:8]}"
