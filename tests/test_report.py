import base64
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.evaluate import CaseScores, evaluate_pairs, pair_cases
from medseg.metrics import FAILED_SCORES
from medseg.report import format_table, scores_csv, summarize, write_reports
from medseg.report_figures import PREDICTION_RGB, REFERENCE_RGB
from medseg.report_html import rank_cases, render_report

LABELS = {0: "background", 1: "liver", 2: "kidney & <left>", 3: "absent"}
SPACING_AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def scores(dice, hd95, ref_ml=1.0):
    return {"dice": dice, "iou": dice, "hd95_mm": hd95, "hd_mm": hd95, "assd_mm": hd95,
            "nsd": dice, "ref_ml": ref_ml, "pred_ml": ref_ml, "diff_ml": 0.0}


def test_summary_leaves_out_inf_and_nan_and_counts_inf():
    results = [
        CaseScores("a", {"s": scores(1.0, 0.0), "t": scores(math.nan, math.nan, 0.0)}),
        CaseScores("b", {"s": scores(0.5, 4.0), "t": scores(math.nan, math.nan, 0.0)}),
        CaseScores("c", {"s": scores(0.0, math.inf), "t": scores(math.nan, math.nan, 0.0)}),
        CaseScores("d", {"s": dict(FAILED_SCORES), "t": dict(FAILED_SCORES)}, "no prediction"),
    ]
    summary = summarize(results, tolerance_mm=2.0)
    hd95 = summary["structures"]["s"]["hd95_mm"]
    # the median counts the two misses: 0, 4, inf, inf
    assert hd95 == {"mean": 2.0, "sd": pytest.approx(math.sqrt(8)), "median": math.inf,
                    "iqr": 2.0, "n": 2, "n_inf": 2}
    assert summary["structures"]["s"]["dice"]["n"] == 4  # the failed case counts as Dice 0
    assert summary["structures"]["s"]["dice"]["mean"] == pytest.approx(1.5 / 4)
    assert summary["structures"]["t"]["hd95_mm"]["n"] == 0  # both empty: left out
    assert summary["absent_structures"] == ["t"]
    assert summary["mean_dice"] == pytest.approx(1.5 / 4)  # over present structures only
    assert summary["failed_cases"] == ["d"] and summary["tolerance_mm"] == 2.0
    table = format_table(summary)
    assert "nsd@2mm" in table and "failed cases" in table
    assert "absent from every reference and prediction: 1 structure " in table
    assert "\nt " not in table


def test_csv_writes_inf_and_leaves_nan_empty():
    text = scores_csv([CaseScores("a", {"s": dict(FAILED_SCORES)}, "boom")])
    assert text.splitlines()[1] == "a,s,0,0,inf,inf,inf,0,,,,,,,boom"  # spacing unknown: empty


def test_csv_gives_each_case_its_reference_spacing():
    results = [CaseScores("thin", {"s": scores(0.9, 1.0), "t": scores(0.8, 1.0)},
                          spacing=(0.78125, 0.78125, 1.25)),
               CaseScores("thick", {"s": scores(0.7, 1.0), "t": scores(0.6, 1.0)},
                          spacing=(0.5, 0.5, 5.0))]
    rows = list(csv.DictReader(io.StringIO(scores_csv(results))))
    assert [(r["case"], r["spacing_i_mm"], r["spacing_j_mm"], r["spacing_k_mm"]) for r in rows] \
        == [("thin", "0.78125", "0.78125", "1.25")] * 2 + [("thick", "0.5", "0.5", "5")] * 2


def test_csv_spacings_read_from_float32_headers_are_written_as_given():
    """A NIfTI header's 0.8 mm is float32: 0.800000011920929 as read; was 0.80000001."""
    import numpy as np

    spacing = tuple(float(np.float32(v)) for v in (0.8, 0.7, 3.3))
    rows = list(csv.DictReader(io.StringIO(scores_csv(
        [CaseScores("a", {"s": scores(0.9, 1.0)}, spacing=spacing)]))))
    assert (rows[0]["spacing_i_mm"], rows[0]["spacing_j_mm"], rows[0]["spacing_k_mm"]) == \
        ("0.8", "0.7", "3.3")


