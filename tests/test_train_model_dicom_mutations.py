"""A mutation audit of train.py (loss, weight average, optimizer, precision, validation,
best checkpoint, replica check), model.py (networks from the plan) and the DICOM reader
(dicom.py, dicom_frames.py, dicom_resample.py): each test names the single-line bug it
catches, which the other tests let through."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import torch
from dicom_factory import CT_INTERCEPT, axial_positions, enhanced_file, slice_dataset, write_series
from helpers import REPO, TINY_TRAINING, as_sets
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

import medseg.train
from medseg.cli import main
from medseg.config import TrainConfig, load_workflow
from medseg.errors import MedsegError
from medseg.io import read_volume
from medseg.model import create_model, deep_supervision_heads, supervised_outputs
from medseg.plan import Plan
from medseg.train import (
    Ranks,
    _check_replicas,
    _optimizer,
    _precision_and_scaler,
    _val_names,
    loss_function,
    select_precision,
    weights_digest,
)

LABELS = {0: "background", 1: "a", 2: "b"}


def make_test_plan(strides, kernels=None, deep_supervision=True, res_block=False,
                   network="dynunet", patch=(16, 16, 16)) -> Plan:
    filters = [4 * 2**level for level in range(len(strides))]
    return Plan(target_spacing=[1.0] * 3, patch_size=list(patch), batch_size=1,
                kernels=kernels or [[3, 3, 3]] * len(strides), strides=strides,
                filters=filters, deep_supervision=deep_supervision, in_channels=1,
                num_classes=3, labels=LABELS, modalities=["MR"],
                normalization=[{"scheme": "zscore_nonzero"}], median_shape=list(patch),
                mirror_axes=[], res_block=res_block, network=network)


ISOTROPIC = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


# ---------------------------------------------------------------- model.py

@pytest.mark.parametrize("levels, heads", [(2, 1), (3, 1), (4, 2), (6, 2)])
def test_deep_supervision_scores_the_heads_below_full_resolution_two_at_most(levels, heads):
    """nnU-Net's rule: the levels below the full-resolution output, less the bottleneck,
    two at most. Kills: model.deep_supervision_heads' `len(plan.strides) - 2` -> `- 1`."""
    plan = make_test_plan([[1, 1, 1]] + [[2, 2, 2]] * (levels - 1))
    assert deep_supervision_heads(plan) == heads


