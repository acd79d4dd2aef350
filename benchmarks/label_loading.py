"""Cost of reading a training case's label, against an earlier revision of medseg, in one run.

    .venv/bin/python benchmarks/label_loading.py [--baseline df7b582] [--shape 512 512 300]
        [--repeats 3] [--label-dtype uint8|float32|scaled]

Since 2026-11-24 training's preprocessing reads the label as `read_label_map` does (whole
numbers checked, ids checked against the plan's, then float32) instead of as float32 rounded
by MONAI's AsDiscreted after resampling; a resumed run had no other check of its labels.
This script writes one synthetic 41-structure CT and its label (`--label-dtype`, gzip NIfTI) of
`--shape` at 0.8 x 0.8 x 1.5 mm, checks out `--baseline` into a temporary git worktree, and
times `preprocessing(plan, with_label=True)` on the case (reading, reorienting, resampling to
1.5 mm, normalizing) in fresh processes, alternating the two revisions; it prints the median
seconds, the peak RSS (VmHWM) of each, their ratio, and whether both give the same label.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib

REPO = Path(__file__).resolve().parents[1]
MEASURE = r"""
import hashlib, json, sys, time
from pathlib import Path
import numpy as np
from medseg.plan import Plan
from medseg.transforms import LABEL, case_dict, preprocessing

plan = Plan(target_spacing=[1.5, 1.5, 1.5], patch_size=[96, 96, 96], batch_size=2,
            kernels=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            filters=[8, 16, 32], deep_supervision=False, in_channels=1, num_classes=42,
            labels={k: f"s{k}" for k in range(42)}, modalities=["CT"],
            normalization=[{"scheme": "ct", "clip": [-1000.0, 1200.0], "mean": 100.0,
                            "std": 300.0}], median_shape=[256, 256, 200])
folder = Path(sys.argv[1])
chain = preprocessing(plan, with_label=True)
started = time.perf_counter()
out = chain(case_dict([folder / "ct.nii.gz"], folder / "label.nii.gz"))
seconds = time.perf_counter() - started
label = np.ascontiguousarray(out[LABEL].numpy())
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 2**20
print(json.dumps({"seconds": seconds, "peak_gb": peak,
                  "label": hashlib.sha256(label.tobytes()).hexdigest()[:16]}))
"""


def _write_case(folder: Path, shape: tuple[int, int, int], label_dtype: str) -> None:
    from medseg.phantoms import make_many_structure_ct

    spacing = (0.8, 0.8, 1.5)
    case = make_many_structure_ct(0, shape, spacing)
    nib.save(nib.Nifti1Image(case.image, case.affine), folder / "ct.nii.gz")
    scaled = label_dtype == "scaled"  # uint8 with scl_slope 1.0000001: read as float64
    label = nib.Nifti1Image(case.label.astype("uint8" if scaled else label_dtype), case.affine)
    if scaled:
        label.header.set_slope_inter(1.0000001, 0.0)
    nib.save(label, folder / "label.nii.gz")


def _measure(code: Path, folder: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], cwd=code,
                            env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin",
                                 "OMP_NUM_THREADS": "2"},
                            capture_output=True, encoding="utf-8", check=False)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="df7b582", help="git revision to compare with")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label-dtype", default="uint8", choices=["uint8", "float32", "scaled"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        _write_case(scratch_path, tuple(args.shape), args.label_dtype)
        baseline = scratch_path / "baseline"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(baseline),
                        args.baseline], cwd=REPO, check=True)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "current": []}
            for _ in range(args.repeats):
                runs["baseline"].append(_measure(baseline, scratch_path))
                runs["current"].append(_measure(REPO, scratch_path))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO,
                           check=False)
    summary = {name: (statistics.median(r["seconds"] for r in rows),
                      max(r["peak_gb"] for r in rows), {r["label"] for r in rows})
               for name, rows in runs.items()}
    for name, (seconds, peak, _) in summary.items():
        print(f"{name:9s} {seconds:6.2f} s  peak {peak:.2f} GB")
    print(f"current / baseline: time {summary['current'][0] / summary['baseline'][0]:.2f}x, "
          f"peak {summary['current'][1] / summary['baseline'][1]:.2f}x; same label: "
          f"{summary['current'][2] == summary['baseline'][2]}")


if __name__ == "__main__":
    main()
