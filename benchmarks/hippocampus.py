"""Benchmark medseg on MSD Task04 Hippocampus fold 0 against a plain MONAI UNet baseline.

Trains fold 0 with workflows/hippocampus.yaml, segments its validation cases and scores
them; then trains a plain MONAI UNet baseline for the same wall time and scores it alike.

    .venv/bin/python benchmarks/hippocampus.py --out runs/bench_hippo [--set KEY=VALUE ...]
        [--no-baseline] [--baseline-seconds S] [--fold K]

--fold trains and scores another fold of the same splits.json (the target is set on fold 0;
other folds show how much the figure depends on which 40 cases are held out).

Prints wall times and per-structure Dice and writes OUT/benchmark.json. Needs
../shared/data/Task04_Hippocampus (or --data). The validation masks are predicted on the
original image grid and scored against the original labels with `medseg evaluate`
(OUT/evaluation).

Unless --no-baseline, the baseline of benchmarks/baseline_unet.py (the MONAI tutorial
UNet: no resampling, no augmentation, Dice loss, Adam, fixed 48 x 64 x 48 patch) is then
trained on the same fold-0 training cases (OUT/run/splits.json) for as many seconds as the
whole `medseg train` call took (--baseline-seconds to choose), predicts the same validation
cases into OUT/baseline_predictions and is scored by the same `medseg evaluate` call into
OUT/baseline_evaluation. benchmark.json then holds both Dice tables, and the baseline's
training seconds and iterations.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from medseg.cli import main as medseg

REPO = Path(__file__).resolve().parent.parent


def evaluate(predictions: Path, references: Path, data: Path, out: Path) -> dict:
    """`medseg evaluate` into `out`; returns the Dice mean per structure."""
    medseg(["evaluate", "--pred", str(predictions), "--ref", str(references),
            "--labels", str(data / "dataset.json"), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {name: round(stats["dice"]["mean"], 4)
            for name, stats in summary["structures"].items()}


def run(out: Path, data: Path, overrides: list[str], baseline: bool = True,
        baseline_seconds: float | None = None, fold: int = 0) -> dict:
    sets = [arg for item in [f"dataset.path={data}", *overrides] for arg in ("--set", item)]
    started = time.monotonic()
    if medseg(["train", str(REPO / "workflows" / "hippocampus.yaml"), "--out", str(out / "run"),
               "--fold", str(fold), *sets]) != 0:
        raise SystemExit("training failed")
    train_seconds = time.monotonic() - started

    split = json.loads((out / "run" / "splits.json").read_text(encoding="utf-8"))[fold]
    val_cases = split["val"]
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
    dice = evaluate(out / "predictions", references, data, out / "evaluation")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads",
        "overrides": overrides,
        "fold": fold,
        "train_seconds": round(train_seconds, 1),
        "train_minutes": round(train_seconds / 60, 2),
        "predict_seconds": round(predict_seconds, 1),
        "validation_cases": len(val_cases),
        "dice": dice,
    }

    if baseline:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from baseline_unet import train_and_predict

        seconds = train_seconds if baseline_seconds is None else baseline_seconds
        print(f"baseline: MONAI UNet on {len(split['train'])} training cases for "
              f"{seconds:.1f} s")
        info = train_and_predict(data, split["train"], val_cases, seconds, out)
        base_dice = evaluate(Path(info["predictions"]), references, data,
                             out / "baseline_evaluation")
        result["baseline"] = {
            "model": "monai.networks.nets.UNet (16..256, strides 2x4, 2 res units, batch "
                     "norm), DiceLoss, Adam 1e-3, batch 2, patch 48x64x48, no augmentation",
            "budget_seconds": info["budget_seconds"],
            "train_seconds": info["train_seconds"],
            "iterations": info["iterations"],
            "epochs": info["epochs"],
            "predict_seconds": info["predict_seconds"],
            "dice": base_dice,
        }
        result["dice_medseg_vs_baseline"] = {
            name: {"medseg": dice.get(name), "baseline": base_dice.get(name)}
            for name in dict.fromkeys([*dice, *base_dice])
        }

    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    if baseline:
        print(f"\n{'structure':<12} {'medseg':>8} {'baseline':>9}   (mean Dice, "
              f"{len(val_cases)} validation cases, {train_seconds:.0f} s vs "
              f"{result['baseline']['train_seconds']:.0f} s training)")
        for name, pair in result["dice_medseg_vs_baseline"].items():
            ours, theirs = (f"{v:.4f}" if v is not None else "-" for v in pair.values())
            print(f"{name:<12} {ours:>8} {theirs:>9}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "Task04_Hippocampus")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also train and score the plain MONAI UNet baseline "
                             "(default: on)")
    parser.add_argument("--baseline-seconds", type=float, default=None,
                        help="the baseline's training wall time (default: as long as "
                             "medseg's training took)")
    parser.add_argument("--fold", type=int, default=0, help="the fold to train and score")
    args = parser.parse_args()
    run(args.out, args.data.resolve(), args.overrides, args.baseline, args.baseline_seconds,
        args.fold)
