"""Scores trained hippocampus runs alone and averaged (softmax ensemble) on fold 0's
validation cases, the way training validation scores them (preprocessed space, sliding window
at step 0.5, medseg.metrics.score_case). The runs may have different plans (width, residual
blocks) but must preprocess alike (spacing, normalization, patch): the cases are
preprocessed once, with the first run's plan.

    .venv/bin/python benchmarks/hippocampus_ensemble.py runs/bench_hippo_f8/run \\
        runs/bench_hippo_cand/run
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from medseg.metrics import score_case
from medseg.model import create_model, load_weights
from medseg.plan import load_plan
from medseg.train import sliding_window_logits
from medseg.transforms import IMAGE, LABEL, case_dict, preprocessing

REPO = Path(__file__).resolve().parent.parent


class Fold0Runs(NamedTuple):
    """Trained fold-0 runs, their plans and best models, and the validation cases as
    (name, preprocessed image (1, C, ...), reference label) in the first run's preprocessing."""

    runs: list[Path]
    plans: list
    models: list
    cases: Iterator[tuple[str, torch.Tensor, np.ndarray]]


def fold0_runs(description: str) -> Fold0Runs:
    """Parse `RUN ... [--data DIR]` and load the runs: the runs must preprocess alike and
    share fold 0's validation cases."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "Task04_Hippocampus")
    args = parser.parse_args()
    if not (args.data / "imagesTr").is_dir():
        raise SystemExit(f"{args.data}: no imagesTr folder (pass --data)")
    plans = [load_plan(run / "plan.json") for run in args.runs]
    for run, plan in zip(args.runs[1:], plans[1:], strict=True):
        if _preprocessing_of(plan) != _preprocessing_of(plans[0]):
            raise SystemExit(f"{run}: preprocesses differently from {args.runs[0]}")
    models = []
    for run, plan in zip(args.runs, plans, strict=True):
        model = create_model(plan)
        load_weights(model, run / "fold_0" / "checkpoints" / "best.safetensors")
        models.append(model.eval())
    splits = [json.loads((run / "splits.json").read_text(encoding="utf-8"))[0]["val"]
              for run in args.runs]
    if any(split != splits[0] for split in splits):
        raise SystemExit("the runs have different fold-0 validation cases")
    return Fold0Runs(args.runs, plans, models,
                     _validation_cases(args.data, splits[0], plans[0]))


def _validation_cases(data: Path, names: list[str], plan
                      ) -> Iterator[tuple[str, torch.Tensor, np.ndarray]]:
    chain = preprocessing(plan, with_label=True)
    for name in names:
        item = chain(case_dict([data / "imagesTr" / f"{name}.nii.gz"],
                               data / "labelsTr" / f"{name}.nii.gz"))
        yield (name, item[IMAGE].as_tensor()[None],
               item[LABEL].as_tensor()[0].numpy().astype(np.int64))


def main() -> None:
    runs, plans, models, cases = fold0_runs(__doc__.splitlines()[0])
    labels = plans[0].labels
    dice: dict[str, list[list[float]]] = {}
    with torch.no_grad():
        for _, image, reference in cases:
            probabilities = [
                sliding_window_logits(model, image, plan, 0.5, 4, None,
                                      torch.device("cpu")).softmax(1)
                for model, plan in zip(models, plans, strict=True)]
            candidates = {run.parent.name: p for run, p in zip(runs, probabilities,
                                                               strict=True)}
            candidates["ensemble"] = torch.stack(probabilities).mean(0)
            for key, p in candidates.items():
                scores = score_case(p.argmax(1)[0].numpy(), reference, labels, (1.0, 1.0, 1.0),
                                    surface=False)
                dice.setdefault(key, []).append(
                    [scores[labels[k]]["dice"] for k in sorted(labels) if k > 0])
    names = [labels[k] for k in sorted(labels) if k > 0]
    for key, values in dice.items():
        means = np.nanmean(values, axis=0)  # NaN: a structure absent from both masks
        print(f"{key:<24} " + "  ".join(f"{n} {m:.4f}" for n, m in zip(names, means,
                                                                         strict=True)))


def _preprocessing_of(plan) -> tuple:
    return (plan.target_spacing, plan.normalization, plan.patch_size, plan.labels)


if __name__ == "__main__":
    main()
