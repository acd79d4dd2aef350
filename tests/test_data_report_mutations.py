"""Tests from a mutation audit of datasets, config, check, evaluate, metrics and the report.

Each test pins one promise of docs/formats.md or docs/workflows.md that a plausible one-line
bug would break without any other test noticing (the bug is named in the test's docstring).
"""

from __future__ import annotations

import io
import json
import math
import re

import nibabel as nib
import numpy as np
import pytest
from helpers import past_folds
from PIL import Image

from medseg.check import check_dataset
from medseg.config import load_workflow
from medseg.datasets import list_dataset, load_dataset
from medseg.errors import MedsegError
from medseg.evaluate import CaseScores, evaluate_pairs, pair_cases
from medseg.metrics import FAILED_SCORES
from medseg.report import format_table, run_evaluation, summarize

# ---------------------------------------------------------------- datasets


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_csv_channels_follow_the_column_order_not_the_alphabet(tmp_path):
    """Bug: the extra channel columns sorted by name (t2 before flair swapped the channels
    a model was trained on). formats.md: further columns are channels "in column order"."""
    (tmp_path / "dataset.csv").write_text(
        "image,label,t2,flair\nt1.nii.gz,seg.nii.gz,t2.nii.gz,flair.nii.gz\n",
        encoding="utf-8")
    (case,) = list_dataset(tmp_path).dataset.cases
    assert [p.name for p in case.images] == ["t1.nii.gz", "t2.nii.gz", "flair.nii.gz"]


def msd_description(root, **extra):
    touch(root / "imagesTr" / "a.nii.gz")
    touch(root / "labelsTr" / "a.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "x"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
        **extra}), encoding="utf-8")
    return root


def test_msd_modality_defaults_to_mr_and_ct_is_read_in_any_case(tmp_path):
    """Bugs: an MSD dataset.json without `modality` read as CT (its MR intensities clipped
    to CT percentiles), or a lowercase "ct" read as MR (a CT z-scored without clipping).
    workflows.md: a dataset.json without them is MR."""
    assert list_dataset(msd_description(tmp_path / "none")).dataset.modalities == ("MR",)
    lower = msd_description(tmp_path / "lower", modality={"0": " ct "})
    assert list_dataset(lower).dataset.modalities == ("CT",)


def nnunet_two_channels(root):
    for name in ("imagesTr/a_0000.nii.gz", "imagesTr/a_0001.nii.gz", "labelsTr/a.nii.gz"):
        touch(root / name)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz"}), encoding="utf-8")
    return root


def test_a_modality_setting_applies_to_every_channel(tmp_path):
    """Bug: `dataset.modality: CT` gave one modality for a two-channel dataset (the second
    channel's normalization then undefined). workflows.md: `CT` or `MR` for every channel."""
    dataset = load_dataset(nnunet_two_channels(tmp_path), modality="CT")
    assert dataset.modalities == ("CT", "CT")


def test_a_workflow_label_map_that_names_background_keeps_its_name(tmp_path):
    """Bug: the workflow's `dataset.labels` merged under a default background name, so its
    own name for 0 was replaced. workflows.md: the map replaces the dataset's."""
    dataset = load_dataset(nnunet_two_channels(tmp_path), labels={0: "air", 1: "x"})
    assert dataset.labels == {0: "air", 1: "x"}


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("override", ["predict.precision=amp", "predict.precision=bf16",
                                      "predict.precision=fp32", "train.precision=amp"])
def test_every_precision_choice_is_accepted_for_predict_as_for_train(override):
    """Bug: a choice missing from predict.precision's list. workflows.md: as train.precision
    (auto, bf16, fp32, amp)."""
    section, value = override.split("=")
    key = section.split(".")
    assert getattr(getattr(load_workflow(None, [override]), key[0]), key[1]) == value


