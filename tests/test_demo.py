"""The README's demo, in full: every structure must reach Dice 0.90 on the held-out phantoms.

It trains for about three minutes on two cores; it is the suite's one long test."""

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
