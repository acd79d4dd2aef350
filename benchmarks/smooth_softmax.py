"""Smoothing the softmax before the argmax, on fold 0's hippocampus validation cases: most of
the wrong voxels are one voxel deep at the outer surface, so a Gaussian blur of each class's
probability (a smoother boundary) is the cheapest test of whether the boundary is noise. One
model alone and the runs given averaged, scored in the preprocessed space as training
validation is.

    .venv/bin/python benchmarks/smooth_softmax.py runs/bench_hippo_bf16/run \\
        runs/bench_hippo_seed1/run runs/bench_hippo_seed2/run runs/bench_hippo_seed3/run
"""

from __future__ import annotations

import numpy as np
import torch
from hippocampus_ensemble import fold0_runs
from scipy.ndimage import gaussian_filter

from medseg.metrics import score_case
from medseg.train import sliding_window_logits

SIGMAS_VOXELS = (0.0, 0.5, 0.75, 1.0, 1.5)


def smoothed(probabilities: np.ndarray, sigma: float) -> np.ndarray:
    """Each class's probability map (C, X, Y, Z) blurred by a Gaussian of `sigma` voxels."""
    if sigma == 0:
        return probabilities
    return np.stack([gaussian_filter(p, sigma) for p in probabilities])


def main() -> None:
    runs, plans, models, cases = fold0_runs(__doc__.splitlines()[0])
    labels = plans[0].labels
    structures = [k for k in sorted(labels) if k > 0]
    dice: dict[tuple[str, float], list[list[float]]] = {}
    with torch.no_grad():
        for _, image, reference in cases:
            probabilities = [
                sliding_window_logits(model, image, plan, 0.5, 4, None,
                                      torch.device("cpu")).softmax(1)[0].numpy()
                for model, plan in zip(models, plans, strict=True)]
            candidates = {runs[0].parent.name: probabilities[0],
                          f"{len(runs)} averaged": np.mean(probabilities, axis=0)}
            for key, p in candidates.items():
                for sigma in SIGMAS_VOXELS:
                    scores = score_case(smoothed(p, sigma).argmax(0), reference, labels,
                                        (1.0, 1.0, 1.0), surface=False)
                    dice.setdefault((key, sigma), []).append(
                        [scores[labels[k]]["dice"] for k in structures])
    for (key, sigma), values in dice.items():
        means = np.nanmean(values, axis=0)  # NaN: a structure absent from both masks
        print(f"{key:<20} sigma {sigma:<4} " + "  ".join(
            f"{labels[k]} {m:.4f}" for k, m in zip(structures, means, strict=True)))


if __name__ == "__main__":
    main()
