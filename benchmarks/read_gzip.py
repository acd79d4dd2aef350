"""The cost of checking compressed data when reading: a .nii.gz (medseg reads the gzip
stream to its end in one pass, checking its CRC) against nibabel's plain read, and a
compressed .mha (medseg inflates the zlib data once to check it before SimpleITK reads it)
against SimpleITK's plain read; same files, same run.
Usage: python benchmarks/read_gzip.py [--slices 300] [--repeats 3]"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.io import read_volume


def ct_like(slices: int) -> np.ndarray:
    """A 512 x 512 CT-like int16 volume: air, a body ellipse of soft tissue, noise (so that
    it compresses like a real scan, about 3:1)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[-256:256, -256:256]
    body = (x / 200.0) ** 2 + (y / 150.0) ** 2 < 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    volume = np.repeat(plane[:, :, None], slices, axis=2)
    return volume + rng.normal(0, 20, volume.shape).astype(np.int16)


def best_of(repeats: int, read) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        volume = ct_like(args.slices)
        path = Path(folder) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
        plain = best_of(args.repeats,
                        lambda: np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))
        checked = best_of(args.repeats, lambda: read_volume(path))
        size = path.stat().st_size / 2**20
        print(f"512 x 512 x {args.slices} int16 .nii.gz ({size:.0f} MB): nibabel "
              f"{plain:.2f} s, medseg with the CRC checked {checked:.2f} s, ratio "
              f"{checked / plain:.2f}")
        mha = Path(folder) / "ct.mha"
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(mha), useCompression=True)
        plain = best_of(args.repeats, lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(mha))))
        checked = best_of(args.repeats, lambda: read_volume(mha, dtype=None))  # as stored
        size = mha.stat().st_size / 2**20
        print(f"512 x 512 x {args.slices} int16 compressed .mha ({size:.0f} MB): SimpleITK "
              f"{plain:.2f} s, medseg with the zlib data checked {checked:.2f} s, ratio "
              f"{checked / plain:.2f}")


if __name__ == "__main__":
    main()
