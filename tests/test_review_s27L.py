"""Review s27L: export and the archive's own limits, export's half-made folders, one-case
splits files, resume of a run fine-tuned from an archive."""

from __future__ import annotations

import shutil
from pathlib import Path

from medseg import archive
from medseg.cli import main


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def test_export_refuses_a_metrics_file_that_opening_the_archive_would_refuse(
        trained_run, tmp_path, monkeypatch, capsys):
    run = _copy_run(trained_run, tmp_path)
    metrics = run / "fold_0" / "metrics.jsonl"
    # the limit lowered below this run's metrics.jsonl (a real one would be over 64 MB)
    monkeypatch.setattr(archive, "TEXT_LIMIT", metrics.stat().st_size - 1)
    target = tmp_path / "model.zip"
    assert main(["export", str(run), str(target)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(metrics) in err and "could not be opened" in err
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
