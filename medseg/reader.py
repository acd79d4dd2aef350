"""MONAI's side of `read_volume`: an ImageReader for LoadImage(d), and the load step medseg's
chains use, so every format arrives as a MetaTensor with the same geometry metadata that
MONAI's NibabelReader gives (RAS affine, original_affine, spatial_shape) and Orientationd,
Spacingd and Invertd behave exactly as they do for NIfTI."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.data.utils import is_supported_format
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys

from medseg.errors import MedsegError
from medseg.io import (
    VOLUME_SUFFIXES,
    Volume,
    grid_mismatch,
    on_grid_of,
    read_volume,
    whole_label_values,
)


class MedsegReader(ImageReader):
    """Reads NIfTI, NRRD, MetaImage and DICOM series folders through `read_volume`."""

    def __init__(self, series_uid: str | None = None, resample_irregular: bool = False,
                 dtype: type | None = np.float32) -> None:
        super().__init__()
        self.series_uid = series_uid
        self.resample_irregular = resample_irregular
        self.dtype = dtype

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, str | Path) else list(filename)
        return all(Path(n).is_dir() for n in names) or is_supported_format(
            filename, [s.lstrip(".") for s in VOLUME_SUFFIXES])

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> Volume | list[Volume]:
        names = [data] if isinstance(data, str | Path) else list(data)
        volumes = [read_volume(n, self.dtype, self.series_uid, self.resample_irregular)
                   for n in names]
        return volumes[0] if len(volumes) == 1 else volumes

    def get_data(self, img: Volume | list[Volume]) -> tuple[np.ndarray, dict]:
        volumes = img if isinstance(img, list) else [img]
        first = volumes[0]
        for other in volumes[1:]:
            refuse_other_grid(other, first)
        meta = volume_meta(first)
        if len(volumes) == 1:
            return first.data, meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack([v.data for v in volumes]), meta


def refuse_other_grid(volume: Volume, reference: Volume) -> None:
    """Channels (and a label) of one case must share its first image's voxel grid: stacked
    as they are, anything else would pair voxels from different places."""
    mismatch = grid_mismatch(volume.geometry, reference.geometry)
    if mismatch:
        raise MedsegError(f"not on the grid of {reference.path.name}: {mismatch}", volume.path)


def volume_meta(volume: Volume) -> dict:
    """The metadata NibabelReader sets, from a Volume."""
    return {
        MetaKeys.AFFINE: volume.affine.copy(),
        MetaKeys.ORIGINAL_AFFINE: volume.affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(volume.spatial_shape),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
        ImageMetaKey.FILENAME_OR_OBJ: str(volume.path),
    }


class LoadVolumed(MapTransform):
    """Load each key's path (or an already read Volume) as a MetaTensor; every key must lie
    on the first key's grid (a `reorderable` key may store its voxels in another axis
    order). A `label_key`'s values must be whole numbers among `label_ids`. Unlike
    LoadImaged, a MedsegError is never swallowed by a fallback to other readers."""

    def __init__(self, keys: KeysCollection, dtype: type = np.float32,
                 series_uid: str | None = None, resample_irregular: bool = False,
                 reorderable: Sequence[str] = (), label_key: str | None = None,
                 label_ids: Collection[int] = ()) -> None:
        super().__init__(keys)
        # keys (the label) whose voxels may be stored in another axis order than the first
        # key's: reordered onto its grid; channels must share the grid as stored
        self.reorderable = frozenset(reorderable)
        self.dtype = dtype
        self.reader = MedsegReader(series_uid, resample_irregular, dtype)
        self.label_key, self.label_ids = label_key, frozenset(label_ids)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        reference = None
        for key in self.key_iterator(out):
            item = out[key]
            if isinstance(item, Volume):
                volume = item
            elif key == self.label_key:
                volume = self._read_label(str(item))
            else:
                volume = self.reader.read(str(item))
            first = volume[0] if isinstance(volume, list) else volume
            if reference is None:
                reference = first
            elif key in self.reorderable and not isinstance(volume, list):
                volume = on_grid_of(volume, reference)
            else:
                refuse_other_grid(first, reference)
            array, meta = self.reader.get_data(volume)
            out[key] = MetaTensor.ensure_torch_and_prune_meta(np.asarray(array, self.dtype),
                                                              meta)
        return out

    def _read_label(self, path: str) -> Volume:
        """The label checked as the fingerprint checks it: a resumed run reads its cases
        again without that pass, and a value past the classes failed deep in the loss ("index
        7 is out of bounds", no file named) or a fractional one was rounded into a class."""
        volume = read_volume(path, None, self.reader.series_uid, self.reader.resample_irregular)
        stored = volume.data
        if stored.dtype.kind == "f" and stored.dtype != self.dtype:
            # float32 before the checks (ids below 2^24 are exact in it): a scaled header's
            # float64, kept through them, doubled the label's memory
            stored = stored.astype(self.dtype)
            volume = Volume(stored, volume.geometry, volume.path)
        data = whole_label_values(stored, volume.path, self.dtype, self.label_ids or None)
        return Volume(data, volume.geometry, volume.path)
