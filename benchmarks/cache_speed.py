"""Training from the memory cache against the disk cache (`train.cache`): steps per second
and the peak resident memory of the training process, on a synthetic CT collection.

    .venv/bin/python benchmarks/cache_speed.py [--cases 16] [--shape 256 256 160] [--out DIR]

Writes the phantoms once (DIR/data), then trains fold 0 of workflows/demo.yaml twice, one
process each, with `train.cache=memory` and `train.cache=disk` (no validation, one loader
worker). Steps per second: the iterations of the epochs after the first over their
`epoch_seconds` (training alone); the first epoch is left out (the workers and the network
warm up). Peak RSS: the largest resident set of the training process or of one of its
loader workers (wait4's ru_maxrss), which for the memory cache holds every case."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(run: Path, data: Path, mode: str, epochs: int, iterations: int) -> dict:
    sets = [f"dataset.path={data}", f"train.cache={mode}", f"train.epochs={epochs}",
            f"train.iterations_per_epoch={iterations}", "train.val_max_cases=0",
            "train.num_workers=1", "train.max_minutes=null"]
    command = [sys.executable, "-m", "medseg.cli", "train", str(REPO / "workflows" / "demo.yaml"),
               "--out", str(run), "--overwrite", *[a for s in sets for a in ("--set", s)]]
    started = time.monotonic()
    # stderr to a file, not a pipe: wait4 before reading would block a child whose progress
    # bar filled the pipe
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        log.seek(0)
        err = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode}: training failed\n{err[-3000:]}")
    records = [json.loads(line) for line in
               (run / "fold_0" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    later = records[1:]
    steps = iterations * len(later) / sum(r["epoch_seconds"] for r in later)
    cache = run / "cache"
    cached = sum(p.stat().st_size for p in cache.iterdir()) if cache.is_dir() else 0
    return {"mode": mode, "steps_per_s": steps, "peak_rss_gb": usage.ru_maxrss / 2**20,
            "wall_s": wall, "train_s": sum(r["epoch_seconds"] for r in records),
            "cache_gb": cached / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 2.5])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cache_speed"))
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "dataset.json").is_file():
        from medseg.phantoms import write_phantom_dataset

        shutil.rmtree(data, ignore_errors=True)
        write_phantom_dataset(data, n_train=args.cases, n_test=0, seed=0,
                              shape=tuple(args.shape), spacing=tuple(args.spacing))
    print(f"{args.cases} phantoms of {' x '.join(map(str, args.shape))} voxels; "
          f"{args.epochs} epochs of {args.iterations} steps, demo.yaml's plan")
    results = [train(args.out / mode, data, mode, args.epochs, args.iterations)
               for mode in ("memory", "disk")]
    for r in results:
        print(f"{r['mode']:6s}  {r['steps_per_s']:.2f} steps/s  peak RSS {r['peak_rss_gb']:.2f} GB"
              f"  wall {r['wall_s']:.0f} s (training {r['train_s']:.0f} s)"
              f"  cache on disk {r['cache_gb']:.2f} GB")
    memory, disk = results
    print(f"disk / memory: steps/s {disk['steps_per_s'] / memory['steps_per_s']:.2f}, "
          f"peak RSS {disk['peak_rss_gb'] / memory['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
