"""Per-case CSV, summary.json and a console table from scored cases."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from medseg.evaluate import CaseScores
from medseg.fileio import atomic_write_json, atomic_write_text

METRICS = ("dice", "ref_ml", "pred_ml", "diff_ml")


def summarize(results: list[CaseScores]) -> dict:
    """Per structure and metric: mean, sd, median, IQR and n over the finite values."""
    structures = list(results[0].scores) if results else []
    summary: dict = {"n_cases": len(results),
                     "failed_cases": [r.case for r in results if r.error],
                     "structures": {}}
    for name in structures:
        summary["structures"][name] = {
            metric: _stats([r.scores[name][metric] for r in results]) for metric in METRICS
        }
    means = [s["dice"]["mean"] for s in summary["structures"].values()]
    summary["mean_dice"] = float(np.mean(means)) if means else float("nan")
    return summary


def write_reports(results: list[CaseScores], out_dir: Path) -> dict:
    """Write scores.csv (a row per case and structure) and summary.json; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "structure", *METRICS, "error"])
    for result in results:
        for name, scores in result.scores.items():
            writer.writerow([result.case, name, *(_fmt(scores[m]) for m in METRICS),
                             result.error or ""])
    atomic_write_text(out_dir / "scores.csv", buffer.getvalue())
    summary = summarize(results)
    atomic_write_json(out_dir / "summary.json", _json_safe(summary))
    return summary


def format_table(summary: dict) -> str:
    """A compact console table: structure, mean and sd Dice, n."""
    rows = [("structure", "dice mean", "dice sd", "n")]
    for name, stats in summary["structures"].items():
        dice = stats["dice"]
        rows.append((name, f"{dice['mean']:.4f}", f"{dice['sd']:.4f}", str(dice["n"])))
    rows.append(("mean", f"{summary['mean_dice']:.4f}", "", str(summary["n_cases"])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if summary["failed_cases"]:
        lines.append(f"failed cases (scored 0): {', '.join(summary['failed_cases'])}")
    return "\n".join(lines)


def _stats(values: list[float]) -> dict:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "median": float("nan"),
                "iqr": float("nan"), "n": 0}
    q1, q3 = np.percentile(finite, [25, 75])
    return {"mean": float(finite.mean()), "sd": float(finite.std(ddof=1)) if finite.size > 1
            else 0.0, "median": float(np.median(finite)), "iqr": float(q3 - q1),
            "n": int(finite.size)}


def _fmt(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.6g}"


def _json_safe(data):
    """JSON has no NaN: write null instead."""
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_json_safe(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data
