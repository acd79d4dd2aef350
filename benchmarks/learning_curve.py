"""How much does the hippocampus figure depend on the number of training cases?

Trains fold 0 of workflows/hippocampus.yaml on the first N of its 160 training cases (a seeded
shuffle, so 80 of them lie inside the 120), always validating on the same 40 fold-0 cases, and
prints each run's last validation Dice:

    .venv/bin/python benchmarks/learning_curve.py --out runs/lc --cases 80 120 160 \
        [--set train.epochs=25 --set train.max_minutes=12]

Every run does the same number of steps (train.epochs x train.iterations_per_epoch), so fewer
cases means each is seen more often, not less compute. The plan comes from all 200 cases, as
in the shipped runs. The Dice is the run's own sliding-window validation in the preprocessed
space (as in the 10-minute recipe search of docs/benchmarks.md). Writes OUT/learning_curve.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from medseg.config import load_workflow
from medseg.datasets import load_dataset, make_splits
from medseg.plan import fingerprint, make_plan
from medseg.train import train_fold

REPO = Path(__file__).resolve().parent.parent


def subset_split(split: dict, n_train: int, seed: int = 0) -> dict:
    """The fold's validation cases, and N of its training cases (nested as N grows)."""
    train = sorted(split["train"])
    random.Random(seed).shuffle(train)
    return {"train": sorted(train[:n_train]), "val": split["val"]}


def last_validation(fold_dir: Path) -> dict:
    lines = (fold_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    last = [r for r in records if "val_dice" in r][-1]
    return {"epoch": last["epoch"], "minutes": round(last["elapsed_seconds"] / 60, 1),
            # null: a structure no validation case has
            "dice": {k: None if v is None else round(v, 4) for k, v in last["val_dice"].items()},
            "mean_dice": None if last["val_mean_dice"] is None else round(last["val_mean_dice"],
                                                                          4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cases", type=int, nargs="+", default=[80, 120, 160])
    parser.add_argument("--data", type=Path, default=None, help="Task04_Hippocampus folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    overrides = [*([f"dataset.path={args.data}"] if args.data else []), *args.overrides]
    workflow = load_workflow(REPO / "workflows" / "hippocampus.yaml", overrides)
    ds = workflow.dataset
    dataset = load_dataset(ds.path, ds.layout, ds.modality, ds.labels)
    fold0 = make_splits([c.name for c in dataset.cases], workflow.train.folds,
                        workflow.train.split_seed, source=dataset.root)[0]
    plan = make_plan(fingerprint(dataset, seed=workflow.train.seed), workflow.plan)
    results = []
    for n_train in args.cases:
        split = subset_split(fold0, n_train)
        out = args.out / f"train_{n_train}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.json").write_text(json.dumps(split, indent=1), encoding="utf-8")
        trained = train_fold(workflow, dataset, plan, split, out / "fold_0")
        results.append({"training_cases": n_train, "train_seconds": round(trained.seconds, 1),
                        **last_validation(out / "fold_0")})
        print(json.dumps(results[-1]), flush=True)
    (args.out / "learning_curve.json").write_text(
        json.dumps({"overrides": args.overrides, "runs": results}, indent=2) + "\n",
        encoding="utf-8")


if __name__ == "__main__":
    main()
