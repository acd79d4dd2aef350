"""What the duplicate-case digest adds to reading a case: training's fingerprint and
`medseg check` hash every image (and label) they read, to find a case that is another's copy.
Times medseg's read of a 512 x 512 x 300 int16 CT (.nii.gz, as float32 for training and as
stored for check) against io.voxels_digest of what was read; the fastest of 3 each.

    .venv/bin/python benchmarks/digest_cost.py
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.io import read_volume, voxels_digest

SHAPE = (512, 512, 300)


def fastest(work: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    ct = (rng.normal(40, 300, SHAPE)).clip(-1024, 3000).astype(np.int16)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(ct, np.diag([0.8, 0.8, 1.5, 1.0])), str(path))
        for what, dtype in (("training (float32)", np.float32), ("check (as stored)", None)):
            data = read_volume(path, dtype=dtype).data
            read = fastest(lambda dtype=dtype: read_volume(path, dtype=dtype))
            digest = fastest(lambda data=data: voxels_digest(data))
            print(f"{what:<20} read {read:.2f} s, digest {digest:.2f} s, "
                  f"digest / read {digest / read:.2f}")


if __name__ == "__main__":
    main()
