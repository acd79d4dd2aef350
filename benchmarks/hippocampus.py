"""Train fold 0 of MSD Task04 Hippocampus, segment its validation cases, score them.

    .venv/bin/python benchmarks/hippocampus.py --out runs/bench_hippo [--set KEY=VALUE ...]

Prints wall times and per-structure Dice and writes OUT/benchmark.json. Needs
../shared/data/Task04_Hippocampus (or --data). The validation masks are predicted on the
original image grid and scored against the original labels.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from medseg.cli import main as medseg

REPO = Path(__file__).resolve().parent.parent


def run(out: Path, data: Path, overrides: list[str]) -> dict:
    sets = [arg for item in [f"dataset.path={data}", *overrides] for arg in ("--set", item)]
    started = time.monotonic()
    if medseg(["train", str(REPO / "workflows" / "hippocampus.yaml"), "--out", str(out / "run"),
               "--fold", "0", *sets]) != 0:
        raise SystemExit("training failed")
    train_seconds = time.monotonic() - started

    val_cases = json.loads((out / "run" / "splits.json").read_text())[0]["val"]
    references = out / "val_labels"
    references.mkdir(exist_ok=True)
    for name in val_cases:  # links to the real labels, never copies
        link = references / f"{name}.nii.gz"
        if not link.exists():
            link.symlink_to(data / "labelsTr" / f"{name}.nii.gz")
    inputs = [str(data / "imagesTr" / f"{name}.nii.gz") for name in val_cases]
    started = time.monotonic()
    if medseg(["predict", "--model", str(out / "run"), "--input", *inputs, "--output",
               str(out / "predictions"), "--overwrite"]) != 0:
        raise SystemExit("prediction failed")
    predict_seconds = time.monotonic() - started
    medseg(["evaluate", "--pred", str(out / "predictions"), "--ref", str(references),
            "--labels", str(data / "dataset.json"), "--out", str(out / "evaluation")])
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    result = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads",
        "overrides": overrides,
        "train_minutes": round(train_seconds / 60, 2),
        "predict_seconds": round(predict_seconds, 1),
        "validation_cases": len(val_cases),
        "dice": {name: round(stats["dice"]["mean"], 4)
                 for name, stats in summary["structures"].items()},
    }
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "Task04_Hippocampus")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    run(args.out, args.data.resolve(), args.overrides)