def test_dynunet_training_outputs_are_the_full_resolution_one_then_its_heads():
    """A DynUNet stacks its upsampled heads along dim 1 in training; supervised_outputs
    unbinds them, the network's own output first (the one eval mode gives).
    Kills: model.supervised_outputs returning only `output[:, 0]`."""
    torch.manual_seed(0)
    plan = make_test_plan(ISOTROPIC)
    model = create_model(plan)
    x = torch.randn(1, 1, 16, 16, 16)
    outputs = supervised_outputs(model.train()(x))
    assert len(outputs) == 1 + deep_supervision_heads(plan) == 3
    assert all(o.shape == (1, 3, 16, 16, 16) and o.dtype == torch.float32 for o in outputs)
    with torch.no_grad():
        torch.testing.assert_close(outputs[0].detach(), model.eval()(x))
    # SegResNetDS's list: every level kept, in order
    levels = [torch.zeros(1, 3, 4 // 2**k, 4, 4, dtype=torch.bfloat16) for k in range(3)]
    kept = supervised_outputs(levels)
    assert [o.shape[2] for o in kept] == [4, 2, 1] and kept[0].dtype == torch.float32


def test_dynunet_follows_the_plans_kernels_strides_and_norm():
    """Anisotropic first level (3x3x1 kernels, no halving along z there): the convolutions,
    the transposed convolutions (kernel = stride of the level they undo) and instance
    norms with learnt affine parameters come from the plan.
    Kills: model.build_dynunet's `kernel_size=plan.kernels` -> all 3x3x3,
    `upsample_kernel_size=plan.strides[1:]` -> `[:-1]`, and the norm without `affine`."""
    plan = make_test_plan([[1, 1, 1], [2, 2, 1], [2, 2, 2]],
                          kernels=[[3, 3, 1], [3, 3, 3], [3, 3, 3]], patch=(16, 16, 8))
    model = create_model(plan)
    convs = [m for m in model.modules() if type(m) is torch.nn.Conv3d]
    transposed = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert convs[0].kernel_size == (3, 3, 1)
    assert sorted(m.kernel_size for m in transposed) == [(2, 2, 1), (2, 2, 2)]
    assert sorted(m.stride for m in transposed) == [(2, 2, 1), (2, 2, 2)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)
    assert model.eval()(torch.randn(1, 1, 16, 16, 8)).shape == (1, 3, 16, 16, 8)


@pytest.mark.parametrize("res_block", [False, True])
def test_res_block_gives_residual_blocks(res_block):
    """docs/workflows.md: `res_block` swaps the plain blocks for UnetResBlock.
    Kills: model.build_dynunet's `res_block=plan.res_block` -> `False`."""
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

    model = create_model(make_test_plan(ISOTROPIC, res_block=res_block))
    kinds = {type(m) for m in model.modules()}
    assert (UnetResBlock in kinds) == res_block and UnetBasicBlock in kinds  # (up blocks)


def test_segresnet_encoder_blocks_are_1_2_2_4_then_4():
    """docs/workflows.md: residual encoder blocks 1, 2, 2, 4 per level (4 beyond).
    Kills: model.build_segresnet's `[1, 2, 2, 4]` mistyped."""
    for strides, blocks in ((ISOTROPIC, [1, 2, 2, 4]), (ISOTROPIC + [[2, 2, 2]], [1, 2, 2, 4, 4])):
        model = create_model(make_test_plan(strides, network="segresnet", patch=(32, 32, 32)))
        assert [len(layer["blocks"]) for layer in model.encoder.layers] == blocks


# ---------------------------------------------------------------- train.py: loss

def test_deep_supervision_loss_halves_the_weight_per_level_on_downsampled_targets():
    """Dice+CE of each output against the label brought to its size (nearest, pixel centres
    aligned), weighted 1, 1/2, 1/4 (MONAI's exp weights) and summed.
    Kills: train.loss_function's `DeepSupervisionLoss(loss_fn)` with equal weights."""
    from monai.losses import DiceCELoss

    plan = make_test_plan(ISOTROPIC[:3])
    generator = torch.Generator().manual_seed(1)
    # float, as the loader gives it (nearest interpolation is not implemented for int64)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=generator).float()
    outputs = [torch.randn(2, 3, 8 // 2**k, 8 // 2**k, 8 // 2**k, generator=generator)
               for k in range(3)]
    single = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    targets = [label, label[:, :, 1::2, 1::2, 1::2], label[:, :, 2::4, 2::4, 2::4]]
    expected = sum(w * single(o, t) for w, o, t in zip((1.0, 0.5, 0.25), outputs, targets,
                                                             strict=True))
    torch.testing.assert_close(loss_function(plan, TrainConfig())(outputs, label), expected)


# ---------------------------------------------------------------- train.py: optimizer, precision

def test_optimizer_settings_follow_the_docs():
    """docs/workflows.md: `sgd` is Nesterov with momentum 0.99; both optimizers take
    train.learning_rate and train.weight_decay.
    Kills: train._optimizer's momentum / nesterov / AdamW weight_decay changed."""
    model = torch.nn.Linear(2, 2)
    sgd = _optimizer(model, load_workflow(None, ["train.weight_decay=0.0007",
                                                 "train.learning_rate=0.02"]))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["lr"]) == (
        0.99, True, 0.0007, 0.02)
    adamw = _optimizer(model, load_workflow(None, ["train.optimizer=adamw",
                                                   "train.weight_decay=0.0007"]))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 0.0007


def test_precision_choices(monkeypatch):
    """docs/workflows.md: `auto` is fp16 AMP on CUDA and bf16 on CPUs with AVX512-BF16 or
    AMX (either), else fp32; `bf16` is bf16 anywhere; `amp` is fp16 on CUDA, fp32 on a CPU.
    Kills: select_precision's CUDA choice keyed on `!= "amp"`, its `or` -> `and`."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert select_precision("auto", cuda) is torch.float16
    assert select_precision("amp", cuda) is torch.float16
    assert select_precision("bf16", cuda) is torch.bfloat16
    assert select_precision("fp32", cuda) is None
    for avx512, amx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert select_precision("auto", cpu) is (torch.bfloat16 if avx512 or amx else None)
        assert select_precision("bf16", cpu) is torch.bfloat16
        assert select_precision("amp", cpu) is None


def test_the_gradient_scaler_is_for_fp16_only():
    """bf16 has fp32's range: no loss scaling (docs/formats.md: the scaler state is empty
    without fp16). Kills: `enabled=autocast_dtype == torch.float16` -> `is not None`."""
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        cfg = TrainConfig(precision=precision)
        autocast_dtype, scaler = _precision_and_scaler(cfg, torch.device("cpu"), {}, Ranks())
        assert autocast_dtype is dtype and not scaler.is_enabled()


# ---------------------------------------------------------------- train.py: validation, best

@pytest.mark.parametrize("limit, names", [(None, ["a", "b", "c"]), (2, ["a", "b"]), (0, [])])
def test_val_max_cases_caps_the_validation_cases(limit, names):
    """docs/workflows.md: at most this many cases of the fold, 0: no validation.
    Kills: train._val_names ignoring train.val_max_cases."""
    workflow = SimpleNamespace(train=SimpleNamespace(val_max_cases=limit))
    assert _val_names({"train": ["d"], "val": ["a", "b", "c"]}, workflow) == names


def _train_with_scores(monkeypatch, run, dataset, scores, *extra):
    """A tiny run whose validation scores are `scores`, epoch by epoch."""
    remaining = list(scores)

    def scripted(scored, val_data, plan, workflow, device, ranks, autocast_dtype):
        mean = remaining.pop(0)
        return {"a": mean, "b": mean}, mean

    monkeypatch.setattr(medseg.train, "_validate", scripted)
    overrides = [f"dataset.path={dataset}", *TINY_TRAINING, f"train.epochs={len(scores)}",
                 "train.iterations_per_epoch=1", "train.num_workers=0", *extra]
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 *as_sets(overrides)]) == 0
    assert not remaining
    checkpoints = run / "fold_0" / "checkpoints"
    state = torch.load(checkpoints / "last_state.pt", weights_only=True)
    return checkpoints, state


def _same_weights(a, b) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tie_keeps_the_earlier_best_checkpoint(tmp_path, monkeypatch, phantom_dataset):
    """Only a strictly higher mean Dice replaces the best checkpoint.
    Kills: train_fold's `mean_dice > best["mean"]` -> `>=`."""
    checkpoints, state = _train_with_scores(monkeypatch, tmp_path / "run", phantom_dataset,
                                            [0.5, 0.5])
    assert state["best"]["epoch"] == 0
    assert not _same_weights(checkpoints / "best.safetensors",
                             checkpoints / "last.safetensors")


def test_the_best_checkpoint_holds_the_weight_average(tmp_path, monkeypatch, phantom_dataset):
    """docs/formats.md: with train.ema_decay, best.safetensors is the weight average's. The
    last epoch scores best here, so best and last hold the same (averaged) weights.
    Kills: train_fold's `weight_snapshot(scored)` -> `weight_snapshot(model)`."""
    checkpoints, state = _train_with_scores(monkeypatch, tmp_path / "run", phantom_dataset,
                                            [0.3, 0.5], "train.ema_decay=0.9")
    assert state["best"]["epoch"] == 1
    assert _same_weights(checkpoints / "best.safetensors", checkpoints / "last.safetensors")


# ---------------------------------------------------------------- train.py: replicas

def test_a_replica_that_differs_from_any_other_is_an_error(monkeypatch, capsys):
    """Rank 1 of 3 differs from ranks 0 and 2: an error, whichever rank it is.
    Kills: train._check_replicas comparing only the first and last digests."""
    def gather(digests):
        def fill(out, value):
            out[:] = digests
        return fill

    monkeypatch.setattr(medseg.train.dist, "all_gather_object", gather(["x", "y", "x"]))
    with pytest.raises(RuntimeError, match="weights differ between the ranks"):
        _check_replicas(torch.nn.Linear(2, 2), Ranks(rank=0, world_size=3))
    monkeypatch.setattr(medseg.train.dist, "all_gather_object", gather(["x", "x", "x"]))
    _check_replicas(torch.nn.Linear(2, 2), Ranks(rank=0, world_size=3))
    assert "weights identical on all 3 processes (sha256 x)" in capsys.readouterr().out


def test_weights_digest_sees_values_not_layout():
    """Kills: train.weights_digest hashing names and shapes but not the values."""
    conv = torch.nn.Conv3d(2, 3, 3)
    digest = weights_digest(conv.state_dict())
    assert weights_digest(conv.to(memory_format=torch.channels_last_3d).state_dict()) == digest
    with torch.no_grad():
        conv.weight[0, 0, 0, 0, 0] += 1.0
    assert weights_digest(conv.state_dict()) != digest

# ---------------------------------------------------------------- DICOM: dicom.py, frames, resample

ROWS, COLUMNS, SLICES = 6, 5, 4
SPACING = (0.8, 0.7)  # DICOM PixelSpacing: between rows, between columns
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def stored_values(seed=0, shape=(ROWS, COLUMNS, SLICES), high=3000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(np.uint16)


def test_an_oblique_series_is_ordered_and_spaced_along_its_normal(tmp_path):
    """Depth is the position projected on the normal (row x column cosines), not z: slices
    2.5 mm apart along a normal tilted 30 degrees from z lie 2.165 mm apart in z.
    Kills: dicom._order's `f.position @ normal` -> `f.position[2]`."""
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, c, s])
    normal = np.cross(row, column)
    origin = np.array([-20.0, -30.0, 40.0])
    positions = [origin + k * 2.5 * normal for k in range(SLICES)]
    stored = stored_values(21)
    order = [2, 0, 3, 1]  # file names and instance numbers say nothing about the order
    folder = tmp_path / "oblique"
    folder.mkdir()
    for name, k in enumerate(order):
        slice_dataset(stored[:, :, k], positions[k], orientation=(*row, *column),
                      spacing=SPACING, instance=name + 1).save_as(
            folder / f"IM{name}.dcm", enforce_file_format=True)
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.data, stored.transpose(1, 0, 2) + CT_INTERCEPT)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * SPACING[1], column * SPACING[0]
    lps[:3, 2], lps[:3, 3] = normal * 2.5, origin
    np.testing.assert_allclose(volume.affine, LPS_TO_RAS @ lps, atol=1e-6)