def test_summary_json_is_strict_json(tmp_path):
    results = [CaseScores("a", {"s": scores(0.0, math.inf)}),
               CaseScores("b", {"s": scores(1.0, math.nan)})]
    write_reports(results, tmp_path, html=False)

    def refuse(constant):
        raise AssertionError(f"{constant} in summary.json")

    saved = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"),
                       parse_constant=refuse)
    assert saved["structures"]["s"]["hd95_mm"]["mean"] is None
    assert not (tmp_path / "report.html").exists()


def test_rank_cases_picks_best_median_and_worst():
    results = [CaseScores(name, {"s": scores(d, 1.0)})
               for name, d in (("a", 0.5), ("b", 0.9), ("c", 0.1), ("d", 0.7))]
    results.append(CaseScores("e", {"s": dict(FAILED_SCORES)}, "missing"))
    roles = [(role, r.case) for role, r in rank_cases(results, ["s"])]
    assert roles == [("best", "b"), ("median", "a"), ("worst", "c")]
    single = rank_cases(results[:1], ["s"])
    assert [(role, r.case) for role, r in single] == [("best, median, worst", "a")]


def blob_case(rng, shape=(40, 36, 12)):
    """A reference with two structures and a prediction with perturbed edges."""
    reference = np.zeros(shape, np.uint8)
    reference[8:26, 6:24, 2:10] = 1
    reference[28:36, 20:32, 3:9] = 2
    shift = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
    prediction = np.roll(reference, shift, axis=(0, 1))
    prediction[(prediction == 2) & (rng.random(shape) < 0.2)] = 0
    return reference, prediction


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(3)
    for k in range(4):
        reference, prediction = blob_case(rng)
        for folder, data in (("ref", reference), ("pred", prediction)):
            (root / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(data, SPACING_AFFINE), root / folder / f"case{k}.nii.gz")
    nib.save(nib.Nifti1Image(reference, SPACING_AFFINE), root / "ref" / "missing.nii.gz")
    results = evaluate_pairs(pair_cases(root / "pred", root / "ref"), LABELS)
    write_reports(results, root / "out", labels=LABELS, tolerance_mm=2.0)
    return root / "out"


