"""A trained run packed into one zip file to hand to another site (`medseg export`), and
opened again by `medseg predict --model MODEL.zip`, as nnU-Net's
`nnUNetv2_export_model_to_zip` and `nnUNetv2_install_pretrained_model_from_zip` do.

The archive holds what prediction needs and nothing that names the training cases or the
training machine: plan.json, workflow.yaml with its local paths removed, each chosen fold's
best.safetensors (no pickle) and metrics.jsonl (the path of a fine-tuned run's initial weights
cut to the file's name), and medseg_model.json, a manifest with each
file's SHA-256. fingerprint.json and splits.json (case names), the training states and the
cache stay behind. Opening checks every member against the manifest, and the manifest's folds
against the archive's fold_K folders, before anything is read from it; a name outside the
expected set (`../x`, an absolute path) is refused."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import yaml

from medseg import __version__
from medseg.errors import MedsegError
from medseg.fileio import atomic_path, folders_removed_on_failure, sha256_of_file

MANIFEST = "medseg_model.json"
FORMAT = 1
BEST = "best.safetensors"
CHUNK = 1 << 20
MANIFEST_LIMIT = 1 << 20
# a member that unpacks to more than RATIO_LIMIT times its compressed size (past a floor
# that small files may reach) is a zip bomb: trained weights hardly compress, and the text
# files a few times; deflate reaches ~1000x on a run of one byte
RATIO_LIMIT, RATIO_FLOOR = 100, 1 << 20
# what writing the unpacked files may fail with, and reading an archive never does
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# the text files are read whole into memory (plan.json, workflow.yaml, metrics.jsonl)
TEXT_LIMIT = 64 << 20
# fold_K as train names it (not fold_01, which predict would not take for a fold)
MEMBER = re.compile(r"plan\.json|workflow\.yaml|fold_(0|[1-9][0-9]*)/(checkpoints/best"
                    r"\.safetensors|metrics\.jsonl)")
FOLDER = re.compile(r"fold_(0|[1-9][0-9]*)/(checkpoints/)?")
SHA256 = re.compile(r"[0-9a-f]{64}")
# workflow keys that name files of the training machine: no use elsewhere, and they may
# name a person (/home/jdoe/...)
LOCAL_PATHS = {("dataset", "path"): "", ("train", "init"): None, ("train", "splits_file"): None}


@dataclass(frozen=True)
class Exported:
    path: Path
    folds: tuple[int, ...]
    size: int


def export_run(run_dir: Path, target: Path, folds: list[int] | None = None,
               overwrite: bool = False) -> Exported:
    """Write `target` (a .zip) from the run folder: the chosen folds (default: every fold
    with best weights)."""
    from medseg.train import fold_folders

    _refuse_target(target, overwrite)
    for name in ("plan.json", "workflow.yaml"):
        if not (run_dir / name).is_file():
            raise MedsegError(f"not a medseg run folder (no {name})", run_dir)
    trained = {k: p for k, p in fold_folders(run_dir) if (p / "checkpoints" / BEST).is_file()}
    chosen = sorted(trained) if folds is None else sorted(set(folds))
    missing = [k for k in chosen if k not in trained]
    if missing or not chosen:
        raise MedsegError(f"no trained weights for fold(s) {missing}" if missing else
                          "no trained fold with checkpoints/best.safetensors", run_dir)
    _refuse_unreadable_run(run_dir, [trained[k] / "checkpoints" / BEST for k in chosen])
    sources = {"plan.json": run_dir / "plan.json"}
    for k in chosen:
        for part in (f"checkpoints/{BEST}", "metrics.jsonl"):
            if (trained[k] / part).is_file():
                sources[f"fold_{k}/{part}"] = trained[k] / part
    workflow = _shareable_workflow(run_dir / "workflow.yaml")
    try:
        with folders_removed_on_failure(target.parent):
            _write_archive(target, workflow, sources, chosen)
    except OSError as exc:  # a full disk; a file where a folder of the target should be
        source = next((path for path in sources.values()
                       if exc.filename and Path(exc.filename) == path), None)
        raise MedsegError(f"cannot {'read' if source else 'write'} ({exc.strerror or exc})",
                          source or target) from exc
    return Exported(target, tuple(chosen), target.stat().st_size)


def _refuse_unreadable_run(run_dir: Path, weights: list[Path]) -> None:
    """A plan.json or best weights that prediction cannot read (cut short, damaged, of
    another network) are refused here, not packed into an archive that another site then
    finds broken."""
    from medseg.model import create_model, network_mismatch, stored_shapes, weights_file_problem
    from medseg.plan import load_plan

    model = create_model(load_plan(run_dir / "plan.json"))
    for path in weights:
        problem = weights_file_problem(path)
        if problem:
            raise MedsegError(f"not readable as safetensors weights ({problem}): an archive "
                              f"of it could not be used", path)
        problem = network_mismatch(model, stored_shapes(path))
        if problem:
            raise MedsegError(f"these weights do not fit the network of {run_dir / 'plan.json'} "
                              f"({problem}): an archive of them could not be used", path)


def _refuse_target(target: Path, overwrite: bool) -> None:
    if not target.name.lower().endswith(".zip"):
        raise MedsegError("the model archive must be named .zip", target)
    if target.is_dir():
        raise MedsegError("a folder: the model archive is a file (give MODEL.zip in it)", target)
    if target.exists() and not overwrite:
        raise MedsegError("exists: --overwrite replaces it", target)


def _write_archive(target: Path, workflow: bytes, sources: dict[str, Path],
                   chosen: list[int]) -> None:
    """The archive written beside `target` and renamed onto it once whole."""
    digests = {"workflow.yaml": hashlib.sha256(workflow).hexdigest()}
    sizes = {"workflow.yaml": len(workflow)}
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("workflow.yaml", workflow)
        for name, path in sorted(sources.items()):
            # the digest and size of the bytes written: a fold still training appends to
            # its metrics.jsonl (and replaces its best weights) while the archive is written
            if name.endswith("metrics.jsonl"):
                data = _shareable_metrics(path)
                _refuse_large_text(name, len(data), path)
                zf.writestr(name, data)
                digests[name], sizes[name] = hashlib.sha256(data).hexdigest(), len(data)
            else:
                if not name.endswith(BEST):
                    _refuse_large_text(name, path.stat().st_size, path)
                digests[name], sizes[name] = _write_hashed(zf, path, name)
        manifest = {"format": FORMAT, "medseg_version": __version__, "folds": chosen,
                    "files": dict(sorted(digests.items())),
                    "sizes": dict(sorted(sizes.items()))}
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _refuse_large_text(name: str, size: int, path: Path) -> None:
    """A text file that opening the archive would refuse (_refuse_bombs) is refused here,
    not packed into an archive that no one can open."""
    if size > TEXT_LIMIT:
        raise MedsegError(f"{size / 2**20:.0f} MB, more than the {TEXT_LIMIT >> 20} MB a "
                          f"model archive's text file ({name}) may hold: an archive of it "
                          f"could not be opened", path)


def _shareable_metrics(path: Path) -> bytes:
    """A fold's metrics.jsonl with the path of the weights a fine-tuned run started from
    (its first record's init.source, a file of the training machine) cut to the file's
    name; its SHA-256 stays, to tell which weights they were."""
    lines = path.read_bytes().splitlines(keepends=True)
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:  # a half-written last line, or bytes that are not UTF-8
            continue
        init = record.get("init") if isinstance(record, dict) else None
        if isinstance(init, dict) and isinstance(init.get("source"), str):
            # either separator: a run trained on Windows may be exported elsewhere
            init["source"] = PureWindowsPath(init["source"]).name
            lines[i] = (json.dumps(record) + "\n").encode("utf-8")
    return b"".join(lines)


def _write_hashed(zf: zipfile.ZipFile, path: Path, name: str) -> tuple[str, int]:
    """Copy a file into the archive in blocks; the SHA-256 and size of what was copied."""
    # a time outside 1980..2107 (a copy that kept a time of 0) is clamped, not refused
    info = zipfile.ZipInfo.from_file(path, name, strict_timestamps=False)
    info.compress_type = zipfile.ZIP_DEFLATED
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as source, \
            zf.open(info, "w", force_zip64=info.file_size * 1.05 > zipfile.ZIP64_LIMIT) as sink:
        for block in iter(lambda: source.read(CHUNK), b""):
            digest.update(block)
            size += len(block)
            sink.write(block)
    return digest.hexdigest(), size


def _shareable_workflow(path: Path) -> bytes:
    """The run's workflow.yaml with the paths of the training machine emptied."""
    from medseg.config import load_workflow  # checks it as any reader would

    load_workflow(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    train = data.get("train")
    if isinstance(train, dict) and train.get("splits_file"):
        # a splits file of one train/val split saves folds: 1, valid only beside the file
        train["folds"] = max(int(train.get("folds") or 0), int(train.get("fold") or 0) + 1, 2)
    for (section, key), empty in LOCAL_PATHS.items():
        if isinstance(data.get(section), dict) and data[section].get(key):
            data[section][key] = empty
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(".zip")


def refuse_non_folder(run_dir: Path, archive_lacks: str) -> None:
    """Refuse a RUN_DIR that is no folder in one line: a missing one, a model archive (which
    lacks what the command needs: `archive_lacks`), or another file."""
    if run_dir.is_dir():
        return
    if not run_dir.exists():
        raise MedsegError("run folder not found", run_dir)
    if is_archive(run_dir):
        raise MedsegError(f"a model archive of `medseg export` holds no {archive_lacks}: give "
                          f"the run folder it was exported from", run_dir)
    raise MedsegError("not a folder: give the run folder (the one holding plan.json)", run_dir)


# the run folders of the archives open now, each with its archive: what the notes and the
# summary line name, not a temporary folder that is gone when they are read
_OPENED: dict[Path, Path] = {}
# and the SHA-256 of each of their files, as the manifest holds them (checked on unpacking)
_DIGESTS: dict[Path, dict[str, str]] = {}


def shown_as(run_dir: Path) -> str:
    """A run folder as the user gave it: the archive, for one unpacked by opened_model."""
    return str(_OPENED.get(Path(run_dir), run_dir))


@contextlib.contextmanager
def opened_model(archive: Path) -> Iterator[Path]:
    """The archive checked and unpacked into a temporary run folder (named as the archive),
    removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="medseg-model-") as folder:
        run_dir = Path(folder) / _stem(archive)
        _DIGESTS[run_dir] = unpack(archive, run_dir)
        _OPENED[run_dir] = archive
        try:
            yield run_dir
        except MedsegError as exc:
            raise _naming_archive(exc, run_dir, archive) from exc
        finally:
            _OPENED.pop(run_dir, None)
            _DIGESTS.pop(run_dir, None)


def file_sha256(path: Path) -> str:
    """A file's SHA-256: from the manifest of the archive its run folder was unpacked from
    (each member was checked against it), else read from the file."""
    for run_dir, digests in _DIGESTS.items():
        if run_dir in path.parents:
            digest = digests.get(path.relative_to(run_dir).as_posix())
            if digest is not None:
                return digest
    return sha256_of_file(path)


def _naming_archive(exc: MedsegError, run_dir: Path, archive: Path) -> MedsegError:
    """An error about a file of the unpacked run, naming the archive and its member instead
    of a temporary folder that is gone when the message is read."""
    text = str(exc)
    if exc.path is not None and (exc.path == run_dir or run_dir in exc.path.parents):
        member = exc.path.relative_to(run_dir).as_posix()
        text = text[len(str(exc.path)) + 2:]
        text = f"{member}: {text}" if member != "." else text
    if str(run_dir) not in text and text == str(exc):
        return exc
    return MedsegError(text.replace(str(run_dir), archive.name), archive)


def unpack(archive: Path, run_dir: Path) -> dict[str, str]:
    """Every member checked (name, manifest, SHA-256) before it is written under run_dir, a
    new folder (removed again when the archive is refused: none of the caller's); the
    SHA-256 of each, by name."""
    run_dir.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            manifest = _manifest(zf, archive)
            names = [info.filename for info in zf.infolist() if not info.is_dir()]
            _refuse_unexpected_folders(zf, archive)
            _refuse_unexpected_members(names, manifest, archive)
            _refuse_other_folds(manifest, archive)
            _refuse_unexpected_sizes(zf, manifest, archive, run_dir)
            for name, expected in manifest["files"].items():
                target = run_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if _copy_hashed(zf, name, target) != expected:
                    raise MedsegError(f"{name} does not match its SHA-256 in {MANIFEST}: the "
                                      f"archive is damaged or was changed", archive)
            return dict(manifest["files"])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError,
            RuntimeError, NotImplementedError) as exc:  # encrypted; unknown compression
        shutil.rmtree(run_dir, ignore_errors=True)
        raise _unpack_failure(exc, archive, run_dir) from exc
    except MedsegError:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _unpack_failure(exc: Exception, archive: Path, run_dir: Path) -> MedsegError:
    """Why unpacking stopped: the archive, or the temporary folder it was written to (a full
    disk is no fault of the archive's)."""
    filename = Path(exc.filename) if isinstance(exc, OSError) and exc.filename else None
    if isinstance(exc, OSError) and (exc.errno in WRITE_ERRORS or filename is not None and (
            filename == run_dir or run_dir in filename.parents)):
        # the folder TMPDIR chose, not medseg-model-XXXX in it (gone when this is read)
        return MedsegError(f"cannot be unpacked into the temporary folder "
                           f"{run_dir.parent.parent} ({exc.strerror or exc}): set TMPDIR to "
                           f"another folder", archive)
    return MedsegError(f"not a readable model archive ({exc})", archive)


def _copy_hashed(zf: zipfile.ZipFile, name: str, target: Path) -> str:
    """Write a member to `target` in blocks; its SHA-256."""
    digest = hashlib.sha256()
    with zf.open(name) as source, open(target, "wb") as sink:
        for block in iter(lambda: source.read(CHUNK), b""):
            digest.update(block)
            sink.write(block)
    return digest.hexdigest()


def _refuse_unexpected_sizes(zf: zipfile.ZipFile, manifest: dict, archive: Path,
                             run_dir: Path) -> None:
    """A member whose unpacked size differs from the manifest's (zipfile reads no further
    than the size the archive declares), or members that would not fit on the disk, are
    refused before any is unpacked: a small archive can declare gigabytes."""
    sizes = manifest["sizes"]
    declared = {info.filename: info.file_size for info in zf.infolist() if not info.is_dir()}
    for name in manifest["files"]:
        if declared.get(name) != sizes[name]:
            raise MedsegError(f"{name} unpacks to {declared.get(name)} bytes, and {MANIFEST} "
                              f"says {sizes[name]}: the archive is damaged or was changed",
                              archive)
    _refuse_bombs(zf, manifest, archive)
    # the members unpacked (as each was checked above, or as the archive declares them)
    total = sum(declared[name] for name in manifest["files"])
    free = shutil.disk_usage(_existing_parent(run_dir)).free
    if total > free:
        raise MedsegError(f"unpacks to {total / 2**20:.0f} MB, more than the "
                          f"{free / 2**20:.0f} MB free in the temporary folder", archive)


def _refuse_bombs(zf: zipfile.ZipFile, manifest: dict, archive: Path) -> None:
    """A member that a small archive inflates far beyond itself, or a text file too large
    to be read whole, is refused before any is unpacked: its size and SHA-256 in the
    manifest prove only that whoever built the archive meant it."""
    for name in manifest["files"]:
        info = zf.getinfo(name)
        if not name.endswith(BEST) and info.file_size > TEXT_LIMIT:
            raise MedsegError(f"{name} unpacks to {info.file_size / 2**20:.0f} MB, more than "
                              f"a model archive's text file can be", archive)
        if info.file_size > max(RATIO_FLOOR, RATIO_LIMIT * info.compress_size):
            raise MedsegError(f"{name} unpacks to {info.file_size / 2**20:.0f} MB from "
                              f"{info.compress_size / 2**20:.1f} MB, more than "
                              f"{RATIO_LIMIT} times its compressed size: a zip bomb, not "
                              f"an archive of `medseg export`", archive)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _manifest(zf: zipfile.ZipFile, archive: Path) -> dict:
    try:
        if zf.getinfo(MANIFEST).file_size > MANIFEST_LIMIT:
            raise MedsegError(f"{MANIFEST} is larger than a manifest can be", archive)
        manifest = json.loads(zf.read(MANIFEST).decode("utf-8"))
    except KeyError as exc:
        raise MedsegError(f"no {MANIFEST}: not a model archive of `medseg export`",
                          archive) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsegError(f"{MANIFEST} is not valid JSON ({exc})", archive) from exc
    if not isinstance(manifest, dict) or type(manifest.get("format")) is not int \
            or manifest["format"] != FORMAT or not isinstance(manifest.get("files"), dict) \
            or not isinstance(manifest.get("sizes"), dict):
        raise MedsegError(f"{MANIFEST} is not of format {FORMAT} (an archive of another "
                          f"medseg version?)", archive)
    unsized = sorted(set(manifest["files"]) - set(manifest["sizes"]))
    if unsized:  # each member's size is checked before anything is unpacked
        raise MedsegError(f"{MANIFEST} gives no size for {unsized[0]}: not a model archive of "
                          f"format {FORMAT}", archive)
    _refuse_other_values(manifest, archive)
    return manifest


def _refuse_other_values(manifest: dict, archive: Path) -> None:
    """Each file's SHA-256 is 64 hexadecimal digits and its size a number of bytes: a size
    written as text ("1085") was refused as unpacking to 1085 bytes where it says 1085."""
    for name, digest in manifest["files"].items():
        if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            raise MedsegError(f"{MANIFEST} gives {name} a SHA-256 of {digest!r}, not 64 "
                              f"hexadecimal digits: not a model archive of format {FORMAT}",
                              archive)
        size = manifest["sizes"][name]
        if type(size) is not int or size < 0:
            raise MedsegError(f"{MANIFEST} gives {name} a size of {size!r}, not a number of "
                              f"bytes: not a model archive of format {FORMAT}", archive)


def _refuse_unexpected_folders(zf: zipfile.ZipFile, archive: Path) -> None:
    """Folder entries (as `zip -r` adds) of the folders a model archive has, and no other:
    none is unpacked, but a `../` or `/etc/` among them is no archive of `medseg export`."""
    for info in zf.infolist():
        if info.is_dir() and not FOLDER.fullmatch(info.filename):
            raise MedsegError(f"holds the folder {info.filename!r}, which no model archive "
                              f"holds", archive)


def _refuse_unexpected_members(names: list[str], manifest: dict, archive: Path) -> None:
    listed = set(manifest["files"])
    for name in [*names, *listed]:
        if name != MANIFEST and not MEMBER.fullmatch(name):
            raise MedsegError(f"holds {name!r}, which no model archive holds", archive)
    unlisted = sorted(set(names) - listed - {MANIFEST})
    absent = sorted(listed - set(names))
    if unlisted or absent:
        raise MedsegError(f"{MANIFEST} does not list the archive's files (unlisted: "
                          f"{unlisted}, absent: {absent})", archive)
    if len(names) != len(set(names)):
        raise MedsegError("holds a file twice", archive)
    for name in ("plan.json", "workflow.yaml"):
        if name not in listed:
            raise MedsegError(f"holds no {name}", archive)


def _refuse_other_folds(manifest: dict, archive: Path) -> None:
    """The manifest's folds are the archive's fold_K folders, each with its best weights:
    predict averages the folds it finds, so a fold lost from the archive (or one added to
    it) would silently change every mask."""
    folds = manifest.get("folds")
    if not isinstance(folds, list) or not folds or len(set(folds)) != len(folds) \
            or not all(type(k) is int and k >= 0 for k in folds):
        raise MedsegError(f"{MANIFEST} gives no list of folds (fold numbers, each once): not "
                          f"a model archive of format {FORMAT}", archive)
    held = {int(MEMBER.fullmatch(name).group(1)) for name in manifest["files"]
            if name.startswith("fold_")}
    weighted = {k for k in held if f"fold_{k}/checkpoints/{BEST}" in manifest["files"]}
    unlisted = sorted(held - set(folds))
    if unlisted:
        raise MedsegError(f"holds fold_{unlisted[0]}, which {MANIFEST} does not list among its "
                          f"folds {sorted(folds)}: the archive is damaged or was changed",
                          archive)
    absent = sorted(set(folds) - weighted)
    if absent:
        raise MedsegError(f"{MANIFEST} lists fold {absent[0]} of folds {sorted(folds)}, and the "
                          f"archive holds no fold_{absent[0]}/checkpoints/{BEST}: the archive "
                          f"is damaged or was changed", archive)


def _stem(archive: Path) -> str:
    """The unpacked run folder's name: the archive's, unless that names no folder of its own
    ("...zip" would unpack into the temporary folder's parent, and a refusal remove it)."""
    stem = archive.name[: -len(".zip")]
    return stem if stem not in ("", ".", "..") else "model"
