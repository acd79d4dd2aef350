"""Pair predictions with references by file name and score every case and structure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.datasets import IMAGE_SUFFIXES, strip_image_suffix
from medseg.errors import MedsegError
from medseg.io import read_volume
from medseg.metrics import score_case


@dataclass(frozen=True)
class CaseScores:
    """Scores of one case; `error` is set when the case could not be scored (Dice 0)."""

    case: str
    scores: dict[str, dict[str, float]]
    error: str | None = None


def pair_cases(pred_dir: Path, ref_dir: Path) -> list[tuple[str, Path | None, Path]]:
    """(case, prediction or None, reference) for every reference volume."""
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise MedsegError("folder not found", folder)
    predictions = {strip_image_suffix(p.name): p for p in pred_dir.iterdir()
                   if p.name.endswith(IMAGE_SUFFIXES)}
    references = sorted(p for p in ref_dir.iterdir() if p.name.endswith(IMAGE_SUFFIXES))
    if not references:
        raise MedsegError("no reference volumes found", ref_dir)
    return [(strip_image_suffix(r.name), predictions.get(strip_image_suffix(r.name)), r)
            for r in references]


def infer_labels(pairs: list[tuple[str, Path | None, Path]]) -> dict[int, str]:
    """Label ids seen in the references, named label_K, for when no label map is given."""
    ids: set[int] = set()
    for _, _, reference in pairs:
        ids |= set(np.unique(read_volume(reference, dtype=np.int64).data).tolist())
    return {k: ("background" if k == 0 else f"label_{k}") for k in sorted(ids)}


def evaluate_pairs(pairs: list[tuple[str, Path | None, Path]], labels: dict[int, str]
                   ) -> list[CaseScores]:
    results = []
    for case, prediction, reference in tqdm(pairs, desc="evaluate", unit="case",
                                            dynamic_ncols=True):
        if prediction is None:
            results.append(_failed(case, labels, "no prediction for this case"))
            continue
        try:
            results.append(CaseScores(case, _score_pair(prediction, reference, labels)))
        except MedsegError as exc:
            results.append(_failed(case, labels, str(exc)))
    return results


def _score_pair(prediction: Path, reference: Path, labels: dict[int, str]) -> dict:
    pred = read_volume(prediction, dtype=np.int64)
    ref = read_volume(reference, dtype=np.int64)
    if pred.spatial_shape != ref.spatial_shape:
        raise MedsegError(f"shape {pred.spatial_shape} differs from the reference's "
                          f"{ref.spatial_shape}", prediction)
    if not np.allclose(pred.affine, ref.affine, atol=1e-3):
        raise MedsegError("affine differs from the reference's (not on the same grid)",
                          prediction)
    unknown = sorted(set(np.unique(pred.data).tolist()) - set(labels))
    if unknown:
        raise MedsegError(f"label values {unknown} are not in the label map", prediction)
    return score_case(pred.data, ref.data, labels, ref.spacing)


def _failed(case: str, labels: dict[int, str], error: str) -> CaseScores:
    scores = {name: {"dice": 0.0, "ref_ml": float("nan"), "pred_ml": float("nan"),
                     "diff_ml": float("nan")} for k, name in labels.items() if k != 0}
    return CaseScores(case, scores, error)
