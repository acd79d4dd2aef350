"""Training loop guarantees: exact resume, clean wall-clock stop."""

import json
import re

import pytest
import torch
from helpers import REPO, TINY_TRAINING, as_sets

from medseg.cli import main
from medseg.errors import MedsegError
from medseg.predict import load_predictor

DETERMINISTIC = [*TINY_TRAINING, "train.deterministic=true", "train.num_workers=0",
                 "train.seed=3"]


def train(out, dataset, *extra):
    return main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={dataset}", *DETERMINISTIC, *extra])])


def metrics(run):
    lines = (run / "fold_0" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def final_state(run):
    return torch.load(run / "fold_0" / "checkpoints" / "last_state.pt", weights_only=True)


@pytest.mark.parametrize("ema", [[], ["train.ema_decay=0.9"]], ids=["plain", "weight_average"])
def test_resume_repeats_the_uninterrupted_run(tmp_path, phantom_dataset, ema):
    assert train(tmp_path / "straight", phantom_dataset, *ema) == 0
    # the same run, stopped by the wall-clock budget after its first epoch, then resumed
    assert train(tmp_path / "split", phantom_dataset, "train.max_minutes=0.00001", *ema) == 0
    first = metrics(tmp_path / "split")
    assert [r["epoch"] for r in first] == [0]  # stopped cleanly after one epoch
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0

    straight, split = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert straight["epoch"] == split["epoch"] == 1
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert straight["scheduler"]["last_epoch"] == split["scheduler"]["last_epoch"]
    assert ("ema" in straight) == ("ema" in split) == bool(ema)
    for name, tensor in straight.get("ema", {}).items():
        assert torch.equal(tensor, split["ema"][name]), name
    curve, reference = metrics(tmp_path / "split"), metrics(tmp_path / "straight")
    assert [r["epoch"] for r in curve] == [0, 1]
    assert curve[1]["elapsed_seconds"] >= (curve[0]["elapsed_seconds"]  # the run's clock
                                           + curve[1]["epoch_seconds"] - 0.05)  # goes on
    assert [r["train_loss"] for r in curve] == [r["train_loss"] for r in reference]
    for weights in ("last.safetensors", "best.safetensors"):  # the files, byte for byte
        assert (tmp_path / "straight" / "fold_0" / "checkpoints" / weights).read_bytes() == \
            (tmp_path / "split" / "fold_0" / "checkpoints" / weights).read_bytes(), weights


def test_resume_refuses_extra_arguments(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--resume takes the run folder alone" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--set", "train.epochs=3"]) == 2
    assert ("may only change train.max_minutes, dataset.path, train.cache, train.num_workers, "
            "not 'train.epochs=3'"
            in capsys.readouterr().err)


def test_resume_may_give_a_new_budget(tmp_path, phantom_dataset):
    from medseg.config import load_workflow

    run = tmp_path / "run"
    assert train(run, phantom_dataset, "train.max_minutes=0.00001") == 0
    assert [r["epoch"] for r in metrics(run)] == [0]
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=null"]) == 0
    assert [r["epoch"] for r in metrics(run)] == [0, 1]  # no longer stopped after an epoch
    assert load_workflow(run / "workflow.yaml").train.max_minutes is None


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medseg: error: {tmp_path}: not a medseg run folder (no workflow.yaml)"]


