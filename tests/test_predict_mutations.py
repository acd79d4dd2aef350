"""Prediction behaviour that a mutation audit found unguarded: test-time mirroring un-flips
each mirrored prediction, every fold of the ensemble counts, predict_paths post-processes the
masks it writes, and connected components are 26-connected. Small synthetic plans and fake
networks: no training."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import synthetic_fingerprint

from medseg.config import PlanConfig, PredictConfig
from medseg.model import create_model, save_weights
from medseg.plan import make_plan, save_plan
from medseg.postprocess import keep_largest_component, remove_small_components
from medseg.predict import Predictor, _window_probabilities, load_predictor, predict_paths

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def plan():
    """A tiny 3-class (background, 1, 2) MR plan at 1 mm with 16^3 windows."""
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[16, 16, 16]] * 3)
    return make_plan(fp, PlanConfig(patch_size=[16, 16, 16], base_filters=2, max_filters=4))


def write_nifti(path, data: np.ndarray, spacing: float) -> None:
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), path)


class RampModel(torch.nn.Module):
    """Logits that depend on the voxel's position as well as its value, so that a mirrored
    copy predicted but not mirrored back lands its scores on the wrong voxels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, nx, ny, nz = x.shape
        i = torch.arange(nx, dtype=x.dtype).view(1, 1, nx, 1, 1)
        j = torch.arange(ny, dtype=x.dtype).view(1, 1, 1, ny, 1)
        k = torch.arange(nz, dtype=x.dtype).view(1, 1, 1, 1, nz)
        value = x[:, :1]
        return torch.cat([value,
                          0.3 * i + 0.2 * j + 0.1 * k + 0 * value,
                          0.5 * value - 0.2 * i + 0.4 * k - 0.1 * j], dim=1)


def test_tta_averages_mirrored_predictions_mirrored_back(plan):
    """Kills: the un-flip of each mirrored prediction dropped in _window_probabilities."""
    predictor = Predictor(plan, (RampModel(),), ("fold_0",), CPU)
    batch = torch.randn(2, 1, 8, 6, 4, generator=torch.Generator().manual_seed(0))
    got = _window_probabilities(predictor, batch, PredictConfig(tta=True, precision="fp32"))

    model = RampModel()
    subsets = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]  # axes 0, 1, 2

    def mirrored(axes, back=True):
        x = torch.flip(batch, axes) if axes else batch
        p = torch.softmax(model(x), dim=1)
        return torch.flip(p, axes) if axes and back else p

    expected = torch.stack([mirrored(axes) for axes in subsets]).mean(0)
    assert got.shape == (2, 3, 8, 6, 4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the fake network is position-dependent enough that forgetting to mirror back shows
    not_back = torch.stack([mirrored(axes, back=False) for axes in subsets]).mean(0)
    assert (not_back - expected).abs().max() > 0.05


def test_without_tta_one_forward_pass_is_all(plan):
    """Kills: mirroring applied whatever `tta` says (`if True else [()]`)."""
    predictor = Predictor(plan, (RampModel(),), ("fold_0",), CPU)
    batch = torch.randn(2, 1, 8, 6, 4, generator=torch.Generator().manual_seed(0))
    got = _window_probabilities(predictor, batch, PredictConfig(tta=False, precision="fp32"))
    torch.testing.assert_close(got, torch.softmax(RampModel()(batch), dim=1), atol=1e-6,
                               rtol=1e-6)


def constant_fold(plan, run_dir, fold: int, probabilities: list[float]) -> None:
    """fold_K whose network gives the same class probabilities everywhere: the output
    convolution's weights zero and its bias the log-probabilities."""
    model = create_model(plan)
    conv = model.output_block.conv.conv
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([math.log(p) for p in probabilities]))
    folder = run_dir / f"fold_{fold}" / "checkpoints"
    folder.mkdir(parents=True)
    save_weights(model, folder / "best.safetensors")