def test_inclusive_bounds_of_rotation_and_component_size():
    """Bugs: a closed bound made open: a 180 degree rotation range, a 16^3 patch budget or a
    0 ml minimum component (keep every component) refused, though workflows.md says 'at
    least 4096, 16^3' and the messages 'at most 180' and '(at least 0)'."""
    workflow = load_workflow(None, ["augment.rotate_degrees=180", "plan.max_patch_voxels=4096",
                                    "predict.min_component_ml={1: 0}"])
    assert workflow.augment.rotate_degrees == 180.0 and workflow.plan.max_patch_voxels == 4096
    assert workflow.predict.min_component_ml == {1: 0.0}
    with pytest.raises(MedsegError, match="'augment.rotate_degrees' must be at least 0 and "
                                          "at most 180"):
        load_workflow(None, ["augment.rotate_degrees=180.5"])


# ---------------------------------------------------------------- check


def save(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def checked_case(root, name, affine, seed, shape=(8, 9, 10), empty=False):
    """An MSD training entry: a random image and a cube label on one grid."""
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    if not empty:
        label[2:5, 2:5, 2:5] = 1
    save(root / "imagesTr" / f"{name}.nii.gz", data, affine)
    save(root / "labelsTr" / f"{name}.nii.gz", label, affine)
    return {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}


def checked(root, entries):
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "organ"}, "modality": {"0": "MR"},
        "training": entries}), encoding="utf-8")
    return check_dataset(root)


def test_a_table_of_warnings_only_exits_0_and_1_when_strict(tmp_path):
    """The demo's own phantoms (oblique, flipped: orientation warnings) exited 1, so
    `medseg check DATA && medseg train ...` stopped on what training accepts. formats.md: 1
    when the table holds an error, or with --strict any row."""
    # a second case keeps its structure: a dataset with none anywhere is an error (train
    # refuses it)
    report = checked(tmp_path, [checked_case(tmp_path, "a", np.eye(4), 0, empty=True),
                                checked_case(tmp_path, "b", np.eye(4), 1)])
    assert [p.severity for p in past_folds(report.problems)] == ["warning"]
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1


def test_a_spacing_finer_than_half_the_median_is_an_outlier(tmp_path):
    """Bug: only spacings beyond twice the median flagged. formats.md: beyond a factor 2 of
    the dataset median on some axis, either way."""
    entries = [checked_case(tmp_path, f"ok{k}", np.diag([2.0, 2, 2, 1]), k) for k in range(3)]
    entries.append(checked_case(tmp_path, "fine", np.diag([0.5, 0.5, 0.5, 1]), 9))
    report = checked(tmp_path, entries)
    assert [(p.case, p.message) for p in past_folds(report.problems)] == [
        ("fine", "spacing (0.5, 0.5, 0.5) mm is an outlier: dataset median (2, 2, 2) mm "
                 "(beyond a factor 2)")]


def test_spacing_is_compared_in_ras_order_not_voxel_order(tmp_path):
    """Bug: spacings compared in each file's voxel-axis order: a scan stored with its thick
    axis first (axial slices as the first voxel axis) was called a spacing outlier. formats.md:
    spacing on some axis (R, A, S order); such a scan differs only in orientation."""
    entries = [checked_case(tmp_path, f"ras{k}", np.diag([1.0, 1, 4, 1]), k) for k in range(3)]
    permuted = np.zeros((4, 4))  # voxel axes (S, R, A), spacing (4, 1, 1)
    permuted[2, 0], permuted[0, 1], permuted[1, 2], permuted[3, 3] = 4.0, 1.0, 1.0, 1.0
    entries.append(checked_case(tmp_path, "sra", permuted, 9, shape=(10, 8, 9)))
    report = checked(tmp_path, entries)
    assert [(p.case, p.message) for p in past_folds(report.problems)] == [
        ("sra", "orientation SRA differs from the usual RAS")]


def test_three_cases_are_enough_for_the_orientation_check(tmp_path):
    """Bug: the dataset-wide outlier checks skipped below 4 cases (off by one): with 3, two
    agree on the usual orientation."""
    lps = np.diag([-1.0, -1, 1, 1])
    entries = [checked_case(tmp_path, "a", np.eye(4), 0), checked_case(tmp_path, "b", np.eye(4), 1),
               checked_case(tmp_path, "c", lps, 2)]
    report = checked(tmp_path, entries)
    assert [(p.case, p.message) for p in past_folds(report.problems)] == [
        ("c", "orientation LPS differs from the usual RAS")]


