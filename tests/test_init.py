"""Fine-tuning: `medseg train --init SOURCE` (train.init) starts from a trained run's weights,
all but the segmentation heads, as nnU-Net's -pretrained_weights."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, TINY_TRAINING, as_sets
from safetensors.torch import load_file

import medseg.train
from medseg.cli import main
from medseg.model import is_segmentation_head

QUICK = [*TINY_TRAINING, "train.epochs=1", "train.iterations_per_epoch=1",
         "train.val_max_cases=0"]


def train(out, dataset, *extra, init=None, overwrite=False):
    return main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={dataset}", *QUICK, *extra]),
                 *(["--init", str(init)] if init else []),
                 *(["--overwrite"] if overwrite else [])])


@pytest.fixture
def step_0_weights(monkeypatch):
    """The network's state dict as the first training step gets it (one per fold trained)."""
    seen = []
    train_epoch = medseg.train._train_epoch

    def first_epoch(model, *args, **kwargs):
        if len(seen) == 0:
            seen.append({name: t.detach().cpu().clone() for name, t in
                         model.state_dict().items()})
        return train_epoch(model, *args, **kwargs)

    monkeypatch.setattr(medseg.train, "_train_epoch", first_epoch)
    return seen


def error_line(capsys):
    """The one error line of stderr (notes and progress bars may come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    return errors[0]


def best_weights(run):
    return run / "fold_0" / "checkpoints" / "best.safetensors"


def assert_started_from(state, source):
    """Every tensor of the source but the heads, and heads of their own."""
    heads = [name for name in source if is_segmentation_head(name)]
    assert heads and len(heads) < len(source)
    for name, tensor in source.items():
        if name in heads:
            assert state[name].shape != tensor.shape or not torch.equal(state[name], tensor)
        else:
            assert torch.equal(state[name], tensor), name


def test_init_from_a_run_folder_or_its_file_starts_from_its_weights(
        tmp_path, trained_run, phantom_dataset, step_0_weights, capsys, monkeypatch):
    source = load_file(best_weights(trained_run))
    assert train(tmp_path / "from_run", phantom_dataset, init=trained_run) == 0
    assert_started_from(step_0_weights.pop(), source)
    out = capsys.readouterr().out
    assert (f"fold_0: initialized from {best_weights(trained_run)}: 45 tensors loaded, 6 "
            f"skipped (segmentation heads: deep_supervision_heads.0, deep_supervision_heads.1, "
            f"output_block)") in out
    saved = yaml.safe_load((tmp_path / "from_run" / "workflow.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["init"] == str(trained_run)

    # a .safetensors file outside a run folder, named by the workflow key (relative path)
    shutil.copy(best_weights(trained_run), tmp_path / "weights.safetensors")
    monkeypatch.chdir(tmp_path)
    assert train(tmp_path / "from_file", phantom_dataset,
                 "train.init=weights.safetensors") == 0
    assert_started_from(step_0_weights.pop(), source)
    first = json.loads((tmp_path / "from_file" / "fold_0" / "metrics.jsonl")
                       .read_text(encoding="utf-8").splitlines()[0])
    assert first["init"]["source"] == str(tmp_path / "weights.safetensors")
    assert first["init"]["tensors_loaded"] == 45
    assert first["init"]["tensors_skipped"][-1] == "output_block.conv.conv.weight"
    saved = yaml.safe_load((tmp_path / "from_file" / "workflow.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["init"] == str(tmp_path / "weights.safetensors")


def test_init_with_another_class_count_leaves_the_heads_out(
        tmp_path, trained_run, phantom_dataset, step_0_weights, capsys):
    data = tmp_path / "two_structures"
    shutil.copytree(phantom_dataset, data)
    for path in (data / "labelsTr").iterdir():  # the spine is background here
        image = nib.load(path)
        label = np.asarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.where(label == 3, 0, label).astype(np.uint8),
                                 image.affine), path)
    listing = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    listing["labels"] = {"0": "background", "1": "liver", "2": "kidney"}
    (data / "dataset.json").write_text(json.dumps(listing), encoding="utf-8")
    # a workflow that leaves the network to the plan: the source run's keys are taken
    workflow = tmp_path / "mine.yaml"
    workflow.write_text("dataset:\n  layout: msd\nplan:\n  batch_size: 2\n", encoding="utf-8")
    run = tmp_path / "run"
    capsys.readouterr()
    not_the_plan = [item for item in QUICK if not item.startswith("plan.")]
    assert main(["train", str(workflow), "--out", str(run), "--init", str(trained_run),
                 *as_sets([f"dataset.path={data}", *not_the_plan])]) == 0
    assert_started_from(step_0_weights.pop(), load_file(best_weights(trained_run)))
    assert load_file(best_weights(run))["output_block.conv.conv.weight"].shape[0] == 3
    assert load_file(best_weights(trained_run))["output_block.conv.conv.weight"].shape[0] == 4
    note = next(line for line in capsys.readouterr().err.splitlines() if "train.init" in line)
    assert (", plan.patch_size=[32,32,16], plan.base_filters=4, plan.max_filters=16 taken from "
            f"{trained_run / 'plan.json'} so that its weights fit") in note
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    assert plan["filters"] == [4, 8, 16, 16] and plan["num_classes"] == 3
    saved = yaml.safe_load((run / "workflow.yaml").read_text(encoding="utf-8"))["plan"]
    assert (saved["patch_size"], saved["base_filters"], saved["max_filters"]) == \
        ([32, 32, 16], 4, 16)


def test_another_network_is_refused_naming_the_file_and_the_fix(
        tmp_path, trained_run, phantom_dataset, capsys):
    run = tmp_path / "new" / "run"
    capsys.readouterr()
    assert train(run, phantom_dataset, "plan.base_filters=8", "plan.max_filters=32",
                 init=trained_run) == 2
    err = error_line(capsys)
    assert err.startswith(f"medseg: error: {best_weights(trained_run)}: train.init: these "
                          f"weights do not fit this run's network (heads aside): 45 tensor(s) "
                          f"of another shape (the first: input_block.conv1.conv.weight, "
                          f"[4, 1, 3, 3, 3] in the file, [8, 1, 3, 3, 3] here)")
    assert err.endswith("its run's plan.json differs: filters [4,8,16,16] there, "
                        "[8,16,32,32] here: --set plan.base_filters=4 --set "
                        "plan.max_filters=16 makes the plans agree")
    assert not (tmp_path / "new").exists()  # no run folder, nor the folder made for it

    # a file outside a run folder: what it holds is read off its tensors
    shutil.copy(best_weights(trained_run), tmp_path / "weights.safetensors")
    assert train(run, phantom_dataset, "plan.base_filters=8",
                 init=tmp_path / "weights.safetensors") == 2
    err = error_line(capsys)
    assert err.startswith(f"medseg: error: {tmp_path / 'weights.safetensors'}")
    assert err.endswith("the file differs: filters [4,8,16,16] there, [8,16,16,16] here: "
                        "--set plan.base_filters=4 --set plan.max_filters=16 makes the plans "
                        "agree")
    assert not (tmp_path / "new").exists()


def test_resume_goes_on_from_its_own_checkpoint_without_the_init_weights(
        tmp_path, trained_run, phantom_dataset, capsys):
    source = tmp_path / "weights.safetensors"
    shutil.copy(best_weights(trained_run), source)
    settings = ["train.epochs=2", "train.deterministic=true", "train.seed=3"]
    assert train(tmp_path / "straight", phantom_dataset, *settings, init=source) == 0
    assert train(tmp_path / "split", phantom_dataset, *settings, "train.max_minutes=0.00001",
                 init=source) == 0
    source.unlink()  # the resume must not need it
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    assert "initialized from" not in capsys.readouterr().out
    straight, split = (torch.load(run / "fold_0" / "checkpoints" / "last_state.pt",
                                  weights_only=True)
                       for run in (tmp_path / "straight", tmp_path / "split"))
    assert straight["epoch"] == split["epoch"] == 1
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    curves = [[json.loads(line) for line in (tmp_path / run / "fold_0" / "metrics.jsonl")
               .read_text(encoding="utf-8").splitlines()] for run in ("straight", "split")]
    assert [r["train_loss"] for r in curves[0]] == [r["train_loss"] for r in curves[1]]
    assert curves[1][0]["init"]["source"] == str(source) and "init" not in curves[1][1]

    assert main(["train", "--resume", str(tmp_path / "split"), "--init", str(source)]) == 2
    assert "--resume goes on from the run's own checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "split"), "--set",
                 f"train.init={source}"]) == 2
    assert "not 'train.init=" in capsys.readouterr().err


def test_a_missing_or_unreadable_source_is_one_line_naming_it(
        tmp_path, trained_run, phantom_dataset, capsys):
    pickled = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, pickled)
    not_a_run = tmp_path / "somewhere"
    not_a_run.mkdir()
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(trained_run / "plan.json", untrained / "plan.json")
    cases = [
        (tmp_path / "nowhere", tmp_path / "nowhere", "not found (train.init takes a run "
         "folder made by `medseg train`, RUN/fold_K, a model archive of `medseg export` or "
         "a .safetensors file)"),
        (trained_run / "fold_3", trained_run / "fold_3",
         "no such fold in this run (trained: fold_0)"),
        (not_a_run, not_a_run, "a folder that is not a medseg run (no plan.json) nor one of "
         "its fold_K folders"),
        (untrained, untrained, "this run has no fold_0/checkpoints/best.safetensors (no fold "
         "is trained): train it first, or give another source"),
        (pickled, pickled, "not readable as safetensors weights (Error while deserializing "
         "header: "),
    ]
    for source, named, message in cases:
        capsys.readouterr()
        assert train(tmp_path / "new" / "run", phantom_dataset, init=source) == 2, source
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"medseg: error: {named}: train.init: {message}"), err
        assert "\n" not in err and "Traceback" not in err  # refused before any work
        assert not (tmp_path / "new").exists()
    assert "medseg reads weights without pickle" in err  # the .pt file's
    # --overwrite would delete a source inside the run folder
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert train(run, phantom_dataset, init=run, overwrite=True) == 2
    assert "--overwrite would delete the train.init weights" in capsys.readouterr().err
    assert best_weights(run).is_file()


def test_a_source_of_another_modality_is_noted(tmp_path, trained_run, phantom_dataset,
                                               capsys):
    """The phantoms read as MR (z-score over nonzero voxels) from a CT run's weights."""
    capsys.readouterr()
    assert train(tmp_path / "mr", phantom_dataset, "dataset.modality=MR", init=trained_run) == 0
    err = capsys.readouterr().err
    assert (f"medseg: note: train.init: {trained_run / 'plan.json'} was trained on CT, this "
            f"run on MR: the weights load, but expect less from them") in err
    capsys.readouterr()
    assert train(tmp_path / "ct", phantom_dataset, init=trained_run) == 0
    assert "was trained on" not in capsys.readouterr().err


def test_a_workflow_giving_network_keys_as_null_is_told_why_they_are_not_taken(
        trained_run, capsys):
    """A run's saved workflow.yaml lists plan.patch_size: null: that key is planned from the
    new data (the source's weights may then not fit), and a note says so."""
    from medseg.config import keys_given, load_workflow
    from medseg.pretrained import adopt_source_network, resolve_init

    overrides = ["plan.patch_size=null"]
    workflow = load_workflow(None, overrides)
    adopted = adopt_source_network(workflow, resolve_init(str(trained_run)),
                                   keys_given(None, overrides))
    assert adopted.plan.patch_size is None
    err = capsys.readouterr().err
    assert (f"medseg: note: train.init: the workflow gives plan.patch_size: null (as a run's "
            f"saved workflow.yaml does), so this dataset's plan decides, not "
            f"{trained_run / 'plan.json'}; leave the key out") in err
    adopt_source_network(load_workflow(None), resolve_init(str(trained_run)), frozenset())
    assert "gives plan." not in capsys.readouterr().err
