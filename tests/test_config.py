from pathlib import Path

import pytest

from medseg.config import load_workflow, save_workflow, workflow_from_dict, workflow_to_dict
from medseg.errors import MedsegError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(text, encoding="utf-8")
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


def test_a_bad_override_is_named(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    with pytest.raises(MedsegError, match=r"^--set train.epochs=abc: "
                                          r"'train.epochs' must be an integer, got 'abc'"):
        load_workflow(path, ["train.val_every=2", "train.epochs=abc"])


def test_a_bad_value_of_the_file_names_the_file_not_the_good_overrides(tmp_path):
    path = write(tmp_path, "augment:\n  rotate_prob: 3\ntrain:\n  epochs: 3\n")
    with pytest.raises(MedsegError) as caught:
        load_workflow(path, ["train.iterations_per_epoch=1"])
    assert str(caught.value).startswith(f"{path}: 'augment.rotate_prob' must be")
    with pytest.raises(MedsegError, match=r"^--set train.spoch=1: unknown workflow key "
                                          r"'train.spoch'"):
        load_workflow(None, ["train.epochs=4", "train.spoch=1"])
    unknown = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(MedsegError) as caught:
        load_workflow(unknown, ["train.epochs=4"])
    assert str(caught.value).startswith(f"{unknown}: unknown workflow key 'train.epoch'")
    with pytest.raises(MedsegError, match=r"^--set train.fold=7: 'train.fold' must be below"):
        load_workflow(None, ["train.fold=7"])


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
    path.write_text("plan:\n  mirror_axes: [0, 3]\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=r"w\.yaml.*mirror_axes"):
        load_workflow(path)


def test_negative_shift_voxels_name_the_workflow(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("augment:\n  shift_voxels: -2\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=r"w\.yaml.*shift_voxels.*-2"):
        load_workflow(path)


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_ema_decay_outside_0_to_1_names_the_workflow(tmp_path, decay):
    path = tmp_path / "w.yaml"
    path.write_text(f"train:\n  ema_decay: {decay}\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=rf"w\.yaml.*ema_decay.*{decay}"):
        load_workflow(path)


@pytest.mark.parametrize("key, value, message", [
    ("train.epochs", "0", "'train.epochs' must be at least 1 and at most 1e\\+07, got 0"),
    ("train.num_workers", "100000", "'train.num_workers' must be at least 0 and at most 256, "
                                    "got 100000"),
    ("augment.shift_voxels", "2000", "'augment.shift_voxels' must be at least 0 and at most "
                                     "256, got 2000"),
    ("plan.base_filters", "100000000", "'plan.base_filters' must be at least 1 and at most "
                                       "4096, got 100000000"),
    ("plan.batch_size", "0", "'plan.batch_size' must be at least 1, got 0"),
    ("train.learning_rate", "-1", "'train.learning_rate' must be above 0, got -1.0"),
    ("train.max_minutes", ".nan", "'train.max_minutes' must be a finite number, got nan"),
    ("train.learning_rate", ".inf", "'train.learning_rate' must be a finite number, got inf"),
    ("augment.flip_prob", "2", "'augment.flip_prob' must be at least 0 and at most 1, got 2.0"),
    ("train.foreground_fraction", "1.5", "'train.foreground_fraction' must be at least 0 and "
                                         "at most 1, got 1.5"),
    ("train.folds", "1", "'train.folds' must be at least 2, got 1"),
    ("train.fold", "5", r"'train.fold' must be below 'train.folds' \(5\), got 5"),
    ("predict.step", "0", "'predict.step' must be above 0 and at most 1, got 0.0"),
    ("predict.step", "1.5", "'predict.step' must be above 0 and at most 1, got 1.5"),
    ("predict.sw_batch_size", "0", "'predict.sw_batch_size' must be at least 1, got 0"),
    ("plan.target_spacing", "[1, 0, 1]", r"'plan.target_spacing' must be above 0, got \[1.0, "),
    ("plan.patch_size", "[40, 56]", r"'plan.patch_size' must list 3 values \(one per axis\)"),
    ("predict.largest_component", "[0]", "'predict.largest_component' must be at least 1"),
    ("predict.min_component_ml", "{1: -2}", "'predict.min_component_ml' maps label ids"),
])
def test_values_out_of_range_name_the_key_and_the_workflow(tmp_path, key, value, message):
    path = tmp_path / "w.yaml"
    section, name = key.split(".")
    path.write_text(f"{section}:\n  {name}: {value}\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=rf"w\.yaml: {message}"):
        load_workflow(path)


def test_values_at_their_bounds_are_accepted():
    workflow = load_workflow(None, ["predict.step=1", "augment.flip_prob=0",
                                    "train.foreground_fraction=1", "train.fold=4",
                                    "train.num_workers=0", "train.weight_decay=0"])
    assert workflow.predict.step == 1.0 and workflow.train.fold == 4


def test_numbers_written_with_an_exponent_are_numbers(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1e-3\n")
    workflow = load_workflow(path, ["train.weight_decay=3e-5"])
    assert workflow.train.learning_rate == 0.001 and workflow.train.weight_decay == 3e-5


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 1\ntrain:\n  epochs: 100\n")
    with pytest.raises(MedsegError, match=r"wf.yaml: not valid YAML \(line 3\): key 'train' "
                                          r"given twice"):
        load_workflow(path, [])


def test_a_section_that_is_not_a_mapping_is_named_without_a_stray_dot():
    with pytest.raises(MedsegError, match="section 'train' must be a mapping"):
        load_workflow(None, ["train=3"])


def test_yaml_merge_keys_still_work(tmp_path):
    path = write(tmp_path, "x-common: &common\n  epochs: 2\ntrain:\n  <<: *common\n"
                           "  iterations_per_epoch: 3\n")
    with pytest.raises(MedsegError, match="unknown workflow key 'x-common'"):
        load_workflow(path)
    path = write(tmp_path, "train: &t\n  epochs: 2\npredict:\n  step: 0.5\n")
    assert load_workflow(path).train.epochs == 2
    path = write(tmp_path, "train:\n  <<: {epochs: 2}\n  iterations_per_epoch: 3\n")
    workflow = load_workflow(path)
    assert (workflow.train.epochs, workflow.train.iterations_per_epoch) == (2, 3)


def test_an_override_with_a_key_given_twice_is_refused():
    with pytest.raises(MedsegError, match="not valid YAML"):
        load_workflow(None, ["dataset.labels={1: a, 1: b}"])


def test_text_keys_keep_what_was_written(tmp_path):
    """`--set dataset.path=2024.10` is a folder name: YAML alone would make it 2024.1."""
    workflow = load_workflow(None, ["dataset.path=2024.10", "name=007"])
    assert Path(workflow.dataset.path).name == "2024.10" and workflow.name == "007"
    path = tmp_path / "wf.yaml"
    path.write_text("name: 1.10\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=r"wf.yaml: 'name' must be text, got the number 1.1; "
                                          r"put it in quotes"):
        load_workflow(path)
    path.write_text("name: 2024\n", encoding="utf-8")
    assert load_workflow(path).name == "2024"


def test_an_override_into_a_section_left_empty(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text("train:\n  # epochs: 3\n", encoding="utf-8")
    assert load_workflow(path, ["train.folds=2"]).train.folds == 2


def test_a_one_fold_splits_file_round_trips_and_optional_text_keeps_its_digits(tmp_path):
    import dataclasses

    workflow = load_workflow(None, ["train.splits_file=2024.10", "dataset.path=x"])
    assert Path(workflow.train.splits_file).name == "2024.10"
    one_fold = dataclasses.replace(workflow, train=dataclasses.replace(workflow.train, folds=1))
    save_workflow(one_fold, tmp_path / "workflow.yaml")
    assert load_workflow(tmp_path / "workflow.yaml").train.folds == 1
    with pytest.raises(MedsegError, match="'dataset.path' must be a string, got None"):
        load_workflow(None, ["dataset.path=null"])


def test_text_overrides_keep_comment_signs_and_yaml_indicators():
    """YAML cut `runs/my #2` at its comment (and read another folder) and refused `@scans`."""
    workflow = load_workflow(None, ["dataset.path=/data/my #1", "name=run #1",
                                    "train.splits_file=@splits/%a.json"])
    assert workflow.dataset.path == "/data/my #1" and workflow.name == "run #1"
    assert Path(workflow.train.splits_file).name == "%a.json"
    assert load_workflow(None, ["name='quoted #x'"]).name == "quoted #x"
    assert load_workflow(None, ["train.splits_file=null"]).train.splits_file is None


@pytest.mark.parametrize(("text", "message"), [
    ("[a, b]: 1\n", r"wf.yaml: not valid YAML \(line 1\): a key must be a plain name"),
    ("train: {3: x, fooo: 2}\n", "unknown workflow key 'train.3'"),
    ("train: false\n", "section 'train' must be a mapping"),
    ("plan: []\n", "section 'plan' must be a mapping"),
    ("train:\n  seed: -1\n", r"wf.yaml: 'train.seed' must be at least 0"),
    ("train:\n  split_seed: 4294967296\n", "'train.split_seed' must be at least 0 and at most"),
])
def test_malformed_workflows_are_refused_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(MedsegError, match=message):
        load_workflow(path)


@pytest.mark.parametrize(("labels", "message"), [
    ("{1: A, 2: A}", "label names must be unique; repeated: A"),
    ("{1: '', 2: P}", "label names must not be empty \\(id 1\\)"),
    ("{1: background}", "label names must be unique; repeated: background"),  # id 0's
])
def test_workflow_label_names_must_name_one_structure_each(labels, message):
    """Two ids of one name were trained, validated and scored as one structure (the mean
    Dice that picks the best checkpoint was the second id's alone)."""
    with pytest.raises(MedsegError, match=f"^--set dataset.labels=.*'dataset.labels': "
                                          f"{message}"):
        load_workflow(None, [f"dataset.labels={labels}"])
    assert load_workflow(None, ["dataset.labels={1: A, 2: P}"]).dataset.labels == {1: "A",
                                                                                   2: "P"}


def test_max_filters_below_base_filters_is_refused():
    """plan.max_filters=4 with 8 base filters silently gave filters [4, 4, 4, 4]."""
    with pytest.raises(MedsegError, match=r"^--set plan.base_filters=8 --set plan.max_filters=4: "
                                          r"'plan.max_filters' \(4\) "
                                          r"is below 'plan.base_filters' \(8\)"):
        load_workflow(None, ["plan.base_filters=8", "plan.max_filters=4"])