def inline_pngs(html):
    return [base64.b64decode(m) for m in
            re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_html_report_is_self_contained_and_complete(report_dir):
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", html)
    assert not re.search(r"(https?:|//|<script|<link|<iframe|url\()", text, re.IGNORECASE)
    assert text.count('src="data:"') == text.count("src=")
    assert '<table class="summary">' in html and '<table class="cases">' in html
    assert "kidney &amp; &lt;left&gt;" in html and "kidney & <left>" not in html
    assert "absent" in html and "missing" in html and "no prediction for this case" in html
    assert "&plusmn;" in html and "IQR" in html and "n&nbsp;4" in html
    pngs = inline_pngs(html)
    assert len(pngs) == 1 + 3  # box plots, then the best, median and worst cases
    for png in pngs:
        assert png.startswith(b"\x89PNG") and b"matplotlib.org" not in png
    for role in ("best", "median", "worst"):
        assert f"<h3>{role}" in html


def test_montage_shows_both_contours(report_dir):
    montage = np.asarray(Image.open(io.BytesIO(inline_pngs(
        (report_dir / "report.html").read_text(encoding="utf-8"))[1])).convert("RGB"))
    for colour in (REFERENCE_RGB, PREDICTION_RGB):
        assert (montage == colour).all(axis=-1).sum() > 100, colour
    assert montage.shape[1] > 1000


def test_pictures_are_drawn_at_twice_the_density_they_are_shown_at(report_dir):
    """The montages were drawn at one pixel per displayed pixel, blurred on HiDPI screens
    beside the box plots: now each PNG holds twice the pixels its img tag shows (1208 px
    wide), in RGB (matplotlib's alpha channel was a tenth of the page's size)."""
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    tags = re.findall(r'<img alt="([^"]*)" width="(\d+)" height="(\d+)" '
                      r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert [alt.split(" ")[0] for alt, *_ in tags] == ["box", "overlay", "overlay", "overlay"]
    for alt, width, height, data in tags:
        picture = Image.open(io.BytesIO(base64.b64decode(data)))
        assert picture.size == (2 * int(width), 2 * int(height)), alt
        assert picture.mode == "RGB", alt
    assert {int(width) for alt, width, *_ in tags if alt.startswith("overlay")} == {1208}


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def install_chromium() -> str | None:
    """Debian's chromium, installed only when this test runs (root and apt-get needed)."""
    if os.environ.get("MEDSEG_NO_APT") or not shutil.which("apt-get") or os.geteuid() != 0:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                    ["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode == 0 and find_chromium():
            return find_chromium()
    return None


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    chromium = find_chromium() or install_chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not available (not on PATH, and apt-get install "
                    "chromium failed or is not possible here)")
    page = (report_dir / "report.html").as_uri()
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    screenshot = tmp_path / "report.png"
    subprocess.run([*common, "--window-size=1400,2400", f"--screenshot={screenshot}", page],
                   capture_output=True, timeout=180, check=False)
    assert screenshot.is_file(), "chromium wrote no screenshot"
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True,
                         timeout=180, check=False).stdout.decode("utf-8")
    assert '<table class="summary">' in dom and dom.count("<img") == 4
    shot = np.asarray(Image.open(screenshot).convert("RGB"))
    assert shot.shape[:2] == (2400, 1400)
    # the montage pictures were decoded and drawn: their contour colours are on screen
    for colour in (REFERENCE_RGB, PREDICTION_RGB):
        assert (np.abs(shot.astype(int) - colour).max(axis=-1) < 8).sum() > 100, colour
    if os.environ.get("MEDSEG_KEEP_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["MEDSEG_KEEP_SCREENSHOT"])


def test_the_drawn_slice_shows_both_masks_when_sizes_tie():
    from medseg.report_figures import largest_slice

    prediction = np.zeros((4, 4, 3), bool)
    reference = np.zeros((4, 4, 3), bool)
    prediction[:2, :2, 0] = True  # slice 0: the prediction alone, 4 voxels
    prediction[:2, :2, 2] = reference[:2, :2, 2] = True  # slice 2: both, 4 voxels
    assert largest_slice(prediction, reference, axis=2) == 2


def test_a_large_false_positive_does_not_take_the_views_away_from_the_reference():
    """The slices were chosen by both masks together: with a false positive much larger
    than the structure, none of the three views cut the reference."""
    from medseg.report_figures import largest_slice

    prediction = np.zeros((30, 30, 30), bool)
    reference = np.zeros((30, 30, 30), bool)
    reference[2:5, 2:5, 2:5] = True
    prediction[15:28, 15:28, 15:28] = True  # a false positive, 80 times the structure
    for axis in range(3):
        assert largest_slice(prediction, reference, axis) in (2, 3, 4)
    assert largest_slice(prediction, np.zeros_like(reference), 2) in range(15, 28)


def test_dollar_signs_in_case_and_structure_names_are_text(tmp_path):
    """matplotlib would parse "$1_$" as a formula and fail the whole report."""
    rng = np.random.default_rng(5)
    reference, prediction = blob_case(rng)
    for folder, data in (("ref", reference), ("pred", prediction)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, SPACING_AFFINE), tmp_path / folder / "pt_$1_$2.nii.gz")
    labels = {0: "background", 1: "L_$^$", 2: "cost $5 $x"}
    results = evaluate_pairs(pair_cases(tmp_path / "pred", tmp_path / "ref"), labels)
    write_reports(results, tmp_path / "out", labels=labels, tolerance_mm=2.0)
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "pt_$1_$2" in html and "L_$^$" in html and len(inline_pngs(html)) >= 2


def test_a_file_name_that_is_not_utf8_is_written_escaped(tmp_path):
    """A case named with a Latin-1 byte (0xE9, 'é'): Python keeps it as a lone surrogate,
    which matplotlib and UTF-8 files refuse, so the evaluation wrote no report at all."""
    rng = np.random.default_rng(6)
    reference, prediction = blob_case(rng)
    name = os.fsdecode(b"caf\xe9_01.nii.gz")
    for folder, data in (("ref", reference), ("pred", prediction)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, SPACING_AFFINE), tmp_path / folder / name)
    results = evaluate_pairs(pair_cases(tmp_path / "pred", tmp_path / "ref"), LABELS)
    write_reports(results, tmp_path / "out", labels=LABELS, tolerance_mm=2.0)
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "caf\\xe9_01" in html and len(inline_pngs(html)) >= 2
    assert "caf\\xe9_01" in (tmp_path / "out" / "scores.csv").read_text(encoding="utf-8")


def test_one_case_has_no_sd_and_the_csv_keeps_eight_digits():
    results = [CaseScores("a", {"s": scores(0.99999983, 1.0)})]
    assert math.isnan(summarize(results)["structures"]["s"]["dice"]["sd"])
    assert scores_csv(results).splitlines()[1].startswith("a,s,0.99999983,")


def test_a_case_without_any_structure_is_not_ranked_best():
    from medseg.report_html import case_mean_dice

    empty = {"dice": math.nan, "iou": math.nan, "hd95_mm": math.nan, "hd_mm": math.nan,
             "assd_mm": math.nan,
             "nsd": math.nan, "ref_ml": 0.0, "pred_ml": 0.0, "diff_ml": 0.0}
    results = [CaseScores("empty", {"s": empty}), CaseScores("a", {"s": scores(0.6, 1.0)}),
               CaseScores("b", {"s": scores(0.8, 1.0)})]
    assert math.isnan(case_mean_dice(results[0], ["s"]))
    roles = [(role, r.case) for role, r in rank_cases(results, ["s"])]
    assert roles == [("best", "b"), ("median, worst", "a")]


def test_a_structure_missed_in_most_cases_has_an_infinite_median_hd95(tmp_path):
    """The median left the misses out: one hit at 0 mm and two misses read 'hd95 median
    0.00' in the table, the HTML and summary.json."""
    hit = {**dict.fromkeys(FAILED_SCORES, 0.0), "dice": 1.0, "nsd": 1.0}
    miss = {**dict(FAILED_SCORES), "ref_ml": 1.0, "pred_ml": 0.0, "diff_ml": -1.0}
    results = [CaseScores("a", {"gallbladder": hit}), CaseScores("b", {"gallbladder": miss}),
               CaseScores("c", {"gallbladder": dict(miss)})]
    summary = summarize(results, 2.0)
    hd95 = summary["structures"]["gallbladder"]["hd95_mm"]
    assert math.isinf(hd95["median"]) and hd95["n"] == 1 and hd95["n_inf"] == 2
    assert hd95["mean"] == 0.0  # the mean stays over the finite values
    row = next(line for line in format_table(summary).splitlines()
               if line.startswith("gallbladder"))
    assert row.split()[4] == "inf"
    write_reports(results, tmp_path, labels={0: "background", 1: "gallbladder"},
                  tolerance_mm=2.0, summary=summary)
    assert "median&nbsp;inf" in (tmp_path / "report.html").read_text(encoding="utf-8")
    saved = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert saved["structures"]["gallbladder"]["hd95_mm"]["median"] is None
    two_hits = summarize(results[:1] + [results[0], results[1]], 2.0)
    assert two_hits["structures"]["gallbladder"]["hd95_mm"]["median"] == 0.0


def test_the_console_table_lists_every_structure_when_all_are_absent():
    """summary.json and the HTML fall back to every structure; the table had no row."""
    empty = dict.fromkeys(FAILED_SCORES, math.nan)
    results = [CaseScores("a", {"liver": dict(empty), "spleen": dict(empty)})]
    table = format_table(summarize(results, 2.0))
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["liver", "spleen"]
    assert "not shown" not in table


def test_small_volumes_keep_two_significant_digits_in_the_report(tmp_path):
    """A lesion of 0.008 ml showed as "0.00 ± 0.00" at the 0.01 ml suited to a
    hippocampus; larger volumes keep two decimals."""
    def case(name, ref_ml, diff_ml):
        return CaseScores(name, {"nodule": {**scores(0.8, 1.0, ref_ml), "diff_ml": diff_ml},
                                 "liver": scores(0.9, 2.0, 1500.0)})

    results = [case("a", 0.008, 0.002), case("b", 0.012, -0.001)]
    write_reports(results, tmp_path, labels={0: "background", 1: "nodule", 2: "liver"},
                  tolerance_mm=2.0)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "0.0100 &plusmn; 0.0028" in page  # the nodule's reference volume
    assert "1500.00 &plusmn; 0.00" in page  # the liver's, as before


def test_box_plot_tick_labels_do_not_run_into_one_another():
    """A long structure name narrows the panels; the default tick count then printed the
    volume differences as one string ("0.00000.00250.0050..."), and Dice's "1.0" touched the
    next panel's "0.0"."""
    from medseg.report_figures import boxplots_figure

    def case(name, diff):
        values = {"dice": 0.9, "iou": 0.8, "hd95_mm": 1.0, "hd_mm": 1.0, "assd_mm": 0.5,
                  "nsd": 0.95, "ref_ml": 1.0, "pred_ml": 1.0, "diff_ml": diff}
        return CaseScores(name, {"a_very_long_structure_name_of_the_atlas_left": values,
                                 "b": dict(values)})

    figure = boxplots_figure([case("c1", 0.0), case("c2", 0.0123456)],
                             ["a_very_long_structure_name_of_the_atlas_left", "b"], 2.0)
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for ax in figure.axes
             for label in ax.get_xticklabels()
             if min(ax.get_xlim()) <= label.get_position()[0] <= max(ax.get_xlim())]
    boxes.sort(key=lambda box: box.x0)
    assert len(boxes) > 8
    for left, right in zip(boxes, boxes[1:], strict=False):
        assert left.x1 < right.x0, (left, right)


