from pathlib import Path

import pytest

from medseg.config import load_workflow, save_workflow, workflow_from_dict, workflow_to_dict
from medseg.errors import MedsegError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  epochs: 3\n")
    workflow = load_workflow(path, ["train.learning_rate=0.5", "plan.patch_size=[8,8,8]"])
    assert workflow.name == "x"
    assert workflow.train.epochs == 3
    assert workflow.train.learning_rate == 0.5
    assert workflow.plan.patch_size == [8, 8, 8]
    assert workflow.train.folds == 5  # default kept


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  epocs: 3\n")
    with pytest.raises(MedsegError, match=r"wf.yaml: unknown workflow key 'train.epocs'"):
        load_workflow(path)


def test_unknown_override_key_is_an_error(tmp_path):
    with pytest.raises(MedsegError, match="unknown workflow key 'nope'"):
        load_workflow(None, ["nope=1"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=many", "must be an integer"),
    ("train.deterministic=3", "must be true or false"),
    ("train.optimizer=rmsprop", "choose one of sgd, adamw"),
    ("plan.patch_size=7", "must be a list"),
    ("train.epochs", "key=value"),
])
def test_bad_values(override, message):
    with pytest.raises(MedsegError, match=message):
        load_workflow(None, [override])


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "train:\n  epochs: [1,\n")
    with pytest.raises(MedsegError, match="not valid YAML"):
        load_workflow(path)


def test_missing_file():
    with pytest.raises(MedsegError, match="workflow file not found"):
        load_workflow("/nonexistent/wf.yaml")


def test_relative_dataset_path_resolves_from_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workflow = load_workflow(None, ["dataset.path=data/x"])
    assert workflow.dataset.path == str(tmp_path / "data" / "x")


def test_round_trip_through_saved_yaml(tmp_path):
    workflow = load_workflow(None, ["train.epochs=7", "dataset.labels={1: a}"])
    save_workflow(workflow, tmp_path / "saved.yaml")
    assert load_workflow(tmp_path / "saved.yaml") == workflow
    assert workflow_from_dict(workflow_to_dict(workflow)) == workflow


def test_shipped_workflows_load():
    for path in (Path(__file__).parent.parent / "workflows").glob("*.yaml"):
        load_workflow(path)


def test_bad_mirror_axes_name_the_workflow(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("plan:\n  mirror_axes: [0, 3]\n")
    with pytest.raises(MedsegError, match=r"w\.yaml.*mirror_axes"):
        load_workflow(path)


def test_negative_shift_voxels_name_the_workflow(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("augment:\n  shift_voxels: -2\n")
    with pytest.raises(MedsegError, match=r"w\.yaml.*shift_voxels.*-2"):
        load_workflow(path)


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_ema_decay_outside_0_to_1_names_the_workflow(tmp_path, decay):
    path = tmp_path / "w.yaml"
    path.write_text(f"train:\n  ema_decay: {decay}\n")
    with pytest.raises(MedsegError, match=rf"w\.yaml.*ema_decay.*{decay}"):
        load_workflow(path)
