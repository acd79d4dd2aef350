"""`medseg predict --model RUN RUN ...`: several runs averaged window by window."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import SMALL_SHAPE, SMALL_SPACING
from safetensors.torch import load_file, save_file

from medseg.cli import main
from medseg.config import PredictConfig
from medseg.errors import MedsegError
from medseg.phantoms import make_phantom
from medseg.predict import _window_probabilities, load_predictor

BEST = Path("checkpoints") / "best.safetensors"


def _copy_run(source: Path, target: Path, seed: int, folds: tuple[int, ...] = (0,)) -> Path:
    """A run folder of the same plan whose folds hold other weights (the source's, each
    tensor moved by seeded noise), as another seed's training would give."""
    target.mkdir(parents=True)
    for name in ("plan.json", "workflow.yaml"):
        shutil.copy(source / name, target / name)
    tensors = load_file(source / "fold_0" / BEST)
    for fold in folds:
        generator = torch.Generator().manual_seed(seed * 100 + fold)
        moved = {key: value + 0.05 * torch.randn(value.shape, generator=generator)
                 if value.is_floating_point() else value for key, value in tensors.items()}
        (target / f"fold_{fold}" / "checkpoints").mkdir(parents=True)
        save_file(moved, target / f"fold_{fold}" / BEST)
    return target


@pytest.fixture(scope="module")
def other_runs(trained_run, tmp_path_factory) -> tuple[Path, Path]:
    """A run of one fold and a run of two folds, unlike `trained_run`'s weights."""
    root = tmp_path_factory.mktemp("ensemble")
    return (_copy_run(trained_run, root / "one", seed=1),
            _copy_run(trained_run, root / "two", seed=2, folds=(0, 1)))


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, 1, 32, 32, 16), generator=generator)


def _mean_of(run: Path, batch: torch.Tensor) -> torch.Tensor:
    predictor = load_predictor(run, device="cpu")
    return _window_probabilities(predictor, batch, PredictConfig(precision="fp32"))


def test_each_run_weighs_the_same_whatever_its_folds(trained_run, other_runs, windows):
    one, two = other_runs
    predictor = load_predictor([trained_run, two], device="cpu")
    assert predictor.folds == (f"{trained_run}/fold_0", f"{two}/fold_0", f"{two}/fold_1")
    assert predictor.weights == pytest.approx((0.5, 0.25, 0.25))
    ensemble = _window_probabilities(predictor, windows, PredictConfig(precision="fp32"))
    expected = (_mean_of(trained_run, windows) + _mean_of(two, windows)) / 2
    torch.testing.assert_close(ensemble, expected, rtol=1e-5, atol=1e-6)
    # the plain mean of the three networks would be another figure
    assert not torch.allclose(ensemble, (_mean_of(trained_run, windows)
                                         + 2 * _mean_of(two, windows)) / 3, atol=1e-4)


def test_runs_of_equal_folds_average_as_one_run_of_their_folds(trained_run, other_runs,
                                                                windows):
    one, _ = other_runs
    predictor = load_predictor([trained_run, one], device="cpu")
    assert predictor.weights == ()
    ensemble = _window_probabilities(predictor, windows, PredictConfig(precision="fp32"))
    expected = (_mean_of(trained_run, windows) + _mean_of(one, windows)) / 2
    torch.testing.assert_close(ensemble, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ensemble, _mean_of(trained_run, windows), atol=1e-3)


def test_folds_choose_in_every_run(trained_run, other_runs):
    _, two = other_runs
    predictor = load_predictor([two, trained_run], folds=[0], device="cpu")
    assert predictor.folds == (f"{two}/fold_0", f"{trained_run}/fold_0")
    with pytest.raises(MedsegError, match="no trained weights for fold_1") as caught:
        load_predictor([two, trained_run], folds=[1], device="cpu")
    assert str(trained_run) in str(caught.value)


@pytest.mark.parametrize(("key", "value"), [
    ("target_spacing", [1.0, 1.0, 1.0]),
    ("labels", {"0": "background", "1": "liver", "2": "spleen", "3": "lesion"}),
])
def test_a_run_that_preprocesses_otherwise_is_refused(trained_run, tmp_path, key, value):
    other = _copy_run(trained_run, tmp_path / "other", seed=3)
    plan = json.loads((other / "plan.json").read_text(encoding="utf-8"))
    assert plan[key] != value
    plan[key] = value
    (other / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    with pytest.raises(MedsegError) as caught:
        load_predictor([trained_run, other], device="cpu")
    message = str(caught.value)
    assert str(other) in message and f"plan.json's {key} is" in message
    assert str(trained_run) in message and "\n" not in message


def test_a_run_of_another_width_joins(trained_run, tmp_path, windows):
    """Networks may differ in width: only what shapes their input and output must agree."""
    other = tmp_path / "wide"
    other.mkdir()
    shutil.copy(trained_run / "workflow.yaml", other / "workflow.yaml")
    plan = json.loads((trained_run / "plan.json").read_text(encoding="utf-8"))
    plan["filters"] = [2 * width for width in plan["filters"]]
    (other / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    from medseg.model import create_model, save_weights
    from medseg.plan import load_plan

    torch.manual_seed(0)
    (other / "fold_0" / "checkpoints").mkdir(parents=True)
    save_weights(create_model(load_plan(other / "plan.json")), other / "fold_0" / BEST)
    predictor = load_predictor([trained_run, other], device="cpu")
    assert len(predictor.models) == 2
    ensemble = _window_probabilities(predictor, windows, PredictConfig(precision="fp32"))
    expected = (_mean_of(trained_run, windows) + _mean_of(other, windows)) / 2
    torch.testing.assert_close(ensemble, expected, rtol=1e-5, atol=1e-6)


def test_a_run_named_twice_is_refused(trained_run):
    with pytest.raises(MedsegError, match="given twice to --model") as caught:
        load_predictor([trained_run, trained_run / ".." / trained_run.name], device="cpu")
    assert f"(also as {trained_run})" in str(caught.value)
    with pytest.raises(MedsegError, match="given twice to --model: each run") as caught:
        load_predictor([trained_run, Path(f"{trained_run}/")], device="cpu")
    assert "also as" not in str(caught.value)


@pytest.fixture
def step_075_run_and_scan(other_runs, tmp_path) -> tuple[Path, Path]:
    """A copy of the one-fold run whose workflow sets predict.step 0.75, and a folder of
    one phantom scan."""
    edited = tmp_path / "edited"
    shutil.copytree(other_runs[0], edited)
    workflow = yaml.safe_load((edited / "workflow.yaml").read_text(encoding="utf-8"))
    workflow.setdefault("predict", {})["step"] = 0.75
    (edited / "workflow.yaml").write_text(yaml.safe_dump(workflow), encoding="utf-8")
    phantom = make_phantom(5, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), np.diag([*SMALL_SPACING, 1.0])),
             scans / "case.nii.gz")
    return edited, scans