def volume_case(name, values):
    """A case of structures given as (reference ml, predicted ml, HD95)."""
    return CaseScores(name, {s: {**scores(0.8, hd95, ref), "pred_ml": pred, "diff_ml": pred - ref}
                             for s, (ref, pred, hd95) in values.items()})


def test_infinite_counts_do_not_hide_the_farthest_dots():
    """The "1 inf" count was written over the right edge of the HD95 panel, where the largest
    finite distance is drawn: a 177 mm HD95 (two structures' ids swapped) was hidden under
    the count of the case that missed the structure."""
    from medseg.report_figures import boxplots_figure

    results = [volume_case("a", {"spleen": (250.0, 250.0, 3.0)}),
               volume_case("b", {"spleen": (250.0, 100.0, 177.0)}),
               volume_case("c", {"spleen": (250.0, 0.0, math.inf)})]
    figure = boxplots_figure(results, ["spleen"], 2.0)
    renderer = figure.canvas.get_renderer()
    hd95 = figure.axes[2]
    counts = [t.get_window_extent(renderer).expanded(1.1, 1.5) for t in hd95.texts]
    assert [t.get_text() for t in hd95.texts] == ["1 inf"]
    dots = np.concatenate([line.get_transform().transform(line.get_xydata())
                           for line in hd95.lines if line.get_marker() == "."])
    assert len(dots) == 2
    for box in counts:
        assert not any(box.contains(x, y) for x, y in dots), (box, dots)
    assert max(hd95.get_xticks()) <= 200  # no tick in the band of the counts


