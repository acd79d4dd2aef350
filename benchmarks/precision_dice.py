"""Does bf16 autocast cost Dice? The same trained network predicts the same cases in fp32 and
in bf16, and both are scored against the reference labels and against each other.

    .venv/bin/python benchmarks/precision_dice.py --run runs/bench_hippo_s1/run \
        --data ../shared/data/Task04_Hippocampus --out runs/precision_dice

The cases are the run's fold-0 validation cases (or the first `--cases` of them). bf16 autocast
rounds the inputs of every convolution to bf16 and accumulates in fp32 with or without native
bf16 (only the summation order differs), so this measures the Dice effect on any CPU. Its
speed is `benchmarks/precision.py`'s business: without AVX512-BF16 or AMX it is far slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from medseg.config import load_workflow
from medseg.io import read_label_map
from medseg.metrics import dice
from medseg.predict import load_predictor, predict_prepared, prepare_case

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder of medseg train")
    parser.add_argument("--data", type=Path, required=True, help="the run's MSD dataset folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=None, help="only the first N val cases")
    args = parser.parse_args()

    predictor = load_predictor(args.run, folds=[0], device="cpu")
    config = load_workflow(args.run / "workflow.yaml").predict
    labels = {k: v for k, v in predictor.plan.labels.items() if k != 0}
    cases = json.loads((args.run / "splits.json").read_text(encoding="utf-8"))[0]["val"]
    cases = cases[:args.cases] if args.cases else cases
    seconds = dict.fromkeys(PRECISIONS, 0.0)
    scores: dict[str, dict[str, list[float]]] = {
        key: {name: [] for name in labels.values()} for key in (*PRECISIONS, "bf16_vs_fp32")}
    disagreeing = total = 0
    for number, name in enumerate(cases, 1):
        case = prepare_case(predictor.plan, args.data / "imagesTr" / f"{name}.nii.gz")
        reference = read_label_map(args.data / "labelsTr" / f"{name}.nii.gz")
        reference = reference.data.reshape(reference.spatial_shape)
        masks = {}
        for precision in PRECISIONS:
            started = time.perf_counter()
            masks[precision] = predict_prepared(
                predictor, case, dataclasses.replace(config, precision=precision))
            seconds[precision] += time.perf_counter() - started
        for label, structure in labels.items():
            for precision in PRECISIONS:
                scores[precision][structure].append(
                    dice(masks[precision] == label, reference == label))
            scores["bf16_vs_fp32"][structure].append(
                dice(masks["bf16"] == label, masks["fp32"] == label))
        disagreeing += int(np.count_nonzero(masks["bf16"] != masks["fp32"]))
        total += masks["fp32"].size
        print(f"{number}/{len(cases)} {name}: fp32 {seconds['fp32']:.1f} s, "
              f"bf16 {seconds['bf16']:.1f} s so far", flush=True)

    result = {
        "run": str(args.run), "cases": len(cases),
        "native_bf16": bool(torch.cpu._is_avx512_bf16_supported()
                            or torch.cpu._is_amx_tile_supported()),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "dice": {key: {s: round(float(np.nanmean(v)), 4) for s, v in per.items()}
                 for key, per in scores.items()},
        "voxels_that_differ": disagreeing, "voxels": total,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision_dice.json").write_text(json.dumps(result, indent=2) + "\n",
                                                  encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