def test_resume_of_a_missing_folder(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medseg: error: {tmp_path / 'nowhere'}: run folder not found"]


def test_dice_term_can_leave_out_the_background():
    """Dice+CE is cross-entropy plus the mean soft Dice loss of the classes in the Dice term:
    all three by default, only the two structures with `dice_include_background: false`;
    over the batch as one volume by default, per patch with `batch_dice: false`."""
    from medseg.config import TrainConfig
    from medseg.plan import Plan
    from medseg.train import loss_function

    plan = Plan(target_spacing=[1.0] * 3, patch_size=[8] * 3, batch_size=1, kernels=[[3] * 3],
                strides=[[1] * 3], filters=[4], deep_supervision=False, in_channels=1,
                num_classes=3, labels={0: "background", 1: "a", 2: "b"}, modalities=["MR"],
                normalization=[{"scheme": "mr"}], median_shape=[8] * 3)
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=generator)
    logits = torch.randn(2, 3, 8, 8, 8, generator=generator)
    probabilities = logits.softmax(1)
    truth = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float()
    dims = (0, 2, 3, 4)  # batch Dice: the whole batch as one volume
    dice_loss = 1 - (2 * (probabilities * truth).sum(dims) + 1e-5) / (
        probabilities.sum(dims) + truth.sum(dims) + 1e-5)
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0])
    with_bg = loss_function(plan, TrainConfig())(logits, label)
    without_bg = loss_function(plan, TrainConfig(dice_include_background=False))(logits, label)
    assert torch.isclose(with_bg, ce + dice_loss.mean(), atol=1e-5)
    assert torch.isclose(without_bg, ce + dice_loss[1:].mean(), atol=1e-5)
    per_patch = loss_function(plan, TrainConfig(batch_dice=False))(logits, label)
    dims = (2, 3, 4)  # each patch on its own, then the mean over patches and classes
    dice_loss = 1 - (2 * (probabilities * truth).sum(dims) + 1e-5) / (
        probabilities.sum(dims) + truth.sum(dims) + 1e-5)
    assert torch.isclose(per_patch, ce + dice_loss.mean(), atol=1e-5)


def test_weight_average_moves_by_one_minus_decay_and_is_what_is_saved(tmp_path,
                                                                       phantom_dataset):
    from medseg.train import weight_average

    assert weight_average(torch.nn.Linear(2, 2), 0.0) is None
    model = torch.nn.Linear(2, 2)
    average = weight_average(model, 0.9)
    average.update_parameters(model)  # the first update copies the weights
    first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update_parameters(model)
    assert torch.allclose(average.module.weight, 0.9 * first + 0.1 * model.weight)

    # the checkpoints a run keeps are the average, not the last optimizer step
    assert train(tmp_path / "run", phantom_dataset, "train.ema_decay=0.9") == 0
    from safetensors.torch import load_file

    state = final_state(tmp_path / "run")
    kept = load_file(tmp_path / "run" / "fold_0" / "checkpoints" / "last.safetensors")
    name = next(key for key in kept if key.endswith("weight") and kept[key].dim() == 5)
    assert torch.equal(kept[name], state["ema"][f"module.{name}"].contiguous())
    assert not torch.equal(kept[name], state["model"][name].contiguous())


def test_resume_with_a_weight_average_needs_one_in_the_state(tmp_path):
    from medseg.errors import MedsegError
    from medseg.train import _load_state, _save_state, weight_average

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / "last_state.pt"
    _save_state(path, model, optimizer, scheduler, scaler, epoch=0, best={})
    with pytest.raises(MedsegError, match=r"last_state\.pt.*no weight average"):
        _load_state(path, model, optimizer, scheduler, scaler, weight_average(model, 0.9))


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path):
    from medseg.train import _load_state, _save_state

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = model(torch.ones(1, 2)).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update(new_scale=256.0)
    _save_state(tmp_path / "last_state.pt", model, optimizer, scheduler, scaler, epoch=3,
                best={})
    restored = torch.amp.GradScaler("cpu")
    epoch, _ = _load_state(tmp_path / "last_state.pt", model, optimizer, scheduler, restored)
    assert epoch == 4 and restored.get_scale() == 256.0


def test_a_half_written_metrics_line_is_dropped_on_resume(tmp_path):
    from medseg.train import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "train_loss": 1.0}\n{"epoch": 1, "train_loss": 0.9}\n'
                    '{"epoch": 2, "tra', encoding="utf-8")
    _truncate_metrics(path, next_epoch=2)
    assert path.read_text(encoding="utf-8").splitlines() == [
        '{"epoch": 0, "train_loss": 1.0}', '{"epoch": 1, "train_loss": 0.9}']