def test_orientations_that_no_majority_shares_are_not_outliers(tmp_path):
    """The demo's phantoms (oblique and flipped by design) had 5 of 8 cases 'differ from the
    usual RPS', 3 of 8; a 2-2 tie flagged both cases of whichever came first."""
    lps, las = np.diag([-1.0, -1, 1, 1]), np.diag([-1.0, 1, 1, 1])
    entries = [checked_case(tmp_path, "a", np.eye(4), 0), checked_case(tmp_path, "b", np.eye(4), 1),
               checked_case(tmp_path, "c", lps, 2), checked_case(tmp_path, "d", las, 3)]
    assert past_folds(checked(tmp_path, entries).problems) == ()


def test_two_cases_of_one_name_are_a_check_error(tmp_path):
    """Bug: the duplicate-name row dropped from `medseg check` (training refuses such a
    dataset). formats.md: duplicate case: same name, ..."""
    for k, site in enumerate(("siteA", "siteB")):
        checked_case(tmp_path / site, "scan", np.eye(4), k)
    (tmp_path / "dataset.csv").write_text(
        "case,image,label\n"
        "p1,siteA/imagesTr/scan.nii.gz,siteA/labelsTr/scan.nii.gz\n"
        "p1,siteB/imagesTr/scan.nii.gz,siteB/labelsTr/scan.nii.gz\n", encoding="utf-8")
    report = check_dataset(tmp_path)
    assert [(p.severity, p.case, p.message) for p in past_folds(report.problems)] == [
        ("error", "p1", "duplicate case name")]


# ---------------------------------------------------------------- evaluate and metrics

ONE_LABEL = {0: "background", 1: "a"}


def cube(shape=(24, 16, 16), start=4, size=8, shift=0):
    data = np.zeros(shape, np.uint8)
    data[start + shift:start + shift + size, start:start + size, start:start + size] = 1
    return data


def test_case_names_keep_every_dot_before_the_image_suffix(tmp_path):
    """Bug: pairing by the name up to its first dot: `sub-01.ses-1` and `sub-01.ses-2` were
    refused as two files of one case (or, with one of them, scored under the wrong name).
    formats.md: a case is the file name without its extension."""
    for folder in ("ref", "pred"):
        for name in ("sub-01.ses-1", "sub-01.ses-2"):
            save(tmp_path / folder / f"{name}.nii.gz", cube())
    pairs = pair_cases(tmp_path / "pred", tmp_path / "ref")
    assert [case for case, _, _ in pairs] == ["sub-01.ses-1", "sub-01.ses-2"]


def test_resampled_cases_are_listed_in_the_summary(tmp_path, capsys):
    """Bug: summary.json's resampled_cases left empty. formats.md lists it, and the console
    names the cases resampled onto the reference grid."""
    reference = cube(shape=(12, 8, 8), start=2, size=4)
    fine = np.repeat(reference, 2, axis=0)  # 1 mm along x where the reference has 2 mm
    fine_affine = np.eye(4)
    fine_affine[0, 3] = -0.5  # the fine voxel centres sit 0.5 mm either side of the coarse
    save(tmp_path / "ref" / "c.nii.gz", reference, np.diag([2.0, 1, 1, 1]))
    save(tmp_path / "pred" / "c.nii.gz", fine, fine_affine)
    summary = run_evaluation(tmp_path / "pred", tmp_path / "ref", None, None, resample=True)
    assert summary["resampled_cases"] == ["c"] and summary["failed_cases"] == []
    assert summary["mean_dice"] == 1.0
    assert "resampled onto the reference grid (nearest neighbour): c" in capsys.readouterr().out


