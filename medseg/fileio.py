"""Atomic writes (every output goes to a temporary name in its folder and is renamed), and
the one way user text files are read."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError


def read_user_text(path: Path) -> str:
    """A user's text file (workflow, dataset.json, CSV) as UTF-8 whatever the locale; a
    byte-order mark, as Windows editors write it, is dropped; another encoding is refused."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MedsegError(f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                          f"UTF-8", path) from exc
    except PermissionError as exc:
        raise MedsegError("cannot be read: permission denied", path) from exc


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    with _temporary_beside(target) as tmp:
        yield tmp
        os.replace(tmp, target)


@contextlib.contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """A temporary file beside `target` with the usual mode, removed on the way out unless
    renamed by then."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffixes, lower case, so that writers that pick a format by extension still
    # work: ITK writes a "D.MHA" as a header plus a separate data file, as if it were .mhd
    suffix = "".join(target.suffixes).lower()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{suffix}",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~PROCESS_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_texts(files: dict[Path, str]) -> None:
    """Write files that belong together (scores.csv, summary.json, report.html) as one: each
    to a temporary name first, then all renamed with Ctrl-C and SIGTERM held back, so that
    a stop leaves the old set or the new one, never a mix."""
    from medseg.stopping import signals_held

    with contextlib.ExitStack() as temporaries:
        written = {}
        for path, text in files.items():
            path = Path(path)
            if path.is_dir():  # found before any rename, not between two of them
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            try:
                tmp = temporaries.enter_context(_temporary_beside(path))
                tmp.write_text(readable(text), encoding="utf-8")
            except OSError as exc:  # named by the file it was for, not its temporary name
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            written[tmp] = path
        with signals_held():
            for tmp, path in written.items():
                os.replace(tmp, path)


def make_writable_folder(folder: Path) -> None:
    """Create an output folder and try writing in it before any work: a read-only folder
    would otherwise fail only once the work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise MedsegError(f"cannot write in the output folder ({exc.strerror or exc})",
                          folder) from exc


@contextlib.contextmanager
def output_folder(folder: Path, remove_if_empty: bool = True) -> Iterator[Path]:
    """Make an output folder (and check that it can be written) for the block; a folder made
    here that the block leaves empty (every case failed, or a stop before the first output)
    is removed again, with the parents made for it."""
    created = _make_folders(folder)
    make_writable_folder(folder)
    try:
        yield folder
    finally:
        if remove_if_empty:
            remove_empty_folders(created)


def _make_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents one at a time; the ones this call made,
    innermost first (not one another process made meanwhile, nor the parent that a `..` in
    the path names again)."""
    made = []
    for missing in reversed(missing_folders(folder)):
        try:
            missing.mkdir()
        except FileExistsError:
            continue
        except OSError:  # make_writable_folder names the problem
            break
        made.append(missing)
    return made[::-1]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders (innermost first) while they are empty."""
    for made in folders:
        try:
            made.rmdir()
        except OSError:  # not empty: the outputs, and the folders above them, stay
            return


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist (nor are links), innermost
    first."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def folders_removed_on_failure(folder: Path) -> Iterator[None]:
    """The missing folders up to `folder` that the body makes (for a file it writes there),
    removed again while empty when it fails (a full disk, Ctrl-C): a refused write leaves no
    empty folders behind; what another process put there stays."""
    made = missing_folders(folder)
    try:
        yield
    except BaseException:
        remove_empty_folders(made)
        raise


def names_fold_case(folder: Path) -> bool:
    """Whether the file system that `folder` (or its nearest existing parent) lies on takes
    `A` and `a` for one name, as macOS's and Windows' do by default: a probe file is made
    there and looked up in the other case. False where nothing can be written."""
    missing = missing_folders(folder)
    place = missing[-1].parent if missing else folder
    try:
        handle, probe = tempfile.mkstemp(prefix=".medseg-case-probe-", dir=place)
    except OSError:
        return False
    os.close(handle)
    try:
        other = Path(probe).with_name(Path(probe).name.swapcase())
        return other.exists()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def refuse_unwritable_place(path: Path) -> None:
    """Before any work, without creating anything: the nearest existing folder at or above
    `path` must take a file. A path under a file, a read-only mount or another user's
    folder would otherwise fail only when the results are written."""
    missing = missing_folders(path)
    place = missing[-1].parent if missing else path
    if not place.is_dir():
        raise MedsegError(f"cannot make the output folder: {place} is not a folder", path)
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as exc:
        raise MedsegError(f"cannot write in the output folder ({exc.strerror or exc}, in "
                          f"{place})", path) from exc


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, and setting it to 0 while
# another thread (prediction's reader or writer) creates a file would give that file mode 0666.
PROCESS_UMASK = _read_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(readable(text), encoding="utf-8")


