"""The cost of `medseg predict --dicom-seg`: reading a CT series' headers, building the binary
DICOM SEG of a many-structure mask with highdicom and writing it, against writing the same
mask as the .nii.gz that predict writes anyway (same mask, same run). Both happen in
predict's writer thread, beside the network's work on the next case.
Usage: python benchmarks/dicom_seg.py [--slices 300] [--classes 42]"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_factory import axial_positions, write_series  # noqa: E402

from medseg.dicom_seg import build_seg, seg_source, write_seg  # noqa: E402
from medseg.io import Geometry, write_mask  # noqa: E402


def blob_mask(shape: tuple[int, int, int], classes: int) -> np.ndarray:
    """Structures as 80 x 80 x 60-voxel boxes at seeded places (later ones over earlier)."""
    rng = np.random.default_rng(0)
    mask = np.zeros(shape, np.uint8)
    for label in range(1, classes):
        x, y, z = (int(rng.integers(50, 450)), int(rng.integers(50, 450)),
                   int(rng.integers(0, shape[2])))
        mask[x - 40:x + 40, y - 40:y + 40, max(0, z - 30):z + 30] = label
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--classes", type=int, default=42, help="with background")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        write_series(folder, np.zeros((512, 512, args.slices), np.uint16),
                     axial_positions(args.slices))
        mask = blob_mask((512, 512, args.slices), args.classes)
        labels = {label: f"structure_{label}" for label in range(args.classes)}
        started = time.perf_counter()
        source = seg_source(folder, None, False)
        headers = time.perf_counter() - started
        geometry = Geometry(mask.shape, np.diag([0.7, 0.8, 2.5, 1.0]))
        started = time.perf_counter()
        write_mask(mask, geometry, Path(tmp) / "case.nii.gz")
        nifti = time.perf_counter() - started
        started = time.perf_counter()
        seg = build_seg(mask, source, labels)
        built = time.perf_counter() - started
        started = time.perf_counter()
        write_seg(seg, Path(tmp) / "case.seg.dcm")
        written = time.perf_counter() - started
        size = (Path(tmp) / "case.seg.dcm").stat().st_size / 2**20
        frames = int(seg.NumberOfFrames)
    seg_total = headers + built + written
    print(f"512 x 512 x {args.slices}, {args.classes - 1} structures: NIfTI mask {nifti:.1f} s; "
          f"SEG {seg_total:.1f} s (headers {headers:.1f}, build {built:.1f}, write "
          f"{written:.1f}; {frames} frames, {size:.0f} MB); ratio {seg_total / nifti:.1f}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