def test_the_tolerance_reaches_the_surface_dice(tmp_path):
    """Bugs: evaluate's --tolerance-mm not passed to the scoring, or NSD computed against a
    fixed 2 mm: a 3 mm shift scores NSD 1 at 3 mm and less at 2 mm."""
    save(tmp_path / "ref" / "c.nii.gz", cube())
    save(tmp_path / "pred" / "c.nii.gz", cube(shift=3))
    pairs = pair_cases(tmp_path / "pred", tmp_path / "ref")
    at = {mm: evaluate_pairs(pairs, ONE_LABEL, tolerance_mm=mm)[0].scores["a"]["nsd"]
          for mm in (2.0, 3.0)}
    assert at[3.0] == 1.0 and at[2.0] < 0.9


# ---------------------------------------------------------------- summary, CSV and HTML


def scored(dice, hd95=1.0, ref_ml=1.0, pred_ml=1.0):
    return {"dice": dice, "iou": dice, "hd95_mm": hd95, "hd_mm": hd95, "assd_mm": hd95,
            "nsd": dice,
            "ref_ml": ref_ml, "pred_ml": pred_ml, "diff_ml": pred_ml - ref_ml}


BOTH_EMPTY = {**dict.fromkeys(("dice", "iou", "hd95_mm", "hd_mm", "assd_mm", "nsd"), math.nan),
              "ref_ml": 0.0, "pred_ml": 0.0, "diff_ml": 0.0}


def test_the_median_is_the_median_not_the_mean():
    """Bug: `median` computed as the mean (the existing tests used two values, where both
    agree). formats.md: mean, sd, median, iqr and n over the finite values."""
    results = [CaseScores(name, {"s": scored(d)}) for name, d in
               (("a", 0.1), ("b", 0.2), ("c", 0.9))]
    dice = summarize(results)["structures"]["s"]["dice"]
    assert dice["median"] == pytest.approx(0.2) and dice["mean"] == pytest.approx(0.4)


def test_n_inf_counts_infinite_values_only_and_the_table_shows_it():
    """Bugs: a NaN (structure in neither mask) counted in n_inf as a failure; the console
    table's inf column showing Dice's n_inf (always 0) instead of the distances'."""
    results = [CaseScores("a", {"s": scored(1.0, 0.0), "t": scored(0.5)}),
               CaseScores("b", {"s": scored(0.0, math.inf), "t": dict(BOTH_EMPTY)})]
    summary = summarize(results, tolerance_mm=2.0)
    assert summary["structures"]["t"]["hd95_mm"]["n_inf"] == 0
    assert summary["structures"]["s"]["hd95_mm"]["n_inf"] == 1
    row = next(line for line in format_table(summary).splitlines() if line.startswith("s "))
    assert row.split()[-2:] == ["2", "1"]  # n (Dice values), inf (infinite HD95)


def test_a_failed_case_counts_in_n_cases():
    """Bug: n_cases counting the scored cases only, while the failed one is in every mean."""
    results = [CaseScores("a", {"s": scored(1.0)}),
               CaseScores("b", {"s": dict(FAILED_SCORES)}, "no prediction for this case")]
    summary = summarize(results)
    assert summary["n_cases"] == 2 and summary["failed_cases"] == ["b"]


def html_report(results, tolerance_mm=2.0, labels=None):
    from medseg.report_html import render_report

    return render_report(results, summarize(results, tolerance_mm), labels)


def summary_row(html, name):
    return re.search(rf'<tr><td class="name">{name}</td>(.*?)</tr>', html).group(1)


def test_overlap_cells_are_tinted_green_for_1_and_red_for_0():
    """Bug: the tint scale reversed. formats.md: Dice, IoU and NSD cells tinted from red to
    green (hue 0 for 0, 120 for 1)."""
    html = html_report([CaseScores("a", {"good": scored(1.0), "bad": scored(0.0)})])
    assert summary_row(html, "good").count("background: hsl(120, ") == 3
    assert summary_row(html, "bad").count("background: hsl(0, ") == 3


def test_volumes_are_shown_to_a_hundredth_of_a_ml():
    """Bug: the reference volume's digits changed. formats.md: volumes to 0.01 ml."""
    html = html_report([CaseScores("a", {"s": scored(0.9, ref_ml=1.23456, pred_ml=1.5)})])
    cells = re.findall(r'<span class="m">([^<]*)</span>', summary_row(html, "s"))
    assert cells[-2:] == ["1.23 &plusmn; &ndash;", "0.27 &plusmn; &ndash;"]