def test_a_damaged_metrics_line_before_others_is_named_on_resume(tmp_path, capsys):
    """A half-written last line is a kill's; one before others is damage, and its epoch's
    record vanished without a word."""
    from medseg.train import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 0, "train_loss": 1.0}\n{"epoch": 1, "tr\xff\xfe\n'
                     b'{"epoch": 2, "train_loss": 0.8}\n{"epoch": 3, "tra')
    _truncate_metrics(path, next_epoch=3)
    assert path.read_text(encoding="utf-8").splitlines() == [
        '{"epoch": 0, "train_loss": 1.0}', '{"epoch": 2, "train_loss": 0.8}']
    err = capsys.readouterr().err
    assert f"{path}: 1 damaged line before the last could not be read" in err
    path.write_text('{"epoch": 0}\n{"epoch": 1, "tra', encoding="utf-8")
    _truncate_metrics(path, next_epoch=1)
    assert "damaged" not in capsys.readouterr().err  # a kill's half line is no news


def test_resume_after_fold_all_trains_the_folds_never_started(tmp_path, phantom_dataset,
                                                              capsys):
    import shutil

    run = tmp_path / "all"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 "--fold", "all", *as_sets([f"dataset.path={phantom_dataset}", *DETERMINISTIC,
                                            "train.folds=2", "train.max_minutes=0.00001"])]) == 0
    assert json.loads((run / "folds.json").read_text(encoding="utf-8")) == [0, 1]
    shutil.rmtree(run / "fold_1")  # as if the run had been stopped during fold 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "fold_0: resuming" in out and "fold_1: starting" in out
    assert (run / "fold_1" / "checkpoints" / "best.safetensors").is_file()


def test_resume_of_a_fold_never_asked_for_adds_it_to_the_run(tmp_path, phantom_dataset,
                                                             capsys):
    run = tmp_path / "run"
    assert train(run, phantom_dataset, "train.folds=2", "train.max_minutes=0.00001") == 0
    assert main(["train", "--resume", str(run), "--fold", "1"]) == 0
    assert json.loads((run / "folds.json").read_text(encoding="utf-8")) == [0, 1]
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "fold_0: resuming" in out and "fold_1: resuming" in out


def _lose_first_case(listing: dict) -> None:
    listing["training"] = listing["training"][1:]


def _add_a_label(listing: dict) -> None:
    listing["labels"]["7"] = "new structure"


@pytest.mark.parametrize("change, message", [
    (_lose_first_case, "splits.json: the dataset no longer has case(s) phantom_000"),
    (_add_a_label, "plan.json: the dataset's label ids [0, 1, 2, 3, 7] differ from the run's "
                   "[0, 1, 2, 3]"),
], ids=["lost_cases", "relabelled"])
def test_resume_on_a_changed_dataset_is_refused(tmp_path, phantom_dataset, capsys, change,
                                                message):
    import shutil

    dataset = tmp_path / "data"
    shutil.copytree(phantom_dataset, dataset)
    run = tmp_path / "run"
    assert train(run, dataset, "train.max_minutes=0.00001") == 0
    description = dataset / "dataset.json"
    listing = json.loads(description.read_text(encoding="utf-8"))
    change(listing)
    description.write_text(json.dumps(listing), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert message in capsys.readouterr().err


def test_resume_on_another_collection_of_the_same_case_names_is_refused(
        tmp_path, phantom_dataset, capsys):
    """Cases are found again by name: a --set dataset.path to another collection named
    alike (phantom_000, ...) went on training the run on other scans without a word."""
    import shutil

    from medseg.phantoms import write_phantom_dataset

    dataset = tmp_path / "data"
    shutil.copytree(phantom_dataset, dataset)
    run = tmp_path / "run"
    assert train(run, dataset, "train.max_minutes=0.00001") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=0.00001"]) == 0
    other = write_phantom_dataset(tmp_path / "other", n_train=6, n_test=0, seed=9,
                                  shape=(32, 28, 24), spacing=(4.0, 4.0, 6.0))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", f"dataset.path={other}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("case 'phantom_000' is 32 x 28 x 24 voxels of 4 x 4 x 6 mm now, but "
                        "was 32 x 32 x 24 voxels of 4 x 4 x 8 mm when the run was planned: "
                        "resume on the dataset the run was trained on"), err
    assert "phantom_000.nii.gz: " in err and "\n" not in err


def test_label_smoothing_reaches_the_cross_entropy_term():
    import dataclasses

    from medseg.config import load_workflow
    from medseg.plan import Plan
    from medseg.train import loss_function

    plan = Plan(target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16], batch_size=2,
                kernels=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                filters=[4, 8, 16], deep_supervision=False, in_channels=1, num_classes=3,
                labels={0: "background", 1: "a", 2: "b"}, modalities=["MR"],
                normalization=[{"scheme": "zscore_nonzero"}], median_shape=[16, 16, 16],
                mirror_axes=[], res_block=False)
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[:, 1] = 20.0  # confidently class 1 everywhere
    target = torch.ones(1, 1, 4, 4, 4, dtype=torch.long)
    plain = load_workflow(None, []).train
    smoothed = dataclasses.replace(plain, label_smoothing=0.2)
    assert loss_function(plan, smoothed)(logits, target) > loss_function(plan, plain)(
        logits, target) + 0.5
    with pytest.raises(Exception, match="label_smoothing"):
        load_workflow(None, ["train.label_smoothing=1"])