def test_the_volume_panel_shows_percent_of_the_reference():
    """In ml, one liver missed by 1000 ml set the scale, and the other 40 structures of a
    TotalSegmentator CT (errors of a few ml) were drawn as one line at 0."""
    from medseg.report_figures import box_value, boxplots_figure

    results = [volume_case("a", {"liver": (1500.0, 500.0, 5.0), "nodule": (0.010, 0.015, 1.0)}),
               volume_case("b", {"liver": (1500.0, 1500.0, 0.0), "nodule": (0.0, 0.02, 9.0)})]
    assert box_value(results[0].scores["liver"], "diff_pct") == pytest.approx(-66.6667)
    assert box_value(results[0].scores["nodule"], "diff_pct") == pytest.approx(50.0)
    assert box_value(results[1].scores["nodule"], "diff_pct") == math.inf  # no reference
    figure = boxplots_figure(results, ["liver", "nodule"], 2.0)
    volume = figure.axes[3]
    assert "%" in volume.get_title()
    low, high = volume.get_xlim()
    assert -100 < low < -66 and 50 < high < 200
    assert [t.get_text() for t in volume.texts] == ["1 inf"]


def summary_cell(page, name, column):
    """The summary table's cell `column` (0: Dice, ... 7: volume difference) of a structure."""
    row = re.search(rf'<tr><td class="name">{name}</td>(.*?)</tr>', page).group(1)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)[column]


