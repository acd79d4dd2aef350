"""The README's demo, in full: every structure must reach Dice 0.90 on the held-out phantoms.

It trains for about three minutes on two cores; it is the suite's one long test."""

import csv
import json

import pytest

from medseg.cli import main


@pytest.mark.slow
def test_demo_reaches_dice_090_on_every_structure(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    summary_path = tmp_path / "demo" / "evaluation" / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["failed_cases"] == []
    for name, stats in summary["structures"].items():
        assert stats["dice"]["n"] == 4
        assert stats["dice"]["mean"] >= 0.90, (name, stats["dice"])
    # predict's statistics of the same masks: the volumes the evaluation measured
    with open(tmp_path / "demo" / "evaluation" / "scores.csv", encoding="utf-8") as handle:
        scored = {(r["case"], r["structure"]): float(r["pred_ml"]) for r in csv.DictReader(handle)}
    with open(tmp_path / "demo" / "predictions" / "statistics.csv", encoding="utf-8") as handle:
        measured = {(r["case"], r["structure"]): float(r["volume_ml"])
                    for r in csv.DictReader(handle)}
    assert measured.keys() == scored.keys() and len(measured) == 4 * len(summary["structures"])
    for key, volume in measured.items():
        assert volume == pytest.approx(scored[key], abs=0.002), key
