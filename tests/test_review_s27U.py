"""Regression tests for review session 27, letter U."""

from __future__ import annotations

from medseg.plan import Plan

GAIN = {"largest_component": [2], "cases": 4, "structures": {
    "Posterior": {"id": 2, "dice": 0.057017, "dice_largest_component": 0.057037,
                  "apply": True}}}


def test_crossval_console_shows_a_small_gain_apart(capsys):
    """0.057017 -> 0.057037 printed "0.0570 -> 0.0570 (raises it)"."""
    from medseg.crossval import _print_postprocessing

    _print_postprocessing(GAIN, Plan.__new__(Plan))
    out = capsys.readouterr().out
    assert "Posterior: 0.05702 -> 0.05704 (raises it)" in out


def test_crossval_html_shows_a_small_gain_apart():
    from medseg.report_html import _crossval_tables

    summary = {"crossval": {"folds": {}, "postprocessing": GAIN}}
    html = _crossval_tables(summary, ["Posterior"])
    assert "<td>0.05702</td><td>0.05704</td><td>yes</td>" in html
