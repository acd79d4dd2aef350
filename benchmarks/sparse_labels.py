"""Sparse annotations (nnU-Net's 'ignore' label) against dense ones on MSD Task04 Hippocampus.

Writes an nnU-Net v2 copy of the dataset whose labels keep only one axial (superior-inferior)
slice in --every, all the other slices' voxels 'ignore'; trains fold 0 of the dense dataset
and of that copy with workflows/hippocampus.yaml (plus any --set), predicts the same 40
validation images with each model and scores both against the DENSE labels.

    .venv/bin/python benchmarks/sparse_labels.py --out runs/bench_sparse \\
        [--every 3] [--set train.epochs=16 ...]

The copy's images are links to the originals, its cases have the originals' names (so the
seeded folds hold out the same cases); nothing is written into the data folder. Prints
and writes OUT/benchmark.json: per run, the training wall time and per-structure Dice.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from hippocampus import evaluate

from medseg.cli import main as medseg

REPO = Path(__file__).resolve().parent.parent


def write_sparse_copy(data: Path, out: Path, every: int) -> int:
    """The nnU-Net v2 copy: labels on every `every`-th slice along S, 'ignore' elsewhere."""
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    description = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    structures = {name: int(k) for k, name in description["labels"].items()}
    ignore = max(structures.values()) + 1
    cases = [Path(entry["label"]).name for entry in description["training"]]
    kept = []
    for name in cases:
        stem = name[: -len(".nii.gz")]
        link = out / "imagesTr" / f"{stem}_0000.nii.gz"
        if not link.exists():
            link.symlink_to(data / "imagesTr" / name)
        label = nib.load(data / "labelsTr" / name)
        voxels = np.asarray(label.dataobj)
        axis = next(i for i, code in enumerate(nib.aff2axcodes(label.affine)) if code in "SI")
        annotated = np.arange(voxels.shape[axis]) % every == 0
        sparse = voxels.copy()
        index = [slice(None)] * 3
        index[axis] = ~annotated
        sparse[tuple(index)] = ignore
        kept.append(float(np.count_nonzero(sparse != ignore)) / sparse.size)
        nib.save(nib.Nifti1Image(sparse.astype(voxels.dtype), label.affine, label.header),
                 out / "labelsTr" / name)
    labels = {**structures, "ignore": ignore}
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": labels, "numTraining": len(cases),
        "file_ending": ".nii.gz"}, indent=1), encoding="utf-8")
    return round(100 * float(np.mean(kept)))


def train_and_score(name: str, dataset: Path, layout: str, data: Path, out: Path,
                    overrides: list[str]) -> dict:
    sets = [arg for item in [f"dataset.path={dataset}", f"dataset.layout={layout}", *overrides]
            for arg in ("--set", item)]
    run = out / name
    started = time.monotonic()
    if medseg(["train", str(REPO / "workflows" / "hippocampus.yaml"), "--out", str(run),
               "--fold", "0", *sets]) != 0:
        raise SystemExit(f"training {name} failed")
    seconds = time.monotonic() - started
    val_cases = json.loads((run / "splits.json").read_text(encoding="utf-8"))[0]["val"]
    references = out / "val_labels"
    references.mkdir(exist_ok=True)
    for case in val_cases:  # the dense labels, linked
        link = references / f"{case}.nii.gz"
        if not link.exists():
            link.symlink_to(data / "labelsTr" / f"{case}.nii.gz")
    inputs = [str(data / "imagesTr" / f"{case}.nii.gz") for case in val_cases]
    if medseg(["predict", "--model", str(run), "--input", *inputs, "--output",
               str(out / f"{name}_predictions"), "--overwrite"]) != 0:
        raise SystemExit(f"predicting with {name} failed")
    dice = evaluate(out / f"{name}_predictions", references, data, out / f"{name}_evaluation")
    return {"train_minutes": round(seconds / 60, 2), "validation_cases": val_cases,
            "dice_against_dense_labels": dice}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "Task04_Hippocampus")
    parser.add_argument("--every", type=int, default=3, help="keep every N-th axial slice")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    data = args.data.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    annotated = write_sparse_copy(data, args.out / "sparse_data", args.every)
    print(f"sparse copy: 1 axial slice in {args.every} annotated ({annotated} % of voxels)")
    result = {"every": args.every, "annotated_percent": annotated, "overrides": args.overrides,
              "dense": train_and_score("dense", data, "msd", data, args.out, args.overrides),
              "sparse": train_and_score("sparse", args.out / "sparse_data", "nnunet", data,
                                        args.out, args.overrides)}
    same = result["dense"].pop("validation_cases") == result["sparse"].pop("validation_cases")
    result["same_validation_cases"] = same
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n",
                                             encoding="utf-8")
    print(json.dumps(result, indent=2))