def test_every_fold_of_the_ensemble_counts(plan, tmp_path):
    """Two folds loaded from fold_0 and fold_1: A says 0.6/0.4 for labels 1/2, B 0.1/0.9.
    Their mean (0.35/0.65) gives label 2 everywhere; fold A alone would give label 1.
    Kills: `predictor.models` -> `predictor.models[:1]` in _window_probabilities."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_plan(plan, run_dir / "plan.json")
    constant_fold(plan, run_dir, 0, [1e-6, 0.6, 0.4 - 1e-6])
    constant_fold(plan, run_dir, 1, [1e-6, 0.1, 0.9 - 1e-6])
    predictor = load_predictor(run_dir, device="cpu")
    assert predictor.folds == ("fold_0", "fold_1")

    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "case.nii.gz", rng.uniform(1, 2, (12, 10, 8)).astype(np.float32),
                1.0)
    out = tmp_path / "out"
    results = predict_paths(predictor, [tmp_path / "case.nii.gz"], out,
                            PredictConfig(precision="fp32"))
    assert results[0].error is None, results[0].error
    mask = np.asarray(nib.load(out / "case.nii.gz").dataobj)
    assert mask.shape == (12, 10, 8)
    assert (mask == 2).all(), np.unique(mask, return_counts=True)

    alone = load_predictor(run_dir, folds=[0], device="cpu")
    results = predict_paths(alone, [tmp_path / "case.nii.gz"], tmp_path / "alone",
                            PredictConfig(precision="fp32"))
    assert results[0].error is None, results[0].error
    assert (np.asarray(nib.load(tmp_path / "alone" / "case.nii.gz").dataobj) == 1).all()


def test_predict_paths_post_processes_the_mask_it_writes(plan, tmp_path, monkeypatch):
    """The network step returns a label map with a stray island of label 1 and a tiny one of
    label 2; with largest_component=[1] and min_component_ml={2: 0.05} the written mask has
    neither. Kills: the postprocess call in predict._finish_mask skipped."""
    shape = (20, 20, 20)
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 2:6, 2:6] = 1         # 64 voxels: the largest of label 1
    labels[14:16, 14:16, 14:16] = 1   # 8 voxels: a second island of label 1
    labels[2:5, 12:15, 2:5] = 2       # 27 voxels of 2 mm = 0.216 ml: kept
    labels[12:15, 2:5, 12:15] = 2     # another 27 voxels: kept (not only the largest)
    labels[18, 18, 2:4] = 2           # 2 voxels = 0.016 ml, under 0.05 ml: dropped
    expected = labels.copy()
    expected[14:16, 14:16, 14:16] = 0
    expected[18, 18, 2:4] = 0

    def network_step(predictor, case, config):
        assert tuple(case.geometry.shape) == shape
        return labels.copy()

    monkeypatch.setattr("medseg.predict.predict_prepared", network_step)
    write_nifti(tmp_path / "case.nii.gz", np.ones(shape, np.float32), 2.0)
    predictor = Predictor(plan, (torch.nn.Identity(),), ("fold_0",), CPU)
    config = PredictConfig(largest_component=[1], min_component_ml={2: 0.05})
    results = predict_paths(predictor, [tmp_path / "case.nii.gz"], tmp_path / "out", config)
    assert results[0].error is None, results[0].error
    written = np.asarray(nib.load(tmp_path / "out" / "case.nii.gz").dataobj)
    assert (written == 1).sum() == 64 and (written == 2).sum() == 54
    np.testing.assert_array_equal(written, expected)


def test_components_are_26_connected():
    """Voxels touching only at a corner are one component (the docs: 26-connected). A
    diagonal chain of 3 corner-touching voxels outweighs a face-connected pair.
    Kills: postprocess.CONNECTIVITY 26 -> 6 (or 18)."""
    labels = np.zeros((10, 10, 10), np.uint8)
    chain = [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    for voxel in chain:
        labels[voxel] = 1
    labels[7, 7, 7:9] = 1  # a face-connected pair, apart from the chain
    kept = keep_largest_component(labels, [1])
    expected = labels.copy()
    expected[7, 7, 7:9] = 0
    np.testing.assert_array_equal(kept, expected)
    # and the chain is one component of 3 voxels for the size threshold, too
    dusted = remove_small_components(labels, {1: 3})
    np.testing.assert_array_equal(dusted, expected)
