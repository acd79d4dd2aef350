"""Runs on a console whose locale is plain ASCII, and text files always read as UTF-8.

CI machines and hospital servers often run with `LANG` unset or `LC_ALL=C`; Python then
opens text files as ASCII unless the code names the encoding.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("medseg", "tests", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py"))
NAME = "Leber Segment \u2163 \u2013 \u00fc"  # Roman IV, en dash, u-umlaut


def _ascii_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONIOENCODING="")
    return env


def _text_mode_call_without_encoding(call: ast.Call) -> bool:
    if any(keyword.arg == "encoding" for keyword in call.keywords):
        return False
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in ("read_text", "write_text"):
        return True
    if isinstance(func, ast.Name) and func.id == "open":
        mode = call.args[1] if len(call.args) > 1 else None
        mode = next((k.value for k in call.keywords if k.arg == "mode"), mode)
        return not (isinstance(mode, ast.Constant) and "b" in str(mode.value))
    if isinstance(func, ast.Attribute) and func.attr == "open" and call.args:
        mode = call.args[0]  # Path.open(mode); PIL's Image.open(file) takes a path, not a mode
        return isinstance(mode, ast.Constant) and mode.value in ("r", "w", "a", "x", "r+", "w+")
    return False


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_text_file_call_names_its_encoding(source):
    tree = ast.parse(source.read_text(encoding="utf-8"))
    lines = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Call) and _text_mode_call_without_encoding(node)]
    assert not lines, f"{source.name}: text file opened without encoding= at lines {lines}"


def test_the_checker_catches_a_missing_encoding():
    calls = [node for node in ast.walk(ast.parse(
        "p.read_text()\nopen(f)\nopen(f, 'rb')\np.open('a')\nImage.open(f)\n"))
        if isinstance(node, ast.Call)]
    assert [_text_mode_call_without_encoding(c) for c in calls] == [
        True, True, False, True, False]


def _masks(root: Path) -> None:
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    for folder in ("pred", "ref"):
        (root / folder).mkdir()
        nib.save(nib.Nifti1Image(mask, np.eye(4)), root / folder / "c1.nii.gz")


def test_evaluate_with_non_ascii_label_names_on_an_ascii_console(tmp_path):
    _masks(tmp_path)
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"0": "background", "1": NAME}},
                                 ensure_ascii=False), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from medseg.cli import main; sys.exit(main())",
         "evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
         "--labels", str(labels), "--out", str(tmp_path / "ev")],
        capture_output=True, env=_ascii_env(), timeout=300)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert b"Leber Segment" in result.stdout
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text(encoding="utf-8"))
    assert list(summary["structures"]) == [NAME]
    assert NAME in (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    assert NAME in (tmp_path / "ev" / "scores.csv").read_text(encoding="utf-8")


def test_workflow_with_non_ascii_text_loads_on_an_ascii_console(tmp_path):
    workflow = tmp_path / "w.yaml"
    workflow.write_text(f"# {NAME}\ndataset:\n  path: data\n", encoding="utf-8")
    script = ("import sys; from medseg.config import load_workflow; "
              "print(load_workflow(sys.argv[1]).dataset.path)")
    result = subprocess.run([sys.executable, "-c", script, str(workflow)],
                            capture_output=True, env=_ascii_env(), timeout=300)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert result.stdout.strip().endswith(b"data")


def test_text_files_saved_with_a_byte_order_mark_are_read(tmp_path):
    from medseg.config import load_workflow
    from medseg.datasets import label_names_from_json, load_dataset

    bom = "\ufeff"
    (tmp_path / "files").mkdir()
    for name in ("a.nii.gz", "a_seg.nii.gz"):
        (tmp_path / "files" / name).write_bytes(b"x")
    (tmp_path / "dataset.csv").write_text(f"{bom}image,label\nfiles/a.nii.gz,files/a_seg.nii.gz\n",
                                          encoding="utf-8")
    (tmp_path / "labels.json").write_text(bom + json.dumps({"0": "background", "1": NAME}),
                                          encoding="utf-8")
    (tmp_path / "w.yaml").write_text(f"{bom}train:\n  epochs: 3\n", encoding="utf-8")
    assert [c.name for c in load_dataset(tmp_path).cases] == ["a"]
    assert label_names_from_json(tmp_path / "labels.json") == {0: "background", 1: NAME}
    assert load_workflow(tmp_path / "w.yaml").train.epochs == 3


@pytest.mark.parametrize("name, text", [
    ("dataset.csv", "image,label\nf\u00fcr.nii.gz,x.nii.gz\n"),
    ("labels.json", json.dumps({"0": "background", "1": "f\u00fcr"}, ensure_ascii=False)),
    ("w.yaml", "# f\u00fcr\ntrain:\n  epochs: 3\n"),
])
def test_text_in_another_encoding_is_refused_in_one_line(tmp_path, name, text):
    from medseg.config import load_workflow
    from medseg.datasets import label_names_from_json, load_dataset
    from medseg.errors import MedsegError

    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))  # what an old Windows editor saves
    read = {"dataset.csv": load_dataset, "labels.json": label_names_from_json,
            "w.yaml": load_workflow}[name]
    with pytest.raises(MedsegError, match=rf"{name}: not UTF-8 text \(invalid .* at byte \d+") \
            as caught:
        read(path)
    assert "\n" not in str(caught.value)