def readable(text: str) -> str:
    """`text` as valid Unicode: the bytes of a file name that are not UTF-8 (a Latin-1 'é',
    kept by Python as lone surrogates) shown as \\xNN escapes, so that UTF-8 files and
    figures can hold the name."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name byte made
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_text(data: Any) -> str:
    """`data` as medseg's JSON files hold it: indented, ending in a newline."""
    return json.dumps(data, indent=2) + "\n"


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json_text(data))


def json_safe(data: Any) -> Any:
    """JSON has no NaN or infinity: write null instead."""
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, list):
        return [json_safe(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


# where a container's memory limit is (cgroup v2, then v1): Docker, Kubernetes and SLURM
# jobs see the whole host in sysconf and are killed at their limit
CGROUP_MEMORY_LIMITS = (Path("/sys/fs/cgroup/memory.max"),
                        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def sha256_of_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def physical_memory() -> int | None:
    """The memory this process may use, in bytes: the machine's, or its container's limit
    when lower (None where the system does not say)."""
    try:
        machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None
    limits = [machine]
    for path in CGROUP_MEMORY_LIMITS:
        with contextlib.suppress(OSError, ValueError):
            limits.append(int(path.read_text(encoding="ascii").strip()))  # "max": no limit
    return min(limits)


@contextlib.contextmanager
def lock_beside(folder: Path, suffix: str, busy: MedsegError) -> Iterator[bool]:
    """An exclusive lock for the block on `.NAME.SUFFIX` beside `folder` (NAME its real
    name: one folder reached through a link has one lock); a second process asking for it
    gets `busy`. Beside, not inside: a folder replaced whole keeps its lock, and an empty
    one stays empty. Parents made for the lock are removed again if the block leaves them
    empty. Yields whether a lock is held (none without fcntl, or on a filesystem without
    locks)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield False
        return
    real = folder.resolve()
    made = missing_folders(real.parent)
    try:
        with contextlib.ExitStack() as held:
            with contextlib.suppress(OSError):  # an unwritable place fails later, clearly
                real.parent.mkdir(parents=True, exist_ok=True)
            locked = hold_lock(held, real.parent / f".{real.name}.{suffix}", fcntl.LOCK_EX,
                               busy, remove=True)
            yield locked
    finally:
        for made_folder in made:  # innermost first; one the block wrote in is kept
            with contextlib.suppress(OSError):
                made_folder.rmdir()


def hold_lock(held: contextlib.ExitStack, path: Path, mode: int, busy: MedsegError,
              remove: bool = False) -> bool:
    """Take an flock on `path` (made if missing) until `held` closes; raise `busy` when
    another process holds it. A file unlinked by the run that held it, after this one opened
    it, is opened again: a lock on it would lock nothing. A filesystem without locks (some
    network mounts) goes without one (False). With `remove`, the file is unlinked while
    still locked, on the way out."""
    import fcntl

    for _ in range(10):
        try:
            handle = path.open("a", encoding="utf-8")
        except OSError:  # a place this process cannot write: what needs writing fails later
            return False
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise busy from exc
            return False
        if _same_file(handle, path):
            break
        handle.close()
    else:
        return False  # unlinked under it again and again: go without
    held.enter_context(handle)
    if remove:
        held.callback(path.unlink, missing_ok=True)
    return True


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except OSError:
        return False


# what a file's first bytes say it holds, and the name a reader needs for it
_NAMES_FOR = {"NIfTI": ".nii", "gzip-compressed NIfTI": ".nii.gz", "NRRD": ".nrrd",
              "MetaImage": ".mha", "DICOM": ".dcm"}


def content_format(path: Path) -> str | None:
    """The format a file's opening bytes show (a NIfTI, NRRD, MetaImage or DICOM file, or a
    gzip-compressed NIfTI), whatever its name says; None when none of them."""
    import gzip
    import zlib

    try:
        with open(path, "rb") as stream:
            head = stream.read(4096)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as stream:
                inner = stream.read(352)
            return "gzip-compressed NIfTI" if _nifti_header(inner) else None
    except (OSError, EOFError, zlib.error):
        return None
    if _nifti_header(head):
        return "NIfTI"
    if head.startswith(b"NRRD000"):
        return "NRRD"
    if head[128:132] == b"DICM":
        return "DICOM"
    if re.search(rb"^[ \t]*(?:ObjectType|NDims)[ \t]*[=:]", head, re.MULTILINE):
        return "MetaImage"
    return None


def _nifti_header(head: bytes) -> bool:
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    return ((348 in sizes and head[344:348] in (b"n+1\0", b"ni1\0"))
            or (540 in sizes and head[4:8] in (b"n+2\0", b"ni2\0")))


def misnamed_format(path: Path, expected: str) -> str | None:
    """'this is a NRRD file, not NIfTI: name it .nrrd' where the file's content is another
    format than its name (`expected`) says; None otherwise."""
    found = content_format(path)
    if found is None or found == expected or found.endswith(expected):
        return None
    advice = f"name it {_NAMES_FOR[found]}"
    if found == "DICOM":
        advice += " or give the folder of its series"
    return f"this is a {found} file, not {expected}: {advice}"
