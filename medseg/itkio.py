"""NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) through SimpleITK.

ITK keeps geometry as LPS origin, direction cosines and spacing; medseg works with a
voxel -> RAS affine, so both directions of the conversion live here. Headers are read and
checked before any voxel is, so a file that claims too many voxels is refused unallocated.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.fileio import misnamed_format

# ITK's warnings go to the console past medseg's messages (which say what went wrong)
sitk.ProcessObject_SetGlobalWarningDisplay(False)

MAX_VOXELS = 2**31
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
FORMAT_NAMES = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}
# ITK picks its reader by the extension's exact case: named here, "SCAN.MHA" reads too
IMAGE_IOS = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO",
             ".mhd": "MetaImageIO"}


def read_itk_header(path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Spatial shape and voxel -> RAS affine, from the header alone."""
    return _header_geometry(_open(path), path)


def read_itk(path: Path, dtype: np.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels in (i, j, k) order and the voxel -> RAS affine."""
    reader = _open(path)
    shape, affine = _header_geometry(reader, path)
    if path.suffix.lower() in (".mha", ".mhd"):
        _check_metaimage_data(path, _voxel_bytes(reader))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        message = itk_message(exc)
        detached = path.suffix.lower() in (".mhd", ".nhdr")  # voxels in a file of their own
        if detached and "No such file" in message:
            raise MedsegError(f"cannot read voxel data: the header's data file is missing "
                              f"({message})", path) from exc
        if "encoding not available" in message:  # bzip2: NrrdIO is built without it
            raise MedsegError(f"cannot read voxel data: its NRRD encoding is not one ITK "
                              f"reads here ({message}); save it with raw or gzip encoding",
                              path) from exc
        raise MedsegError(f"cannot read voxel data: truncated or corrupt file ({message})",
                          path) from exc
    data = sitk.GetArrayViewFromImage(image).reshape(shape[::-1]).transpose(2, 1, 0)
    return np.array(data, dtype=dtype or data.dtype), affine


def _voxel_bytes(reader: sitk.ImageFileReader) -> int:
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID())).itemsize
    return int(np.prod(reader.GetSize(), dtype=np.int64)) * itemsize


def _check_metaimage_data(path: Path, expected: int) -> None:
    """Refuse a MetaImage whose voxel data is missing, short or damaged, naming the data
    file. ITK reads a short file after printing to the console, and inflates compressed data
    without checking zlib's checksum, so a damaged file would be read without a word."""
    fields, data_offset = _metaimage_header(path)
    if fields.get("BinaryData", "True").lower() != "true":
        return  # voxels written as text: ITK parses them
    element_file = fields.get("ElementDataFile", "LOCAL")
    if element_file.upper() == "LOCAL":
        data_path = path
    elif element_file.upper().startswith("LIST") or "%" in element_file:
        return  # one file per slice: ITK checks each
    else:
        # the header was decoded as Latin-1 (any byte reads); ITK takes the name's bytes as
        # the file system's (UTF-8 `patiënt.raw` is that file, not `patiÃ«nt.raw`)
        element_file = os.fsdecode(element_file.encode("latin-1"))
        data_path = path.parent / element_file
        data_offset = 0
        if not data_path.is_file():
            raise MedsegError(f"cannot read voxel data: the header's data file {element_file} "
                              f"is missing", path)
    with open(data_path, "rb") as handle:
        handle.seek(data_offset)
        if fields.get("CompressedData", "False").lower() == "true":
            found = _inflated_size(handle, data_path)
        else:
            # a HeaderSize skips bytes (or, -1, takes the file's last bytes): ITK checks
            found = (os.fstat(handle.fileno()).st_size - data_offset
                     if fields.get("HeaderSize") is None else None)
    if found is not None and found < expected:
        raise MedsegError(f"cannot read voxel data: {found} bytes where the header's size "
                          f"needs {expected} (cut short)", data_path)


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The header's `key = value` fields up to ElementDataFile (the last one), and the byte
    where the voxels start when they follow in the same file."""
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            offset += len(line)
            # MetaIO takes "key = value" and "key: value" alike
            key, _, value = (re.split("([=:])", line.decode("latin-1"), maxsplit=1)
                             + ["", ""])[:3]
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return fields, offset


def _inflated_size(handle, path: Path) -> int:
    """The size of zlib-compressed data read to its end, with zlib's checksum checked."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a zlib or a gzip stream, as ITK takes
    size = 0
    try:
        while chunk := handle.read(1 << 22):
            size += len(inflater.decompress(chunk))
            if inflater.eof:
                break
        size += len(inflater.flush())
    except zlib.error as exc:
        raise MedsegError(f"cannot read voxel data: the compressed data is damaged ({exc})",
                          path) from exc
    if not inflater.eof:
        raise MedsegError("cannot read voxel data: the compressed data is cut short", path)
    return size


def write_itk(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write (i, j, k) voxels with a voxel -> RAS affine as NRRD or MetaImage (compressed)."""
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    # SimpleITK takes native byte order only (a big-endian NIfTI's voxels are read as such)
    native = data.astype(data.dtype.newbyteorder("="), copy=False)
    image = sitk.GetImageFromArray(np.ascontiguousarray(native.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    sitk.WriteImage(image, str(path), useCompression=True)


def _open(path: Path) -> sitk.ImageFileReader:
    if path.suffix.lower() in (".mha", ".mhd"):
        _refuse_headerless_metaimage(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(IMAGE_IOS.get(path.suffix.lower(), ""))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        kind = FORMAT_NAMES.get(path.suffix.lower(), "image")
        why = misnamed_format(path, kind) or f"not a readable {kind} file ({itk_message(exc)})"
        raise MedsegError(why, path) from exc
    return reader


def _refuse_headerless_metaimage(path: Path) -> None:
    """A file named .mha/.mhd without MetaImage's NDims key: ITK's MetaImage library prints
    its parse errors straight to the console (no ITK switch silences them), then fails with a
    stale system error as its reason."""
    if not any(key == "ndims" for key in _header_keys(path, "=:", "elementdatafile")):
        raise MedsegError(misnamed_format(path, "MetaImage")
                          or "not a readable MetaImage file (its header has no NDims)", path)
    problem = _metaimage_field_problem(_metaimage_header(path)[0])
    if problem:
        raise MedsegError(f"not a readable MetaImage file ({problem})", path)


# MetaImage fields of one number per axis, or per axis squared; MetaIO prints its parse
# errors to the console and fails with "File cannot be read" where one holds too few
_PER_AXIS_FIELDS = ("DimSize", "ElementSpacing", "ElementSize", "Offset", "Position", "Origin",
                    "CenterOfRotation")
_PER_AXIS_SQUARED_FIELDS = ("TransformMatrix", "Rotation", "Orientation")


def _metaimage_field_problem(fields: dict[str, str]) -> str | None:
    """Which field of a MetaImage header holds too few numbers (or none) for its NDims, as
    MetaIO would fail to parse it; None when each has enough (ITK checks the rest)."""
    try:
        dimension = int(fields.get("NDims", ""))
    except ValueError:
        return f"its NDims '{fields.get('NDims', '')}' is not a whole number"
    if dimension < 1:
        return f"its NDims is {dimension}"
    needs = {key: dimension for key in _PER_AXIS_FIELDS}
    needs.update({key: dimension * dimension for key in _PER_AXIS_SQUARED_FIELDS})
    for key, count in needs.items():
        if key not in fields:
            continue
        values = fields[key].split()
        try:  # MetaIO reads a DimSize of "512.0" as 512
            parsed = [float(value) for value in values[:count]]
        except ValueError:
            return f"its {key} '{fields[key]}' is not {count} numbers"
        if len(parsed) < count:
            return (f"its {key} has {len(parsed)} value(s) where NDims {dimension} needs "
                    f"{count}")
    return None


_HEADER_BYTES = 1 << 22  # a text header ends long before: further bytes are voxels


def _header_lines(path: Path) -> Iterator[str]:
    """A text header's lines, within its first _HEADER_BYTES, read at most 64 KiB at a time
    (a binary file may hold no line break for megabytes)."""
    with open(path, "rb") as stream:
        while stream.tell() < _HEADER_BYTES and (raw := stream.readline(1 << 16)):
            yield raw.decode("latin-1")


def _header_keys(path: Path, separators: str, last_key: str) -> Iterator[str]:
    """The lower-case keys of a text header's `key = value` or `key: value` lines, up to
    `last_key`."""
    for line in _header_lines(path):
        key = re.split(f"[{re.escape(separators)}]", line.strip(), maxsplit=1)[0]
        yield key.strip().lower()
        if key.strip().lower() == last_key:
            return


# the NRRD spaces ITK places as they say (Teem reads them without case, "-" or spaces); it
# reads any other (scanner-xyz, 3D-right-handed) or none as LPS, which the file does not say
_PLACED_NRRD_SPACES = {"leftposteriorsuperior", "lps", "rightanteriorsuperior", "ras",
                       "leftanteriorsuperior", "las"}


def orientation_note(path: Path) -> str | None:
    """A NRRD header that names no anatomical space: where its voxels lie in the patient is
    not said (None for any other file)."""
    if path.suffix.lower() not in (".nrrd", ".nhdr"):
        return None
    space = _nrrd_fields(path).get("space")
    plain = re.sub("[^a-z]", "", (space or "").lower()).removesuffix("time")
    if plain in _PLACED_NRRD_SPACES:
        return None
    named = f"its NRRD space is '{space}'" if space else "its NRRD header names no space"
    return (f"{named}, not an anatomical one (left-posterior-superior, right-anterior-superior"
            f" or left-anterior-superior): medseg reads it as ITK does, as LPS; other tools may"
            f" not; check which is right")


def detached_data_files(path: Path) -> list[Path] | None:
    """The files other than an NRRD or MetaImage header that its voxels are read from (a
    detached header's data file): none for voxels in the file itself, or another format;
    None for a list or a pattern of files (`LIST`, `slice%03d.raw 1 40 1`)."""
    suffix = path.suffix.lower()
    if suffix in (".mha", ".mhd"):
        keys = (re.split("[=:]", line, maxsplit=1) for line in _header_lines(path))
        name = next((value[0].strip() for key, *value in keys
                     if value and key.strip() == "ElementDataFile"), "LOCAL")
        name = "" if name.upper() == "LOCAL" else name
    elif suffix in (".nrrd", ".nhdr"):
        fields = _nrrd_fields(path)
        name = fields.get("data file", fields.get("datafile", ""))
    else:
        return []
    if not name:
        return []
    if name.startswith("LIST") or "%" in name:  # as ITK and Teem tell them: capitals only
        return None
    # the header read as Latin-1: the name's bytes are the file system's (as ITK takes them)
    return [path.parent / os.fsdecode(name.encode("latin-1"))]


def _nrrd_fields(path: Path) -> dict[str, str]:
    """A NRRD header's `field: value` lines (up to the blank line that ends it)."""
    fields: dict[str, str] = {}
    lines = _header_lines(path)
    next(lines, None)  # NRRD000X
    for line in lines:
        if not line.strip():
            break
        key, colon, value = line.partition(":")
        if colon and not value.startswith("="):  # key:=value is a key/value pair
            fields[key.strip().lower()] = value.strip()
    return fields


def _header_geometry(reader: sitk.ImageFileReader,
                     path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    size = tuple(int(s) for s in reader.GetSize())
    if int(np.prod(size, dtype=np.int64)) > MAX_VOXELS:
        raise MedsegError(f"header claims {size} voxels, more than 2^31", path)
    if reader.GetNumberOfComponents() != 1:
        raise MedsegError(f"{reader.GetNumberOfComponents()} components per voxel; expected "
                          f"a scalar volume", path)
    if len(size) < 3 or any(s != 1 for s in size[3:]):
        raise MedsegError(f"expected a 3D volume, got shape {size}", path)
    dimension = len(size)
    spacing = np.array(reader.GetSpacing(), dtype=float)[:3]
    origin = np.array(reader.GetOrigin(), dtype=float)[:3]
    direction = np.array(reader.GetDirection(), dtype=float).reshape(dimension, dimension)
    direction = direction[:3, :3]
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise MedsegError(f"voxel spacing {spacing.tolist()} is zero, negative or NaN", path)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = origin
    if not np.all(np.isfinite(lps)) or abs(np.linalg.det(lps[:3, :3])) < 1e-12:
        raise MedsegError("direction or origin is singular or not finite", path)
    return size[:3], LPS_TO_RAS @ lps


def itk_message(exc: Exception) -> str:
    """ITK's last meaningful line ('... : trouble parsing sizes info'), without the file
    path and source location it repeats."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # "Reason: Success" is ITK printing a stale errno: no reason at all
    # ITK's "Reason:" line is the C library's last error, often one of an earlier call
    # ("Success", "Resource temporarily unavailable"): a reason only where nothing else is
    useful = [line for line in lines if not line.startswith(
        ("Exception thrown", "/", "itk::", "Reason: "))]
    text = (useful or lines or [type(exc).__name__])[-1]
    text = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", text)  # the reader's address
    return text.removeprefix("sitk::ERROR: ").removeprefix("[nrrd] ")
