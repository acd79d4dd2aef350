"""Review s27Q: the documentation tells a new user the truth about the CLI and workflows."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest
from helpers import REPO, TINY_TRAINING, as_sets

from medseg.cli import _parser, main

DOCS = REPO / "docs"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_has_help_text(command):
    """`medseg CMD --help` explains every option (check's --layout showed only its choices)."""
    silent = [action.option_strings or [action.dest] for action in _subcommands()[command]._actions
              if not (action.help or "").strip()]
    assert not silent, f"medseg {command} --help: no help text for {silent}"


def _run_folder_row(name: str) -> str:
    """The meaning docs/formats.md gives a file of the run folder (its table's row)."""
    text = (DOCS / "formats.md").read_text(encoding="utf-8")
    match = re.search(rf"^\| `{re.escape(name)}` \| (.*) \|$", text, re.M)
    assert match, f"docs/formats.md's run folder table has no row for {name}"
    return match.group(1)


def test_metrics_jsonl_keys_are_documented(tmp_path, trained_run, phantom_dataset):
    """formats.md's row of metrics.jsonl names every key a run writes there, a fine-tuned
    run's `init` (the weights it started from) included."""
    run = tmp_path / "tuned"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 "--init", str(trained_run),
                 *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING,
                           "train.epochs=1", "train.iterations_per_epoch=1"])]) == 0
    keys = {key for folder in (trained_run, run)
            for line in (folder / "fold_0" / "metrics.jsonl").read_text(
                encoding="utf-8").splitlines() for key in json.loads(line)}
    documented = _run_folder_row("fold_K/metrics.jsonl")
    missing = sorted(key for key in keys if f"`{key}`" not in documented)
    assert not missing, f"docs/formats.md, fold_K/metrics.jsonl: {missing}"


@pytest.mark.parametrize("name", ["plan.json", "fingerprint.json"])
def test_run_folder_json_keys_are_documented(trained_run, name):
    """formats.md's run folder table names every key of plan.json and fingerprint.json."""
    keys = json.loads((trained_run / name).read_text(encoding="utf-8"))
    documented = _run_folder_row(name)
    missing = sorted(key for key in keys if f"`{key}`" not in documented)
    assert not missing, f"docs/formats.md, {name}: {missing}"


def test_evaluation_outputs_are_as_documented(tmp_path, phantom_dataset):
    """scores.csv's columns are formats.md's list, in its order, and summary.json's keys
    are all named there."""
    pred = tmp_path / "pred"
    shutil.copytree(phantom_dataset / "labelsTs", pred)
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(phantom_dataset / "labelsTs"),
                 "--labels", str(phantom_dataset / "dataset.json"), "--out", str(out)]) == 0
    section = (DOCS / "formats.md").read_text(encoding="utf-8").split("## Evaluation")[1]
    columns = re.search(r"`scores.csv`: one row per case and structure:\s*`([^`]+)`", section)
    header = (out / "scores.csv").read_text(encoding="utf-8").splitlines()[0]
    assert columns and header == re.sub(r"\s+", " ", columns.group(1)).replace(", ", ",")
    summary_doc = section.split("- `summary.json`:")[1].split("- `report.html`")[0]
    keys = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    missing = sorted(key for key in keys if f"`{key}`" not in summary_doc)
    assert not missing, f"docs/formats.md, summary.json: {missing}"


def test_training_state_keys_are_documented(trained_run):
    """formats.md's row of last_state.pt names each key a training state holds (it said
    "weights" for the key `model`, and "epoch, optimizer and scheduler state" unquoted)."""
    import torch

    state = torch.load(trained_run / "fold_0" / "checkpoints" / "last_state.pt",
                       weights_only=True)
    documented = _run_folder_row("fold_K/checkpoints/last_state.pt")
    missing = sorted(key for key in state if f"`{key}`" not in documented)
    assert not missing, f"docs/formats.md, last_state.pt: {missing}"


def _nested_keys(record: dict, path: str) -> set[str]:
    """The keys at `path` ("crossval.folds.*") of a JSON record, '*' standing for any key."""
    nodes = [record]
    for part in path.split(".") if path else []:
        nodes = [value for node in nodes for key, value in node.items()
                 if part in ("*", key) and isinstance(value, dict)]
    return {key for node in nodes for key in node}


def test_crossval_outputs_are_as_documented(two_fold_run, tmp_path):
    """The keys of crossval.json, postprocessing.json and summary.json's crossval section
    are named in docs/formats.md's cross-validation table."""
    out = tmp_path / "cv"
    assert main(["crossval", str(two_fold_run), "--out", str(out)]) == 0
    section = (DOCS / "formats.md").read_text(encoding="utf-8").split("## Cross-validation")[1]
    section = section.split("\n## ")[0]
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.*) \|$", section, re.M))
    checks = [("crossval.json", "crossval.json", ""),
              ("crossval.json", "crossval.json", "arithmetic"),
              ("crossval.json", "crossval.json", "predict"), ("postprocessing.json",
              "postprocessing.json", ""), ("postprocessing.json", "postprocessing.json",
              "structures.*"), ("summary.json", "summary.json", "crossval"),
              ("summary.json", "summary.json", "crossval.folds.*")]
    missing = []
    for name, row, path in checks:
        record = json.loads((out / name).read_text(encoding="utf-8"))
        missing += [f"{name}: {path}.{key}" for key in sorted(_nested_keys(record, path))
                    if f"`{key}`" not in rows[row]]
    assert not missing, f"docs/formats.md, Cross-validation: {missing}"


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_default_is_given_in_help(command):
    """An option with a default of its own says it in --help, as docs/cli.md does (demo's
    --seed said only "phantom seed")."""
    unsaid = [action.option_strings for action in _subcommands()[command]._actions
              if action.default not in (None, [], argparse.SUPPRESS)
              and action.default is not False and "default" not in (action.help or "")]
    assert not unsaid, f"medseg {command} --help: no default given for {unsaid}"