def test_a_series_with_one_fractional_slope_is_read_as_float(tmp_path):
    """One slice with RescaleSlope 0.5 among slope-1 slices: its values have halves, so the
    native type is float32, not an integer type that rounds them away.
    Kills: dicom.native_dtype's `all(f.integral_rescale ...)` -> `any(...)`."""
    stored = (stored_values(22, (ROWS, COLUMNS, 3)) | 1).astype(np.uint16)  # odd values
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k, slope in enumerate((1.0, 0.5, 1.0)):
        slice_dataset(stored[:, :, k], [0.0, 0.0, 2.5 * k], spacing=SPACING, slope=slope,
                      instance=k + 1).save_as(folder / f"IM{k}.dcm", enforce_file_format=True)
    volume = read_volume(folder, dtype=None)
    assert volume.data.dtype == np.float32
    expected = stored.transpose(1, 0, 2).astype(np.float64) * np.array([1.0, 0.5, 1.0])
    np.testing.assert_array_equal(volume.data, (expected + CT_INTERCEPT).astype(np.float32))


def test_a_negative_slope_gets_a_type_that_holds_its_values(tmp_path):
    """RescaleSlope -1 over 16-bit unsigned values: modality values reach -65535, which
    int16 cannot hold (int32 is chosen). Kills: Frame.value_range's `min(ends), max(ends)`
    -> `ends[0], ends[1]` (the ends unordered)."""
    stored = stored_values(23, high=65535)
    stored[0, 0, 0] = 40000
    write_series(tmp_path, stored, axial_positions(SLICES), spacing=SPACING, slope=-1.0,
                 intercept=0.0)
    volume = read_volume(tmp_path, dtype=None)
    assert volume.data.dtype == np.int32
    np.testing.assert_array_equal(volume.data, -stored.transpose(1, 0, 2).astype(np.int64))


