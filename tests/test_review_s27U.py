"""Regression tests for review session 27, letter U."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.plan import Plan
from medseg.report import run_evaluation

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


def _one_case(tmp_path, labels: dict) -> Path:
    reference = np.zeros((10, 10, 10), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    for folder in ("ref", "pred"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(reference, np.diag([2.0, 2.0, 3.0, 1.0])),
                 tmp_path / folder / "c1.nii.gz")
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(labels), encoding="utf-8")
    return path


def test_a_label_name_with_a_line_break_keeps_the_table_on_one_line(tmp_path, capsys):
    labels = _one_case(tmp_path, {"0": "background", "1": "left\nkidney"})
    run_evaluation(tmp_path / "pred", tmp_path / "ref", labels, tmp_path / "ev")
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("left\\nkidney ") for line in lines)
    assert not any(line.startswith("kidney") for line in lines)
    html = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    assert "1 case, 0 failed; 1 structure; " in html


def test_crossval_console_names_stay_on_one_line(capsys):
    from medseg.crossval import _print_folds, _print_postprocessing

    structures = {"left\nkidney": {"id": 1, "dice": 0.5, "dice_largest_component": 0.6,
                                   "apply": True}}
    _print_postprocessing({"largest_component": [1], "cases": 1, "structures": structures},
                          Plan.__new__(Plan))
    _print_folds({"0": {"cases": 1, "mean_dice": 0.5, "dice": {"left\nkidney": 0.5}}})
    out = capsys.readouterr().out
    assert "  left\\nkidney: 0.5000 -> 0.6000 (raises it)" in out
    assert "(left\\nkidney 0.5000)" in out


def test_a_prediction_holding_the_ignore_id_is_said_to_hold_it(tmp_path, capsys):
    """The map names id 2 `ignore`: the note called it "not in the label map"."""
    labels = _one_case(tmp_path, {"0": "background", "1": "liver", "2": "ignore"})
    path = tmp_path / "pred" / "c1.nii.gz"
    data = np.asarray(nib.load(path).dataobj)
    data[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    run_evaluation(tmp_path / "pred", tmp_path / "ref", labels, tmp_path / "ev")
    err = capsys.readouterr().err
    assert "not in the label map" not in err
    assert "label id 2, which the label map" in err and "names 'ignore'" in err
    html = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    assert "not in the label map" not in html
    assert "label id 2 of the prediction is the label map's 'ignore'" in html


def test_evaluate_notes_a_reference_whose_qform_and_sform_disagree(tmp_path, capsys):
    """predict notes such a header; evaluate said nothing, though ITK tools would place the
    reference (and the mask scored on its grid) elsewhere."""
    labels = _one_case(tmp_path, {"0": "background", "1": "liver"})
    path = tmp_path / "ref" / "c1.nii.gz"
    image = nib.load(path)
    moved = np.diag([2.0, 2.0, 3.0, 1.0])
    moved[:3, 3] = 30.0
    image.set_qform(moved, code=1)
    image.set_sform(np.diag([2.0, 2.0, 3.0, 1.0]), code=2)
    nib.save(image, path)
    run_evaluation(tmp_path / "pred", tmp_path / "ref", labels, tmp_path / "ev")
    err = capsys.readouterr().err
    assert "medseg: note: c1: reference: its NIfTI qform and sform place the voxels" in err
    html = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    assert "reference: its NIfTI qform and sform place the voxels" in html


def _range_text(allowed) -> str:
    """A config._Range as docs/workflows.md's range column writes it."""
    def num(v: float) -> str:
        return {10**7: "10^7", 2**32 - 1: "2^32 − 1"}.get(v, f"{v:g}")

    low = None if allowed.low is None else (
        f"above {num(allowed.low)}" if allowed.low_open else num(allowed.low))
    high = None if allowed.high is None else (
        f"below {num(allowed.high)}" if allowed.high_open else num(allowed.high))
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return low if allowed.low_open else f"at least {low}"
    return high if allowed.high_open else f"at most {high}"


def test_workflow_reference_gives_every_enforced_range():
    """config.py refuses numbers out of range (rotate_degrees 0-180, scale_range below 1,
    seeds up to 2^32 - 1, ...); docs/workflows.md gave few of those ranges."""
    import re

    from medseg.config import _RANGES

    text = (Path(__file__).resolve().parent.parent / "docs" / "workflows.md").read_text(
        encoding="utf-8")
    cells: dict[tuple[str, str], str] = {}
    for section in {s for s, _ in _RANGES}:
        body = re.search(rf"^## `{section}`\n(.*?)(?=^## |\Z)", text, re.M | re.S).group(1)
        for row in re.findall(r"^\| (`.*?) \| .*? \| (.*?) \|", body, re.M):
            keys = re.findall(r"`([^`]+)`", row[0])
            entries = row[1].split(", ")
            if len(entries) == len(keys):
                cells.update({(section, k): e for k, e in zip(keys, entries, strict=True)})
    wrong = {f"{s}.{k}": (cells.get((s, k)), _range_text(r)) for (s, k), r in _RANGES.items()
             if not cells.get((s, k), "").startswith(_range_text(r))}
    assert not wrong, f"docs/workflows.md (documented, enforced): {wrong}"
