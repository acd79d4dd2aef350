"""`medseg plan WORKFLOW`: the fingerprint and plan train would make, printed and saved
without training."""

from pathlib import Path

from helpers import REPO, TINY_TRAINING, as_sets

from medseg.cli import main


def _args(phantom_dataset: Path) -> list[str]:
    return [str(REPO / "workflows" / "demo.yaml"),
            *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING])]


def test_plan_writes_what_train_wrote(trained_run, phantom_dataset, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", *_args(phantom_dataset), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("plan.json", "splits.json"):
        assert (out / name).read_bytes() == (trained_run / name).read_bytes(), name
    assert (out / "fingerprint.json").is_file() and (out / "workflow.yaml").is_file()
    assert "level 0: kernel" in printed and "class 1 liver:" in printed
    assert "channel 0 (CT): clipped to [" in printed
    # again into the same folder: its own files are replaced
    assert main(["plan", *_args(phantom_dataset), "--out", str(out)]) == 0


def test_plan_without_out_writes_nothing(phantom_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", *_args(phantom_dataset)]) == 0
    assert "target spacing (mm, R A S)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_plan_refuses_a_folder_of_other_files_before_reading_the_dataset(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine", encoding="utf-8")
    missing = tmp_path / "no_dataset"
    workflow = str(REPO / "workflows" / "demo.yaml")
    assert main(["plan", workflow, "--set", f"dataset.path={missing}", "--out",
                 str(busy)]) == 2
    err = capsys.readouterr().err
    assert "holds other files than a plan's (notes.txt)" in err
    assert main(["plan", workflow, "--set", f"dataset.path={missing}", "--out",
                 str(busy / "notes.txt" / "x")]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert main(["plan", workflow, "--set", "plan.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