def test_unsigned_16_bit_values_above_32767_keep_their_value(tmp_path):
    """PixelRepresentation 0 (unsigned), BitsStored 16, no intercept (as MR): values up to
    65535, so the native type is uint16, not int16 (where 60000 wraps).
    Kills: dicom_frames._stored_range's signed test `== 1` -> `== 0`."""
    stored = stored_values(24, high=65535)
    stored[1, 2, 3] = 60000
    write_series(tmp_path, stored, axial_positions(SLICES), spacing=SPACING, intercept=0.0)
    volume = read_volume(tmp_path, dtype=None)
    assert volume.data.dtype == np.uint16
    np.testing.assert_array_equal(volume.data, stored.transpose(1, 0, 2))


def test_a_single_slice_takes_its_slice_thickness_as_the_slice_step(tmp_path):
    """One slice has no gap to measure: the slice axis of the affine is SliceThickness long.
    Kills: dicom._slice_step's `frames[0].thickness or 1.0` -> `1.0`."""
    ds = slice_dataset(stored_values(25, (ROWS, COLUMNS, 1))[:, :, 0], [0.0, 0.0, 7.0],
                       spacing=SPACING)
    ds.SliceThickness = 3.0
    ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
    volume = read_volume(tmp_path)
    assert volume.spatial_shape == (COLUMNS, ROWS, 1)
    np.testing.assert_allclose(volume.affine[:3, 2], [0.0, 0.0, 3.0])


