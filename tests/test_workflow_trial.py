"""What a workflow trial found: YAML 1.1 read `010` as 8 and `1:30` as 90 (numbers and paths
changed without a word), `--set 'train={seed: 1}'` dropped the file's whole train section,
one label id spelled two ways kept only the second, a gap in dataset.labels was blamed on the
dataset folder, huge or deeply nested values ended in Python's own errors, and
`train --overwrite` deleted a dataset kept inside the old run folder before failing on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO

from medseg.cli import main
from medseg.config import load_workflow
from medseg.datasets import load_dataset
from medseg.errors import MedsegError
from medseg.plan import fingerprint


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_whole_numbers_are_read_as_written_in_decimal(tmp_path):
    workflow = load_workflow(write(tmp_path, "dataset:\n  path: 010\n  labels: {1: '1', 2: 1:30}"
                                             "\ntrain:\n  epochs: 10\n"))
    assert workflow.train.epochs == 10
    assert Path(workflow.dataset.path).name == "010"  # not '8'
    assert workflow.dataset.labels[2] == "1:30"  # not 90
    # YAML 1.1 reads 010 as 8 and int() as 10: an integer key refuses it, as the docs say
    for value in ("010", "0x10", "1:30", "0o10", "1_000"):
        with pytest.raises(MedsegError, match=f"'train.epochs' must be an integer \\(written in "
                                              f"decimal, without leading zeros\\), got '{value}'"):
            load_workflow(write(tmp_path, f"train:\n  epochs: {value}\n"))
    with pytest.raises(MedsegError, match="'train.epochs' must be an integer"):
        load_workflow(None, ["train.epochs=010"])
    assert load_workflow(None, ["train.learning_rate=3.0e-4"]).train.learning_rate == 3e-4


def test_a_section_given_as_a_mapping_keeps_the_files_other_keys():
    workflow = load_workflow(REPO / "workflows" / "hippocampus.yaml", ["train={seed: 1}"])
    shipped = load_workflow(REPO / "workflows" / "hippocampus.yaml")
    assert workflow.train.seed == 1
    assert workflow.train.epochs == shipped.train.epochs != 100  # not the default's
    assert workflow.train.optimizer == shipped.train.optimizer


def test_one_label_id_spelled_two_ways_is_refused(tmp_path):
    with pytest.raises(MedsegError, match=r"wf.yaml: 'dataset.labels' gives one key twice, "
                                          r"spelled two ways: \[1, '1'\]"):
        load_workflow(write(tmp_path, "dataset:\n  labels: {1: liver, '1': kidney}\n"))


def test_a_gap_in_dataset_labels_names_the_key(tmp_path):
    with pytest.raises(MedsegError, match=r"wf.yaml: 'dataset.labels': label ids must run 0, "
                                          r"1, 2, ... without a gap: 2 missing from 0, 1, 3"):
        load_workflow(write(tmp_path, "dataset:\n  labels: {1: liver, 3: spine}\n"))


def test_a_gap_in_a_dataset_json_label_map_names_that_file(phantom_dataset, tmp_path):
    root = tmp_path / "msd"
    shutil.copytree(phantom_dataset, root)
    description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    description["labels"] = {"0": "background", "1": "liver", "2": "kidney", "4": "spine"}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    with pytest.raises(MedsegError, match=r"msd/dataset.json: .*label ids must run 0, 1, 2"):
        fingerprint(load_dataset(root), progress=False)


@pytest.mark.parametrize(("text", "message"), [
    ("train:\n  learning_rate: " + "9" * 400, r"'train.learning_rate' must be a number, got "
                                              r"9{60}\.\.\. \(400 characters\)"),
    ("train:\n  epochs: " + "9" * 5001, r"not valid YAML: cannot read a value \(Exceeds the "
                                        r"limit \(4300 digits\)"),
    ("plan:\n  mirror_axes: " + "[" * 3000 + "]" * 3000, r"not valid YAML: nested too deeply"),
])
def test_huge_or_deeply_nested_values_are_named_not_python_errors(tmp_path, text, message):
    with pytest.raises(MedsegError, match=rf"wf.yaml: {message}"):
        load_workflow(write(tmp_path, text + "\n"))


def test_a_workflow_path_that_is_a_folder_or_unreadable_says_so(tmp_path, monkeypatch):
    with pytest.raises(MedsegError, match=r"a folder, not a workflow file"):
        load_workflow(tmp_path)
    path = write(tmp_path, "train:\n  epochs: 2\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # root reads a chmod 000 file anyway
    with pytest.raises(MedsegError, match=r"wf.yaml: cannot be read: permission denied"):
        load_workflow(path)


def test_overwrite_refuses_a_dataset_inside_the_run_folder(phantom_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text("{}", encoding="utf-8")  # what --overwrite replaces
    shutil.copytree(phantom_dataset, run / "data")
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 "--overwrite", "--set", f"dataset.path={run / 'data'}"]) == 2
    assert "--overwrite would delete dataset.path" in capsys.readouterr().err
    assert (run / "data" / "dataset.json").is_file()
    workflow = write(run, f"dataset:\n  path: {phantom_dataset}\n")
    assert main(["train", str(workflow), "--out", str(run), "--overwrite"]) == 2
    assert "--overwrite would delete the workflow file" in capsys.readouterr().err
    assert workflow.is_file()


def test_overwrite_refuses_a_case_file_a_csv_lists_from_the_run_folder(phantom_dataset,
                                                                      tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text("{}", encoding="utf-8")
    scan = run / "kept.nii.gz"
    shutil.copy(phantom_dataset / "imagesTr" / "phantom_000.nii.gz", scan)
    rows = [f"{scan},{phantom_dataset / 'labelsTr' / 'phantom_000.nii.gz'}"]
    rows += [f"{phantom_dataset / 'imagesTr' / name},{phantom_dataset / 'labelsTr' / name}"
             for name in (f"phantom_00{k}.nii.gz" for k in range(1, 6))]
    table = tmp_path / "cases.csv"
    table.write_text("image,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 "--overwrite", "--set", f"dataset.path={table}", "--set",
                 "dataset.layout=csv"]) == 2
    captured = capsys.readouterr()
    assert "--overwrite would delete a file of case kept" in captured.err
    assert scan.is_file()
    # the refusal comes before any line: train printed "dataset: 6 cases, ..." first
    assert "dataset:" not in captured.out
    assert captured.out == ""
    assert captured.err == (f"medseg: error: {run}: --overwrite would delete a file of case "
                            f"kept {scan}, which lies inside the run folder: move it out "
                            f"first\n")


def test_a_quoted_label_id_with_spaces_still_loads_and_a_signed_octal_gets_the_hint(tmp_path):
    workflow = load_workflow(write(tmp_path, "dataset:\n  labels: {' 1': liver, '2 ': kidney}\n"))
    assert workflow.dataset.labels == {1: "liver", 2: "kidney"}
    with pytest.raises(MedsegError, match=r"must be an integer \(written in decimal, without "
                                          r"leading zeros\), got '\+010'"):
        load_workflow(write(tmp_path, "train:\n  epochs: '+010'\n"))