def test_rounding_noise_does_not_add_decimals_to_a_volume():
    """Five cases of one 0.027 ml structure: its sd came out as 3.9e-18 ml, which asked for
    five decimals, "0.02700 ± 0.00000"."""
    results = [CaseScores(name, {"lobe": scores(1.0, 0.0, 0.027)}) for name in "abcde"]
    summary = summarize(results, 2.0)
    assert 0 < summary["structures"]["lobe"]["ref_ml"]["sd"] < 1e-15  # the noise
    page = render_report(results, summary, None)
    assert "0.027 &plusmn; 0.000" in summary_cell(page, "lobe", 6)


def test_a_count_is_never_broken_from_its_number():
    """In a narrow column (laptop width) "n 175" and "25 inf" broke across two lines."""
    hit = scores(0.9, 2.0)
    miss = {**dict(FAILED_SCORES), "ref_ml": 1.0, "pred_ml": 0.0, "diff_ml": -1.0}
    results = [CaseScores("a", {"s": hit}), CaseScores("b", {"s": dict(hit)}),
               CaseScores("c", {"s": miss})]
    page = render_report(results, summarize(results, 2.0), None)
    detail = re.search(r'<span class="d">(.*?)</span></td>', summary_cell(page, "s", 3) + "</td>"
                       ).group(1)
    assert "median&nbsp;2.00" in detail and "IQR&nbsp;0.00" in detail
    assert "n&nbsp;2" in detail and "1&nbsp;inf" in detail
    assert not re.search(r"(median|IQR|n) [\d&]|\d inf", detail), detail


def test_a_long_case_name_does_not_run_into_the_montage_legend():
    """A BIDS-style case name (66 characters) wrote "(mean Dice 0.826)" under the legend's
    "— reference" in the montage's header."""
    from medseg.evaluate import LoadedPair
    from medseg.report_figures import HEADER_H, MONTAGE_DENSITY, montage_png

    label = np.zeros((30, 30, 20), np.uint8)
    label[10:20, 10:20, 5:15] = 1
    pair = LoadedPair(label, label.copy(), np.eye(4), (1.0, 1.0, 1.0), False)
    title = ("median: sub-001_ses-baseline_acq-highres_run-01_desc-totalsegmentator_dseg "
             "(mean Dice 0.826)")
    png = montage_png(pair, {0: "background", 1: "liver"}, {"liver": scores(0.826, 1.0)},
                      title)
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    d = MONTAGE_DENSITY
    header = picture[:HEADER_H * d]
    black = (header < 60).all(axis=-1)  # the title's glyphs; the legend is coloured or grey
    legend_x = picture.shape[1] - 420 * d
    assert black[:, :legend_x].any() and not black[:, legend_x - 6 * d:].any()


def page_width(chromium, html_file, tmp_path, width):
    """The page's scroll width in a `width`-pixel window (measured by a script added to a
    copy: the report itself holds none)."""
    probe = tmp_path / "probe.html"
    script = ("<script>addEventListener('load', () => document.body.setAttribute('data-w', "
              "document.documentElement.scrollWidth + '/' + innerWidth));</script>")
    probe.write_text(html_file.read_text(encoding="utf-8").replace("</body>", script + "</body>"),
                     encoding="utf-8")
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          f"--window-size={width},900", "--dump-dom", probe.as_uri()],
                         capture_output=True, timeout=180, check=False).stdout.decode("utf-8")
    return [int(v) for v in re.search(r'data-w="(\d+)/(\d+)"', dom).groups()]


