"""Review of planning against nnU-Net v2's experiment planner (session 27X)."""

from helpers import synthetic_fingerprint

from medseg.config import PlanConfig
from medseg.plan import Plan, kernels_and_strides, make_plan


def test_a_target_spacing_coarser_than_the_cases_makes_a_readable_plan():
    # one 3 mm slice (a 2D-like case) planned at 8 mm: the median shape rounded to 0 along
    # that axis, and the plan.json train wrote was refused by predict and --resume
    fp = synthetic_fingerprint([[0.8, 0.8, 3.0]] * 3, [[200, 180, 1]] * 3)
    plan = make_plan(fp, PlanConfig(target_spacing=[0.8, 0.8, 8.0]))
    assert plan.median_shape == [200, 180, 1]
    assert Plan.from_json(plan.to_json()) == plan


def test_an_axis_is_pooled_alone_only_while_it_has_12_voxels_as_nnunet_pools_it():
    # the TotalSegmentator CT at 3 mm (median 116 x 99 x 30): patch [128, 112, 32]; nnU-Net's
    # get_pool_and_conv_props stops where R alone is left with 8 voxels, medseg halved it
    # alone to 4 in a sixth level of 320 filters
    kernels, strides = kernels_and_strides([128, 112, 32], [3.0, 3.0, 3.0])
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert len(kernels) == len(strides)
    # an axis alone with 12 voxels or more still pools (one long axis)
    _, strides = kernels_and_strides([40, 40, 544], [1.0, 1.0, 1.0])
    assert [s[2] for s in strides] == [1, 2, 2, 2, 2, 2]


def test_the_two_down_samplings_dynunet_needs_are_made_for_a_lone_short_axis():
    from medseg.model import create_model

    plan = make_plan(synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[20, 5, 5]] * 3),
                     PlanConfig())
    assert [s[0] for s in plan.strides] == [1, 2, 2]
    create_model(plan)


def test_the_mr_normalization_and_its_difference_from_nnunet_are_documented():
    """docs/workflows.md said 'MR z-scores over nonzero voxels', silent on nnU-Net's rule (the
    nonzero mask only where cropping shrinks the median case by a quarter, every voxel
    otherwise) and on what happens to zero voxels, which medseg keeps at 0."""
    import re
    from pathlib import Path

    import numpy as np

    from medseg.transforms import _normalize

    text = (Path(__file__).resolve().parent.parent / "docs" / "workflows.md").read_text(
        encoding="utf-8")
    plan_section = re.search(r"^## `plan`\n(.*?)^## ", text, re.M | re.S).group(1)
    flat = " ".join(plan_section.split())
    assert "leaves its zero voxels at 0" in flat
    assert "shrinks the median case by a quarter or more" in flat
    assert "Where it differs from nnU-Net v2's planner" in flat
    assert "linear for images and nearest-neighbour for labels" in flat
    image = np.array([[[0.0, 10.0, 20.0, 30.0]]], dtype=np.float32)[None]
    out = _normalize("image", {"scheme": "zscore_nonzero"})({"image": image})
    assert float(np.asarray(out["image"]).ravel()[0]) == 0.0  # what the docs say


def test_medseg_plan_says_why_the_target_spacing_is_not_the_median():
    """`medseg plan` printed a target of 1.8 mm beside a median of 4 mm without a word of
    nnU-Net's anisotropy rule (or of plan.target_spacing having set it)."""
    from medseg.plan import describe_plan

    spacings = [[0.7, 0.7, z] for z in (5.0, 5.0, 3.0, 4.0, 1.0)]
    fp = synthetic_fingerprint(spacings, [[256, 256, 24]] * 5)
    first = describe_plan(make_plan(fp, PlanConfig()), fp).splitlines()[0]
    assert "[0.7, 0.7, 1.8] (along S the cases' 10th percentile" in first
    given = make_plan(fp, PlanConfig(target_spacing=[1.0, 1.0, 1.0]))
    assert "(set by plan.target_spacing)" in describe_plan(given, fp).splitlines()[0]
    plain = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[36, 50, 35]] * 3)
    assert describe_plan(make_plan(plain, PlanConfig()), plain).split(";")[0].endswith(
        "[1, 1, 1]")


def test_single_slices_get_no_3_wide_kernel_across_their_one_voxel():
    # 200 x 180 x 1 cases at 0.8 x 0.8 x 3 mm: S became 3 wide from level 1 on, each
    # convolution reading the slice and two planes of zero padding (3x the work and weights)
    from medseg.model import create_model

    fp = synthetic_fingerprint([[0.8, 0.8, 3.0]] * 3, [[200, 180, 1]] * 3)
    plan = make_plan(fp, PlanConfig(base_filters=4, max_filters=16))
    assert plan.patch_size == [224, 192, 1]
    assert all(kernel[2] == 1 for kernel in plan.kernels)
    assert all(kernel[:2] == [3, 3] for kernel in plan.kernels)
    import torch

    model = create_model(plan).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 224, 192, 1))
    assert out.shape[-3:] == (224, 192, 1)


def test_a_source_run_planned_with_the_old_lone_axis_pooling_still_fits_train_init(
        tmp_path, capsys):
    """Fine-tuning from a run that an earlier medseg planned (a lone axis of 8 pooled: one
    level more than the planner now makes of the same spacing and patch) was refused, its
    weights no longer fitting; its levels, strides and kernels are kept instead."""
    import dataclasses

    import pytest

    from medseg.errors import MedsegError
    from medseg.model import create_model, save_weights
    from medseg.pretrained import InitSource, keep_source_topology, refuse_unfit

    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[40, 20, 20]] * 3)
    config = PlanConfig(patch_size=[32, 16, 16], base_filters=4, max_filters=16)
    plan = make_plan(fp, config)
    assert plan.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]  # R has 8 left, alone: stop
    old = dataclasses.replace(plan, strides=[*plan.strides, [2, 1, 1]],
                              kernels=[[3, 3, 3]] * 4, filters=[4, 8, 16, 16])
    weights = tmp_path / "run" / "fold_0" / "checkpoints" / "best.safetensors"
    weights.parent.mkdir(parents=True)
    save_weights(create_model(old), weights)
    source = InitSource(weights, old, tmp_path / "run" / "plan.json")
    kept = keep_source_topology(source, plan)
    assert (kept.strides, kept.kernels, kept.filters) == (old.strides, old.kernels,
                                                         old.filters)
    assert "levels, strides and kernels" in capsys.readouterr().err
    refuse_unfit(source, kept)  # fits
    # another patch is another network: the planner's, and the refusal as before
    other = make_plan(fp, dataclasses.replace(config, patch_size=[16, 16, 16]))
    assert keep_source_topology(source, other) == other
    with pytest.raises(MedsegError, match="do not fit"):
        refuse_unfit(source, other)