def test_cli_predicts_with_an_ensemble_and_notes_other_settings(trained_run,
                                                                step_075_run_and_scan,
                                                                tmp_path, capsys):
    edited, scans = step_075_run_and_scan
    code = main(["predict", "--model", str(trained_run), str(edited), "--input", str(scans),
                 "--output", str(tmp_path / "masks")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "masks" / "case.nii.gz").is_file()
    assert f"with {trained_run}/fold_0, {edited}/fold_0" in captured.out
    assert f"{edited} sets predict.step otherwise than {trained_run}" in captured.err


def test_runs_of_other_seeds_on_a_ct_dataset_make_an_ensemble(trained_run, phantom_dataset,
                                                              tmp_path, windows):
    """The fingerprint sampled a CT's voxels with train.seed: a run of another seed had
    another normalization in plan.json, and the ensemble the docs suggest (`--set
    train.seed=1`) was refused."""
    from helpers import REPO, TINY_TRAINING, as_sets

    seeded = tmp_path / "seed1"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(seeded),
                 *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING,
                           "train.seed=1"])]) == 0
    plans = [json.loads((run / "plan.json").read_text(encoding="utf-8"))
             for run in (trained_run, seeded)]
    assert plans[0]["normalization"][0]["scheme"] == "ct"
    assert plans[0] == plans[1]
    predictor = load_predictor([trained_run, seeded], device="cpu")
    assert len(predictor.models) == 2


def test_no_note_for_settings_the_command_line_gives(trained_run, step_075_run_and_scan,
                                                     tmp_path, capsys):
    edited, scans = step_075_run_and_scan
    assert main(["predict", "--model", str(trained_run), str(edited), "--input", str(scans),
                 "--output", str(tmp_path / "masks"), "--step", "0.75"]) == 0
    assert "otherwise than" not in capsys.readouterr().err


def _with_plan(source: Path, target: Path, seed: int, **changes) -> Path:
    run = _copy_run(source, target, seed=seed)
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    plan.update(changes)
    (run / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    return run


def test_merged_planes_add_streams_that_flush_in_other_groups():
    from medseg.inference import merged_planes

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand((3, 4, 5, 11), generator=generator) for _ in range(2))

    def chunked(volume, sizes):
        z = 0
        for size in sizes:
            yield z, volume[..., z:z + size]
            z += size

    merged = list(merged_planes([chunked(a, [4, 4, 3]), chunked(b, [1, 2, 4, 4])],
                                [0.25, 0.75]))
    assert [z for z, _ in merged] == [0, 4, 8]
    torch.testing.assert_close(torch.cat([planes for _, planes in merged], dim=3),
                               0.25 * a + 0.75 * b)


def test_runs_of_other_patches_and_mirror_axes_make_an_ensemble(trained_run, tmp_path):
    """Each run slides its own window (patch, mirror axes) over the same planes; the mean
    is taken plane by plane, each run weighing the same."""
    from medseg.inference import axis_maps, labels_on_input_grid
    from medseg.predict import (
        _group_planes,
        _prediction_box,
        _widest_window,
        predict_prepared,
        prepare_case,
    )

    other = _with_plan(trained_run, tmp_path / "small", seed=4, patch_size=[16, 16, 16],
                       mirror_axes=[0])
    predictor = load_predictor([trained_run, other], device="cpu")
    groups = predictor.window_groups()
    assert [g.plan.patch_size for g, _ in groups] == [[32, 32, 16], [16, 16, 16]]
    assert [share for _, share in groups] == [0.5, 0.5]
    phantom = make_phantom(7, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    scan = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), np.diag([*SMALL_SPACING, 1.0])),
             scan)
    case = prepare_case(predictor.plan, scan)
    config = PredictConfig(precision="fp32", tta=True)
    mask = predict_prepared(predictor, case, config)
    box = _prediction_box(case.image, _widest_window(predictor.plan, groups), config)
    region = case.image[(slice(None), *box)]
    whole = [torch.cat([p for _, p in _group_planes(g, region, config, None)], dim=3)
             for g, _ in groups]
    expected = labels_on_input_grid(
        iter([(0, 0.5 * whole[0] + 0.5 * whole[1])]), tuple(case.image.shape[1:]), box,
        predictor.plan.num_classes,
        axis_maps(case.geometry.affine, case.network_affine, case.geometry.shape),
        tuple(case.geometry.shape))
    np.testing.assert_array_equal(mask, expected)
    alone = predict_prepared(load_predictor(trained_run, device="cpu"), case, config)
    assert not np.array_equal(mask, alone)  # the second run counts
