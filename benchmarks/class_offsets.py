"""Would shifting the decision between classes buy Dice? A per-class offset added to the
logits before the argmax grows or shrinks a structure (the shipped hippocampus model makes
the posterior structure 3.1 % too large). The offsets are tuned on one model's validation
cases and applied to another's, so nothing is tuned on the cases it is scored on; the best
offsets for the scored cases themselves are printed too, as the most any offset could buy.

    .venv/bin/python benchmarks/class_offsets.py --tune runs/bench_hippo_f1/run 1 \
        --apply runs/bench_hippo_nm/run 0 --data ../shared/data/Task04_Hippocampus

Logits are the training validation's sliding window (with the run's predict.step and
sw_batch_size) in the preprocessed space (the hippocampus images are already on the 1 mm
grid). Searches offsets -0.6..0.6 for each
structure (background fixed at 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from medseg.config import load_workflow
from medseg.metrics import dice
from medseg.predict import load_predictor
from medseg.train import sliding_window_logits
from medseg.transforms import IMAGE, LABEL, case_dict, preprocessing

OFFSETS = np.round(np.arange(-0.6, 0.61, 0.1), 2)


def validation_logits(run: Path, fold: int, data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logits, reference) of each validation case of `fold`, by that fold's best weights."""
    predictor = load_predictor(run, folds=[fold], device="cpu")
    plan = predictor.plan
    window = load_workflow(run / "workflow.yaml").predict
    names = json.loads((run / "splits.json").read_text(encoding="utf-8"))[fold]["val"]
    prepare = preprocessing(plan, with_label=True)
    cases = []
    for name in names:
        item = prepare(case_dict([data / "imagesTr" / f"{name}.nii.gz"],
                                 data / "labelsTr" / f"{name}.nii.gz"))
        with torch.no_grad():
            logits = sliding_window_logits(predictor.models[0], item[IMAGE].as_tensor()[None],
                                           plan, window.step, window.sw_batch_size, None,
                                           torch.device("cpu"))
        cases.append((logits[0].numpy(), item[LABEL].as_tensor()[0].numpy().astype(np.int64)))
    return cases


def mean_dice(cases, offsets: tuple[float, ...]) -> np.ndarray:
    """Mean Dice per structure when `offsets` are added to the structures' logits."""
    shift = np.array([0.0, *offsets])[:, None, None, None]
    per_case = []
    for logits, reference in cases:
        prediction = (logits + shift).argmax(0)
        per_case.append([dice(prediction == k, reference == k)
                         for k in range(1, len(offsets) + 1)])
    return np.nanmean(per_case, axis=0)  # NaN: a structure absent from both masks


def best_offsets(cases, n_structures: int) -> tuple[float, ...]:
    return max(itertools.product(OFFSETS, repeat=n_structures),
               key=lambda offsets: mean_dice(cases, offsets).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", nargs=2, metavar=("RUN", "FOLD"), required=True)
    parser.add_argument("--apply", nargs=2, metavar=("RUN", "FOLD"), required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()

    tune = validation_logits(Path(args.tune[0]), int(args.tune[1]), args.data)
    n_structures = tune[0][0].shape[0] - 1
    tuned = best_offsets(tune, n_structures)
    scored = validation_logits(Path(args.apply[0]), int(args.apply[1]), args.data)
    oracle = best_offsets(scored, n_structures)
    rows = {"tuned_offsets": tuned, "tune_cases_before": mean_dice(tune, (0.0,) * n_structures),
            "tune_cases_after": mean_dice(tune, tuned),
            "scored_before": mean_dice(scored, (0.0,) * n_structures),
            "scored_with_tuned_offsets": mean_dice(scored, tuned),
            "oracle_offsets": oracle, "scored_with_oracle_offsets": mean_dice(scored, oracle)}
    print(json.dumps({k: np.round(np.asarray(v, dtype=float), 4).tolist()
                      for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
