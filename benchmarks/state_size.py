"""Cost of keeping best.safetensors's weights in the training state (written every epoch):
the state's size and write time with and without them, for the shipped hippocampus network
(8-64 filters) and nnU-Net's width (32-256), built from synthetic plans.

    .venv/bin/python benchmarks/state_size.py
"""

import tempfile
import time
from pathlib import Path

import torch

from medseg.model import create_model, weight_snapshot
from medseg.plan import Plan
from medseg.train import _save_state

PATCH = [40, 56, 40]  # the hippocampus plan's


def plan_of(base_filters: int) -> Plan:
    return Plan(target_spacing=[1.0, 1.0, 1.0], patch_size=PATCH, batch_size=2,
                kernels=[[3, 3, 3]] * 4, strides=[[1, 1, 1]] + [[2, 2, 2]] * 3,
                filters=[base_filters * 2**i for i in range(4)], deep_supervision=True,
                in_channels=1, num_classes=3, labels={0: "background", 1: "a", 2: "b"},
                modalities=["MR"], normalization=[{"scheme": "zscore_nonzero"}],
                median_shape=PATCH)


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    for base in (8, 32):
        model = create_model(plan_of(base))
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        model(torch.zeros(1, 1, *PATCH)).float().mean().backward()
        optimizer.step()  # the optimizer's moments, as in a real state
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for label, best in (("without", None), ("with", weight_snapshot(model))):
            path = folder / f"{base}_{label}.pt"
            times = []
            for _ in range(5):
                start = time.perf_counter()
                _save_state(path, model, optimizer, scheduler, scaler, 0, {}, best_weights=best)
                times.append(time.perf_counter() - start)
            print(f"{base}-{base * 8} filters ({params:.2f} M weights), {label} best weights: "
                  f"{min(times) * 1000:.0f} ms, {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