def test_a_per_frame_rescale_overrides_the_shared_one(tmp_path):
    """Enhanced multi-frame: a functional group in the frame's own groups wins over the shared
    one (PS3.3 C.7.6.16). Shared slope 1, per-frame slope 2: the values are doubled.
    Kills: dicom_frames._functional's `(group, shared)` -> `(shared, group)`."""
    stored = stored_values(26)
    path = enhanced_file(tmp_path / "mf.dcm", stored, axial_positions(SLICES), spacing=SPACING,
                         slopes=[2.0] * SLICES)
    ds = pydicom.dcmread(path)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 1.0, CT_INTERCEPT
    transform.RescaleType = "HU"
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = DicomSequence(
        [transform])
    ds.save_as(path, enforce_file_format=True)
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(
        volume.data, stored.transpose(1, 0, 2).astype(np.float32) * 2 + CT_INTERCEPT)


def test_an_enhanced_frame_without_a_position_is_refused_not_dropped(tmp_path):
    """An enhanced file whose last frame has no PlanePositionSequence cannot be placed as a
    whole: refused, never read as a volume one slice short (docs/formats.md, Refused).
    Kills: dicom_frames._enhanced_frames' `return []` -> `continue`."""
    path = enhanced_file(tmp_path / "mf.dcm", stored_values(27), axial_positions(SLICES),
                         spacing=SPACING)
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[SLICES - 1].PlanePositionSequence
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(MedsegError, match="without per-frame positions"):
        read_volume(tmp_path)


@pytest.mark.parametrize("shift, tilted", [(0.01, False), (0.1, True)])
def test_gantry_tilt_tolerance_is_0_05_mm(tmp_path, shift, tilted):
    """Slices shifted in plane by 0.01 mm each (0.03 mm at most) are a regular stack; by
    0.1 mm each (0.3 mm) a tilt, refused (docs: at most 0.05 mm, or 1% of the gap).
    Kills: dicom.tilt_problem's tolerance scaled (e.g. `10 * _tolerance(stack)`)."""
    positions = axial_positions(SLICES, shift_per_slice=(0.0, shift))
    write_series(tmp_path, stored_values(28), positions, spacing=SPACING)
    if tilted:
        with pytest.raises(MedsegError, match="gantry tilt of 2.3 degrees.*0.30 mm"):
            read_volume(tmp_path)
    else:
        assert read_volume(tmp_path).spatial_shape == (COLUMNS, ROWS, SLICES)


def test_resampling_fills_outside_the_slices_with_the_series_minimum(tmp_path):
    """A tilt of one row per slice: the rows of a grid plane beyond its shifted slice hold
    the series' minimum (docs/formats.md), not 0.
    Kills: dicom_resample.resample_stack's `fill = float(slices.min())` -> `0.0`."""
    stored = stored_values(29) + 100
    positions = axial_positions(SLICES, shift_per_slice=(0.0, SPACING[0]))
    write_series(tmp_path, stored, positions, spacing=SPACING)
    volume = read_volume(tmp_path, resample_irregular=True)
    minimum = float(stored.min()) + CT_INTERCEPT
    assert volume.spatial_shape == (COLUMNS, ROWS + SLICES - 1, SLICES)
    np.testing.assert_array_equal(volume.data[:, ROWS + 1:, 0], minimum)
    np.testing.assert_array_equal(volume.data[:, :SLICES - 2, SLICES - 1], minimum)


def test_integer_resampling_clips_the_cubic_overshoot(tmp_path):
    """A tilt of half a row per slice samples between pixels, where the cubic spline
    overshoots 0 / 65535 edges: the overshoot is clipped to the series' range (in float32
    too, since 2026-11-24), and in uint16 never wrapped around."""
    stored = np.zeros((ROWS, COLUMNS, SLICES), dtype=np.uint16)
    stored[ROWS // 2:] = 65535  # a step edge across the rows
    positions = axial_positions(SLICES, shift_per_slice=(0.0, SPACING[0] / 2))
    write_series(tmp_path, stored, positions, spacing=SPACING, intercept=0.0)
    as_float = read_volume(tmp_path, resample_irregular=True).data
    assert as_float.min() == 0 and as_float.max() == 65535  # the overshoot clipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a mutant's invalid cast
        native = read_volume(tmp_path, dtype=None, resample_irregular=True).data
    assert native.dtype == np.uint16
    np.testing.assert_allclose(native, np.clip(np.rint(as_float), 0, 65535), atol=1)