def test_absent_structures_have_no_row_in_the_summary_table():
    """Bug: the page showing every structure. formats.md: report.html leaves out the
    structures in absent_structures (a note names them)."""
    results = [CaseScores("a", {"s": scored(0.8), "gone": dict(BOTH_EMPTY)})]
    html = html_report(results)
    assert '<td class="name">s</td>' in html
    assert '<td class="name">gone</td>' not in html
    assert "absent from every reference and prediction: gone." in html


def test_a_failed_case_row_shows_the_zero_it_is_scored_with():
    """Bug: a failed case's row left blank. formats.md: a failed case shows the Dice and
    NSD 0 it is scored with."""
    results = [CaseScores("ok", {"s": scored(0.8)}),
               CaseScores("lost", {"s": dict(FAILED_SCORES)}, "no prediction for this case")]
    row = re.search(r'<tr><td class="name">lost</td>(.*?)</tr>', html_report(results)).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", row)[:2] == ["0.000", "0.000"]
    assert row.count("hsl(0, ") == 2  # tinted red, as the summary tints a 0
    assert "no prediction for this case" in row


def test_montage_views_are_radiological_with_anterior_and_superior_up():
    """Bug: a view left unmirrored (neurological: patient's right on the right). formats.md:
    axial and coronal with the patient's right on the left, sagittal with anterior on the
    left; superior (axial: anterior) up. A structure in the right-anterior-superior corner of
    an RAS volume is drawn in the upper left of all three views."""
    from PIL import Image

    from medseg.evaluate import LoadedPair
    from medseg.report_figures import (
        GAP,
        HEADER_H,
        MONTAGE_DENSITY,
        REFERENCE_RGB,
        TILE,
        TITLE_H,
        montage_png,
    )

    label = np.zeros((40, 40, 40), np.uint8)
    label[34:, 34:, 34:] = 1  # highest R, A and S indices
    pair = LoadedPair(label, label.copy(), np.eye(4), (1.0, 1.0, 1.0), False)
    png = montage_png(pair, ONE_LABEL, {"a": scored(1.0)}, "corner")
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    d = MONTAGE_DENSITY
    for view, name in enumerate(("axial", "coronal", "sagittal")):
        top, left = (HEADER_H + TITLE_H) * d, view * (TILE + GAP) * d
        tile = picture[top:top + TILE * d:d, left:left + TILE * d:d]
        rows, cols = np.nonzero((tile == REFERENCE_RGB).all(axis=-1))
        assert rows.size > 50, name
        assert rows.mean() < TILE / 2 and cols.mean() < TILE / 2, (name, rows.mean(), cols.mean())


def test_infinite_distances_are_left_out_of_the_box_plots():
    """Bug: only NaN filtered from the box plots, so an infinite HD95 went into the box (its
    quartiles NaN, the HD95 panel drawn wrong). formats.md / the report: infinite distances
    left out; a case whose only value is an infinite HD95 leaves the plots unchanged."""
    from medseg.report_figures import boxplots_png

    cases = [CaseScores("a", {"s": scored(0.8, 2.0)}), CaseScores("c", {"s": scored(0.7, 3.0)})]
    lost = {**dict.fromkeys(("dice", "iou", "nsd", "diff_ml"), math.nan), "hd95_mm": math.inf,
            "assd_mm": math.inf, "ref_ml": 1.0, "pred_ml": 0.0}
    with_inf = boxplots_png([*cases, CaseScores("b", {"s": lost})], ["s"], 2.0)
    pictures = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
                for png in (with_inf, boxplots_png(cases, ["s"], 2.0))]
    rows, cols = np.nonzero(np.abs(pictures[0] - pictures[1]).sum(axis=-1))
    # what differs is the "1 inf" count at the right edge of the HD95 panel: a small patch
    # of text (20 x 40 of the 1200 displayed pixels' width), not a box drawn anew
    density = pictures[0].shape[1] / 1200
    assert rows.size > 0 and np.ptp(rows) < 20 * density and np.ptp(cols) < 40 * density