def test_a_long_error_does_not_widen_the_page_and_unlisted_ids_are_said(tmp_path):
    """A failed case's message (a path and a shape, 200 characters) was kept on one line:
    the case table ran 800 px past a 1280 px window. A prediction holding an id the label
    map does not name (left unscored) read "ok"."""
    error = ("/data/project/predictions/nnunet_3d_fullres/fold_0/hippocampus_035.nii.gz: not "
             "on the same grid as the reference (shape (33, 47, 37) differs from (35, 47, 37)); "
             "`medseg evaluate --resample` resamples it by nearest neighbour")
    results = [CaseScores("a", {"s": scores(0.9, 1.0)}),
               CaseScores("b", {"s": scores(0.8, 1.0)}, unlisted=(7, 9)),
               CaseScores("c", {"s": dict(FAILED_SCORES)}, error)]
    write_reports(results, tmp_path / "out", tolerance_mm=2.0)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    row = re.search(r'<tr><td class="name">b</td>(.*?)</tr>', page).group(1)
    assert "label ids 7, 9 of the prediction not in the label map, not scored" in row
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not available to measure the page")
    scroll, window = page_width(chromium, tmp_path / "out" / "report.html", tmp_path, 1280)
    assert scroll <= window, (scroll, window)


def test_structure_names_stay_in_view_when_the_summary_scrolls(tmp_path):
    """At 1024 px the summary table (nine columns) scrolls sideways; the volume columns
    came into view without the structure names, so a row of 41 could not be read."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not available to measure the page")
    names = [f"structure_with_a_long_name_{k}" for k in range(3)]
    results = [CaseScores(c, {n: scores(0.9, 1.0, 250.0) for n in names}) for c in "ab"]
    write_reports(results, tmp_path / "out", tolerance_mm=2.0)
    probe = tmp_path / "probe.html"
    script = ("<script>addEventListener('load', () => { const box = "
              "document.querySelector('.scroll'); const cell = box.querySelector('td.name'); "
              "const before = cell.getBoundingClientRect().left; box.scrollLeft = 300; "
              "document.body.setAttribute('data-x', before + '/' + "
              "cell.getBoundingClientRect().left + '/' + box.scrollLeft); });</script>")
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    probe.write_text(html.replace("</body>", script + "</body>"), encoding="utf-8")
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--window-size=900,900", "--dump-dom", probe.as_uri()],
                         capture_output=True, timeout=180, check=False).stdout.decode("utf-8")
    before, after, scrolled = (float(v) for v in
                               re.search(r'data-x="([\d.]+)/([\d.-]+)/([\d.]+)"', dom).groups())
    assert scrolled > 100  # the table is wider than the window: it did scroll
    assert after == pytest.approx(before, abs=1)


def test_a_stray_island_off_the_drawn_slices_shows_in_the_montage():
    """A far island of the prediction (HD 19.8 mm, Dice 0.991 on a hippocampus) lay in none
    of the three slices through the structure's largest cross-sections: the overlay looked
    perfect. Islands are now drawn filled, projected through each view."""
    from medseg.evaluate import LoadedPair
    from medseg.report_figures import (
        GAP,
        HEADER_H,
        ISLAND_RGB,
        MONTAGE_DENSITY,
        TILE,
        TITLE_H,
        montage_png,
    )

    reference = np.zeros((40, 40, 40), np.uint8)
    reference[24:34, 24:34, 24:34] = 1  # high R, A and S: the upper left of every view
    prediction = reference.copy()
    prediction[2:5, 2:5, 2:5] = 1  # low R, A and S: the lower right, in no drawn slice
    pair = LoadedPair(prediction, reference, np.eye(4), (1.0, 1.0, 1.0), False)
    png = montage_png(pair, {0: "background", 1: "a"}, {"a": scores(0.97, 1.0)}, "island")
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    d = MONTAGE_DENSITY
    for view in range(3):
        top, left = (HEADER_H + TITLE_H) * d, view * (TILE + GAP) * d
        tile = picture[top:top + TILE * d:d, left:left + TILE * d:d]
        rows, cols = np.nonzero((tile == ISLAND_RGB).all(axis=-1))
        assert rows.size > 20, view
        assert rows.min() > TILE / 2 and cols.min() > TILE / 2, view
    # a prediction that touches its reference everywhere has no island fill
    pair = LoadedPair(reference.copy(), reference, np.eye(4), (1.0, 1.0, 1.0), False)
    png = montage_png(pair, {0: "background", 1: "a"}, {"a": scores(1.0, 0.0)}, "none")
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert not (picture == ISLAND_RGB).all(axis=-1).any()


def test_the_page_names_the_medseg_version_and_time_zone():
    """The page said "written 2026-11-24T05:32:05 by medseg evaluate": no version to tell
    which scoring conventions made it, and a time without its zone."""
    from medseg import __version__

    results = [CaseScores("a", {"s": scores(0.9, 1.0)})]
    page = render_report(results, summarize(results, 2.0), None)
    written = re.search(r"written (\S+) by medseg (\S+) evaluate", page)
    assert written and written.group(2) == __version__
    assert re.search(r"T\d\d:\d\d:\d\d[+-]\d\d:\d\d$", written.group(1))


def write_cjk_font(path):
    """A TrueType font of one glyph, 中 as a solid block (DejaVu draws it as an empty box)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def glyph(solid):
        pen = TTGlyphPen(None)
        if solid:
            for point in ((100, 0), (100, 700), (900, 700), (900, 0)):
                (pen.lineTo if point != (100, 0) else pen.moveTo)(point)
            pen.closePath()
        return pen.glyph()

    font = FontBuilder(1000, isTTF=True)
    font.setupGlyphOrder([".notdef", "zhong"])
    font.setupCharacterMap({0x4E2D: "zhong"})
    font.setupGlyf({".notdef": glyph(False), "zhong": glyph(True)})
    font.setupHorizontalMetrics({".notdef": (500, 0), "zhong": (1000, 100)})
    font.setupHorizontalHeader(ascent=800, descent=-200)
    font.setupNameTable({"familyName": "medseg test CJK", "styleName": "Regular"})
    font.setupOS2()
    font.setupPost()
    font.save(str(path))
    return path