def test_validation_leaves_out_structures_a_case_does_not_have(tmp_path):
    import math

    from medseg.train import _log, _mean_dice, _mean_over_structures

    nan = math.nan
    per_case = [{"a": {"dice": 0.8}, "b": {"dice": 0.5}, "c": {"dice": nan}},
                {"a": {"dice": 0.6}, "b": {"dice": nan}, "c": {"dice": nan}}]
    dice = _mean_dice(per_case)
    assert dice["a"] == pytest.approx(0.7) and dice["b"] == 0.5 and math.isnan(dice["c"])
    assert _mean_over_structures(dice) == pytest.approx(0.6)
    assert math.isnan(_mean_over_structures({"c": nan}))

    class Writer:
        def __init__(self):
            self.tags = []

        def add_scalar(self, tag, value, step):
            self.tags.append(tag)

        def flush(self):
            pass

    writer, path = Writer(), tmp_path / "metrics.jsonl"
    _log(writer, path, {"epoch": 0, "train_loss": 1.0, "lr": 0.1, "val_dice": dice,
                        "val_mean_dice": 0.6})
    record = json.loads(path.read_text(encoding="utf-8"), parse_constant=pytest.fail)
    assert record["val_dice"]["c"] is None and "val_dice/c" not in writer.tags


def _state_objects():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, "pickle", "no best"])
def test_an_unreadable_training_state_is_one_line_naming_it(tmp_path, content):
    import pickle

    from medseg.errors import MedsegError
    from medseg.train import _load_state

    path = tmp_path / "last_state.pt"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"epoch": 1}))
    elif content == "no best":
        torch.save({"epoch": 1, "model": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(MedsegError, match=r"last_state\.pt: cannot resume from this training "
                                          r"state \(.+\)") as caught:
        _load_state(path, *_state_objects())
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    assert "weights_only" not in str(caught.value)  # torch's advice to run the pickle: no


@pytest.mark.parametrize("text, message", [
    ('[{"train": [', "not valid JSON"),
    ('[{"training": ["a"], "val": ["b"]}]', "fold 0 needs 'train' and 'val' lists"),
    ('{"train": ["a"], "val": ["b"]}', "expected a list of folds"),
    ('[{"train": [], "val": ["b"]}]', "fold 0 has no training case"),
    ('[{"train": ["a", "b"], "val": ["b"]}]', "fold 0 validates on its own training case"),
])
def test_an_edited_splits_file_is_checked(tmp_path, text, message):
    from medseg.datasets import read_splits
    from medseg.errors import MedsegError

    path = tmp_path / "splits.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MedsegError, match=f"splits.json: {message}"):
        read_splits(path)


def test_a_fold_restarted_from_scratch_starts_a_new_curve(tmp_path, phantom_dataset):
    import shutil

    run = tmp_path / "run"
    assert train(run, phantom_dataset) == 0
    # killed before its first saved state: epoch 0's metrics line at most
    shutil.rmtree(run / "fold_0" / "checkpoints")
    lines = (run / "fold_0" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (run / "fold_0" / "metrics.jsonl").write_text(lines[0] + "\n", encoding="utf-8")
    assert main(["train", "--resume", str(run)]) == 0
    assert [m["epoch"] for m in metrics(run)] == [0, 1]


def test_a_trained_fold_whose_state_was_deleted_is_not_retrained_by_resume(
        tmp_path, phantom_dataset, capsys):
    """It printed "fold_0: starting", trained from scratch and overwrote the checkpoints."""
    run = tmp_path / "run"
    assert train(run, phantom_dataset) == 0
    checkpoints = run / "fold_0" / "checkpoints"
    (checkpoints / "last_state.pt").unlink()
    best = (checkpoints / "best.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert ("last_state.pt: has no training state, but metrics.jsonl records 2 epochs"
            in capsys.readouterr().err)
    assert (checkpoints / "best.safetensors").read_bytes() == best
    assert [m["epoch"] for m in metrics(run)] == [0, 1]


def test_resume_of_a_finished_fold_restores_a_deleted_best_checkpoint(
        tmp_path, phantom_dataset, capsys):
    """It said "finished already" and left a fold that predict could not use."""
    run = tmp_path / "run"
    assert train(run, phantom_dataset) == 0
    best = run / "fold_0" / "checkpoints" / "best.safetensors"
    saved = best.read_bytes()
    best.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "best.safetensors was missing; written again from the saved weights" in out
    assert "finished already" in out
    assert best.read_bytes() == saved
    best.write_bytes(saved[: len(saved) // 2])  # cut short: a full disk, a copy stopped
    with pytest.raises(MedsegError, match=re.escape(
            f"best.safetensors: not readable (Error while deserializing header: incomplete "
            f"metadata, file not fully covered): `medseg train --resume {run}` writes it "
            f"again from the training state")):
        load_predictor(run)
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert ("best.safetensors was unreadable (Error while deserializing header: "
            in out and "; written again from the saved weights" in out)
    assert best.read_bytes() == saved


def test_a_dataset_with_no_structure_is_refused_before_the_run_folder(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from medseg.phantoms import write_phantom_dataset

    data = tmp_path / "data"
    write_phantom_dataset(data, n_train=4, n_test=0, seed=2, shape=(16, 16, 8))
    for label in (data / "labelsTr").iterdir():
        image = nib.load(label)
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), label)
    capsys.readouterr()
    assert train(tmp_path / "run", data, "train.folds=2") == 2
    assert "all background): nothing to learn" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_foreground_fraction_1_with_a_case_of_no_structure(tmp_path):
    import numpy as np

    from medseg.config import AugmentConfig
    from medseg.plan import Plan
    from medseg.transforms import IMAGE, LABEL, augmentation

    plan = Plan(target_spacing=[1.0, 1.0, 1.0], patch_size=[8, 8, 8], batch_size=1,
                kernels=[[3, 3, 3]], strides=[[1, 1, 1]], filters=[4], deep_supervision=False,
                in_channels=1, num_classes=3, labels={0: "bg", 1: "a", 2: "b"},
                modalities=["MR"], normalization=[{"scheme": "zscore_nonzero"}],
                median_shape=[12, 12, 12])
    chain = augmentation(plan, AugmentConfig(), foreground_fraction=1.0)
    chain.set_random_state(seed=0)
    case = {IMAGE: torch.rand(1, 12, 12, 12), LABEL: torch.zeros(1, 12, 12, 12)}
    patch = chain(case)
    patch = patch[0] if isinstance(patch, list) else patch
    assert tuple(patch[IMAGE].shape) == (1, 8, 8, 8)
    assert not np.isnan(np.asarray(patch[IMAGE])).any()


def test_a_splits_file_of_ones_own_gives_the_folds(tmp_path, phantom_dataset, capsys):
    listing = json.loads((phantom_dataset / "dataset.json").read_text(encoding="utf-8"))
    names = sorted(entry["image"].split("/")[-1].removesuffix(".nii.gz")
                   for entry in listing["training"])
    own = [{"train": names[2:], "val": names[:2]}, {"train": names[:4], "val": names[4:]},
           {"train": names[1:], "val": names[:1]}]
    splits_file = tmp_path / "splits_final.json"
    splits_file.write_text(json.dumps(own), encoding="utf-8")
    run = tmp_path / "run"
    assert train(run, phantom_dataset, f"train.splits_file={splits_file}", "train.fold=2",
                 "train.max_minutes=0.00001") == 0
    assert json.loads((run / "splits.json").read_text(encoding="utf-8")) == own
    assert (run / "fold_2" / "checkpoints" / "last_state.pt").is_file()
    capsys.readouterr()
    assert train(tmp_path / "r2", phantom_dataset, f"train.splits_file={splits_file}",
                 "train.fold=3") == 2
    assert "splits_final.json: 'train.fold' is 3, but the file holds 3 fold(s)" in \
        capsys.readouterr().err
    own[0]["val"].append("nobody")
    splits_file.write_text(json.dumps(own), encoding="utf-8")
    assert train(tmp_path / "r3", phantom_dataset, f"train.splits_file={splits_file}") == 2
    assert "splits_final.json: names case(s) nobody that the dataset does not have" in \
        capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


def test_resuming_a_finished_run_does_nothing_and_says_so(tmp_path, phantom_dataset, capsys):
    run = tmp_path / "run"
    assert train(run, phantom_dataset) == 0
    events = sorted((run / "fold_0" / "tensorboard").iterdir())
    before = (run / "fold_0" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "fold_0: finished already; nothing to resume" in out
    assert "fold_0: best mean Dice" in out and "2 of 2 epochs" in out
    assert sorted((run / "fold_0" / "tensorboard").iterdir()) == events
    assert (run / "fold_0" / "metrics.jsonl").read_bytes() == before


def test_a_budget_stop_says_how_to_go_on_and_predict_notes_unfinished_folds(
        tmp_path, phantom_dataset, capsys):
    from medseg.predict import load_predictor

    run = tmp_path / "run"
    assert train(run, phantom_dataset, "train.max_minutes=0.00001") == 0
    out = capsys.readouterr().out
    assert "1 of 2 epochs, stopped by train.max_minutes (medseg train --resume" in out
    load_predictor(run)  # stopped by its budget: finished, no note
    assert "has not finished" not in capsys.readouterr().err
    state_path = run / "fold_0" / "checkpoints" / "last_state.pt"
    state = torch.load(state_path, weights_only=True)
    # as if a later session had been interrupted: the run's clock, which counts every
    # session, had already passed the budget and was taken for a budget stop
    state["budget_stop"] = False
    torch.save(state, state_path)
    load_predictor(run)
    assert "fold_0 has not finished its 2 epochs" in capsys.readouterr().err
    state.pop("budget_stop")  # a state from before the flag: judged by the run's clock
    torch.save(state, state_path)
    load_predictor(run)
    assert "has not finished" not in capsys.readouterr().err
    state_path.unlink()  # a model shipped without it
    load_predictor(run)
    assert "has not finished" not in capsys.readouterr().err


def test_a_budget_stop_between_validations_leaves_the_best_checkpoint_as_straight(
        tmp_path, phantom_dataset, capsys):
    """A stop validated off schedule, and that extra score could become the best: the
    resumed run then ended with another best.safetensors than the uninterrupted one."""
    every_2 = ["train.epochs=4", "train.val_every=2", "train.learning_rate=0.05"]
    assert train(tmp_path / "straight", phantom_dataset, *every_2) == 0
    assert train(tmp_path / "cut", phantom_dataset, *every_2, "train.max_minutes=0.00001") == 0
    assert "stopped before the first validation" in capsys.readouterr().out
    while len(metrics(tmp_path / "cut")) < 4:  # one epoch per session
        assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    validated = [[r["epoch"] for r in metrics(tmp_path / run) if "val_dice" in r]
                 for run in ("straight", "cut")]
    assert validated == [[1, 3], [1, 3]]
    for weights in ("best.safetensors", "last.safetensors"):
        assert (tmp_path / "straight" / "fold_0" / "checkpoints" / weights).read_bytes() == \
            (tmp_path / "cut" / "fold_0" / "checkpoints" / weights).read_bytes(), weights


def test_resume_writes_back_the_best_checkpoint_of_its_state(tmp_path, phantom_dataset,
                                                               monkeypatch):
    """A run stopped after a new best.safetensors but before its state left the file an
    epoch ahead; where the redone epoch does not score as well (CUDA is not bit-exact), the
    file stayed the lost epoch's rather than the best the run reports."""
    from safetensors.torch import load_file, save_file

    import medseg.train

    assert train(tmp_path / "cut", phantom_dataset, "train.max_minutes=0.00001") == 0
    checkpoints = tmp_path / "cut" / "fold_0" / "checkpoints"
    best_file = checkpoints / "best.safetensors"
    best_of_epoch_0 = best_file.read_bytes()
    # as if the lost epoch 1 had scored higher and written its (other) weights
    save_file({name: tensor + 1 for name, tensor in load_file(best_file).items()}, best_file)
    monkeypatch.setattr(medseg.train, "_mean_over_structures", lambda dice: -1.0)  # worse
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    assert final_state(tmp_path / "cut")["best"]["epoch"] == 0
    assert best_file.read_bytes() == best_of_epoch_0


def test_a_resumed_auto_run_keeps_the_precision_it_started_with(monkeypatch, capsys):
    from medseg.train import Ranks, _note_world_size, _resumed_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert _resumed_precision("auto", cpu, None, Ranks()) is None  # a fresh run: fp32 here
    # started in bf16 on a machine with native bf16: it goes on in bf16, and says so
    assert _resumed_precision("auto", cpu, "bf16", Ranks()) is torch.bfloat16
    assert "auto chose bf16 when this run started" in capsys.readouterr().out
    assert _resumed_precision("fp32", cpu, "bf16", Ranks()) is None  # asked for: as asked
    assert _resumed_precision("auto", cpu, "fp16", Ranks()) is None  # CUDA's fp16: not here
    assert "fp16 on CUDA" in capsys.readouterr().out
    _note_world_size(2, Ranks())
    assert "trained with 2 process(es), and goes on with 1" in capsys.readouterr().out
    _note_world_size(1, Ranks())
    assert capsys.readouterr().out == ""


def test_a_run_whose_dataset_moved_resumes_with_its_new_path(tmp_path, phantom_dataset,
                                                              capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dataset, data)
    run = tmp_path / "run"
    assert train(run, data, "train.max_minutes=0.00001") == 0
    moved = data.rename(tmp_path / "moved")
    assert main(["train", "--resume", str(run)]) == 2
    assert f"(the dataset of {run / 'workflow.yaml'}; if it has moved, --set dataset.path=" \
        in capsys.readouterr().err
    # a wrong new path is the option's fault: no advice to give the option
    assert main(["train", "--resume", str(run), "--set", f"dataset.path={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "(the dataset.path given with --set)" in err and "if it has moved" not in err
    assert main(["train", "--resume", str(run), "--set", f"dataset.path={moved}"]) == 0
    assert [r["epoch"] for r in metrics(run)] == [0, 1]


def test_a_second_trainer_of_one_run_folder_is_refused(tmp_path, phantom_dataset, capsys):
    """A --resume started while the run still trained was accepted: both wrote its
    checkpoints, and metrics.jsonl ended with epoch 5 twice."""
    import fcntl

    run = tmp_path / "run"
    lock = tmp_path / ".run.medseg-lock"
    with lock.open("a", encoding="utf-8") as held:  # what a running `medseg train` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train(run, phantom_dataset) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"{run}: another `medseg train` is training this run folder; wait for it to end "
            f"(or stop it) first")
    assert not run.exists()
    assert train(run, phantom_dataset, "train.max_minutes=0.00001") == 0
    assert not lock.exists()  # gone with the run that held it
    assert main(["train", "--resume", str(run)]) == 0


def test_a_run_folder_in_a_new_folder_is_locked_and_a_refused_one_leaves_none(
        tmp_path, phantom_dataset, monkeypatch):
    """`--out runs/x` in a fresh clone (no runs/ yet) trained without the lock, and a second
    trainer of the folder was not refused."""
    import fcntl

    import medseg.train

    run = tmp_path / "runs" / "deeper" / "run"
    lock = run.parent / ".run.medseg-lock"
    trained = medseg.train.train_fold

    def train_fold_under_the_lock(*args, **kwargs):
        with lock.open("a", encoding="utf-8") as second, pytest.raises(OSError):
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a second trainer tries
        return trained(*args, **kwargs)

    monkeypatch.setattr(medseg.train, "train_fold", train_fold_under_the_lock)
    assert train(run, phantom_dataset) == 0
    assert (run / "fold_0" / "checkpoints" / "best.safetensors").is_file()
    assert not lock.exists()
    assert train(tmp_path / "new" / "run", tmp_path / "no_dataset") == 2  # refused
    assert not (tmp_path / "new").exists()  # nothing left behind


def test_sigterm_ends_training_like_ctrl_c_and_removes_the_lock(tmp_path, phantom_dataset):
    """SIGTERM (a scheduler's stop, `timeout`, torchrun ending the other processes) killed
    the trainer on the spot: its lock file stayed beside the run folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    sets = as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING, "train.epochs=1000",
                    "train.num_workers=0"])
    # faulthandler: should it hang after the stop, SIGABRT shows where every thread is
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen([sys.executable, "-m", "medseg.cli", "train",
                                str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                                *sets], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               encoding="utf-8", errors="replace", cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (run / "fold_0" / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "fold_0" / "metrics.jsonl").exists(), "training never started"
        assert (tmp_path / ".run.medseg-lock").exists()
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            _, err = process.communicate(timeout=30)
            pytest.fail(f"no exit within 120 s of SIGTERM; the threads then:\n{err[-6000:]}")
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 143
    assert err.strip().splitlines()[-1] == "medseg: stopped (SIGTERM)"
    assert not (tmp_path / ".run.medseg-lock").exists()
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=0.00001"]) == 0


def test_resume_restores_best_weights_of_a_fold_trained_without_validation(
        tmp_path, phantom_dataset, capsys):
    """Its state holds no copy of best.safetensors (the last weights): resume refused it."""
    run = tmp_path / "run"
    assert train(run, phantom_dataset, "train.val_max_cases=0") == 0
    checkpoints = run / "fold_0" / "checkpoints"
    (checkpoints / "best.safetensors").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert "best.safetensors was missing; written again" in capsys.readouterr().out
    assert ((checkpoints / "best.safetensors").read_bytes()
            == (checkpoints / "last.safetensors").read_bytes())


def test_a_fold_copied_from_a_run_of_another_plan_is_refused_in_one_line(
        tmp_path, trained_run, phantom_dataset, capsys):
    """A finished fold of another network was taken as finished by resume, and predict
    then failed with a line of several kilobytes listing every tensor."""
    import shutil

    other = tmp_path / "other"
    assert train(other, phantom_dataset, "plan.base_filters=8", "train.epochs=1") == 0
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "fold_0")
    shutil.copytree(other / "fold_0", run / "fold_0")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and len(err) < 400, err
    assert "last_state.pt" in err and "its network is not plan.json's" in err
    assert main(["predict", "--model", str(run), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "masks")]) != 0
    # (a note first: the copied fold trained 1 of the run's 2 epochs)
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and len(err[0]) < 400, err
    err = err[0]
    assert "best.safetensors" in err and "weights do not fit the plan's network" in err


def test_a_metrics_line_that_is_not_utf8_is_dropped_on_resume(tmp_path, phantom_dataset):
    run = tmp_path / "run"
    assert train(run, phantom_dataset, "train.max_minutes=0.00001") == 0
    path = run / "fold_0" / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"epoch": 1, "\xff\xfe": 0}\n')
    assert main(["train", "--resume", str(run)]) == 0
    assert [record["epoch"] for record in metrics(run)] == [0, 1]
