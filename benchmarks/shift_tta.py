"""Shift test-time augmentation on fold 0's hippocampus validation cases: each case is padded
by a few voxels before the sliding window (so that it sits elsewhere against the network's
stride-8 grid) and the softmax cropped back and averaged over the shifts; one model alone and
the runs given averaged. Scored in the preprocessed space, as training validation is.

    .venv/bin/python benchmarks/shift_tta.py runs/bench_hippo_bf16/run \\
        runs/bench_hippo_seed1/run runs/bench_hippo_seed2/run runs/bench_hippo_seed3/run
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from hippocampus_ensemble import fold0_runs

from medseg.metrics import score_case
from medseg.train import sliding_window_logits

SHIFTS = {
    "none": [(0, 0, 0)],
    "0/1 voxel": list(itertools.product([0, 1], repeat=3)),
    "-2/0/2 voxels": list(itertools.product([-2, 0, 2], repeat=3)),
    "-4/0/4 voxels": list(itertools.product([-4, 0, 4], repeat=3)),
}


def shifted_probabilities(model, plan, image: torch.Tensor, shift) -> torch.Tensor:
    """Softmax of the case moved by `shift` voxels (zero padding), cropped back."""
    pad = []
    for offset in reversed(shift):  # F.pad lists the last axis first
        pad += [max(offset, 0), max(-offset, 0)]
    logits = sliding_window_logits(model, F.pad(image, pad), plan, 0.5, 4, torch.bfloat16,
                                   torch.device("cpu"))
    crop = [slice(None), slice(None)] + [slice(max(o, 0), max(o, 0) + n)
                                         for o, n in zip(shift, image.shape[2:], strict=True)]
    return logits.softmax(1)[tuple(crop)]


def main() -> None:
    _, plans, models, cases = fold0_runs(__doc__.splitlines()[0])
    labels = plans[0].labels
    dice: dict[str, list[list[float]]] = {}
    groups = {"first model": [0], f"{len(models)} models": list(range(len(models)))}
    with torch.no_grad():
        for _, image, reference in cases:
            cache: dict = {}
            for group, members in groups.items():
                for shift_name, shifts in SHIFTS.items():
                    probabilities = []
                    for k, shift in itertools.product(members, shifts):
                        if (k, shift) not in cache:
                            cache[(k, shift)] = shifted_probabilities(models[k], plans[k],
                                                                      image, shift)
                        probabilities.append(cache[(k, shift)])
                    mask = torch.stack(probabilities).mean(0).argmax(1)[0].numpy()
                    scores = score_case(mask, reference, labels, (1.0, 1.0, 1.0), surface=False)
                    dice.setdefault(f"{group}, shifts {shift_name}", []).append(
                        [scores[labels[k]]["dice"] for k in sorted(labels) if k > 0])
    structures = [labels[k] for k in sorted(labels) if k > 0]
    for key, values in dice.items():
        means = np.nanmean(values, axis=0)
        print(f"{key:<34} " + "  ".join(f"{s} {m:.4f}" for s, m in zip(structures, means,
                                                                         strict=True)))


if __name__ == "__main__":
    main()