def test_cjk_names_fall_back_to_an_installed_cjk_font(tmp_path, monkeypatch):
    """Structure and case names in Chinese were drawn as empty boxes (matplotlib's DejaVu
    has no CJK glyphs): a font with them that matplotlib finds is now their fallback;
    without one they stay boxes, and the report is drawn all the same."""
    from matplotlib import font_manager

    import medseg.report_figures as figures

    label = np.zeros((30, 30, 20), np.uint8)
    label[10:20, 10:20, 5:15] = 1
    pair = figures.LoadedPair(label, label.copy(), np.eye(4), (1.0, 1.0, 1.0), False)

    def dark_pixels():
        png = figures.montage_png(pair, {0: "background", 1: "中中中中"},
                                  {"中中中中": scores(1.0, 0.0)}, "case 中中中中")
        return int((np.asarray(Image.open(io.BytesIO(png)).convert("L")) < 100).sum())

    monkeypatch.setattr(font_manager.fontManager, "ttflist",
                        list(font_manager.fontManager.ttflist))
    figures.cjk_font.cache_clear()
    try:
        with monkeypatch.context() as patched:
            patched.setattr(figures, "cjk_font", lambda: None)
            boxes = dark_pixels()
        font_manager.fontManager.addfont(str(write_cjk_font(tmp_path / "cjk.ttf")))
        assert figures.cjk_font() is not None
        assert dark_pixels() > boxes + 1000  # solid blocks, not the boxes' outlines
        assert figures.boxplots_png([], ["中"], None).startswith(b"\x89PNG")
    finally:
        figures.cjk_font.cache_clear()
