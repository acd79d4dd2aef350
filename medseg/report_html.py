"""report.html: one self-contained page (inline CSS, images as base64 PNG, no URL).

A summary table per structure, a table per case, box plots per structure, and overlay
montages of the best, median and worst cases.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import math
import struct
import sys
from html import escape

import numpy as np

from medseg import __version__
from medseg.errors import MedsegError
from medseg.evaluate import CaseScores, LoadedPair, load_pair
from medseg.io import Geometry
from medseg.metrics import is_present, leave_out_ignored, present_or_all
from medseg.report_figures import (
    BOX_DENSITY,
    ISLAND_HEX,
    MONTAGE_DENSITY,
    PREDICTION_HEX,
    REFERENCE_HEX,
    boxplots_png,
    montage_png,
)
from medseg.report_scans import Scans, Underlay, channel_text, load_underlay, window_text

TABLE_METRICS = (("dice", "Dice", 3), ("iou", "IoU", 3), ("nsd", "NSD", 3),
                 ("hd95_mm", "HD95 (mm)", 2), ("hd_mm", "HD (mm)", 2),
                 ("assd_mm", "ASSD (mm)", 2),
                 # 0.01 ml: a hippocampus is 1.5-2 ml, its volume errors a few hundredths
                 ("ref_ml", "reference volume (ml)", 2),
                 ("diff_ml", "volume difference (ml)", 2))
TINTED = ("dice", "iou", "nsd")  # cells tinted from red (0) to green (1) by their mean

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #1c2833; max-width: 1500px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px;
     border-bottom: 1px solid #d5d8dc; padding-bottom: 4px; } h3 { font-size: 15px; }
.meta { color: #566573; font-size: 13px; margin: 2px 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d5d8dc; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f2f3f4; } td.name, th.name { text-align: left; white-space: nowrap; }
td .m { display: block; font-weight: 600; white-space: nowrap; }
td .d { display: block; color: #626567; font-size: 11px; }
table.summary td { width: 118px; } table.summary th { width: 118px; }
table.summary td.name, table.summary th.name { width: auto; }
.scroll { overflow-x: auto; }
.scroll td.name, .scroll th.name { position: sticky; left: 0; z-index: 1; }
.scroll td.name { background: #ffffff; } .scroll tr.mean td.name { background: #f8f9f9; }
td.status, th.status { text-align: left; min-width: 14em; max-width: 44em;
                       overflow-wrap: anywhere; }
.inf { color: #b03a2e; font-weight: 600; }
tr.mean td { background: #f8f9f9; font-weight: 600; }
.fail { color: #b03a2e; } .note { color: #7d6608; }
.swatch { display: inline-block; width: 28px; height: 4px; vertical-align: middle;
          margin: 0 6px 0 14px; }
img { max-width: 100%; height: auto; border: 1px solid #eaeded; }
p.conv { font-size: 13px; color: #424949; max-width: 1100px; }
"""


def render_report(results: list[CaseScores], summary: dict,
                  labels: dict[int, str] | None, scans: Scans | None = None) -> str:
    """The whole page as a string; with `scans`, the overlays are drawn on the cases' scans."""
    shown = shown_structures(summary)
    parts = [_header(results, summary), _summary_table(summary, shown),
             _crossval_tables(summary, shown), _conventions(summary),
             _case_table(results, shown, summary.get("ignore_label")),
             _boxplots(results, shown, summary),
             _montages(results, labels, shown, summary.get("ignore_label"), scans)]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>medseg evaluation report</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def shown_structures(summary: dict) -> list[str]:
    """Structures present in some case (all of them when none is)."""
    return present_or_all(list(summary["structures"]), summary.get("absent_structures", []))


def rank_cases(results: list[CaseScores], shown: list[str]) -> list[tuple[str, CaseScores]]:
    """(role, case) for the best, median and worst scored cases by mean Dice over the
    structures present in each; one case may take several roles."""
    # a case with no structure in its reference or prediction has nothing to rank it by
    scored = sorted((r for r in results if not r.error
                     and not math.isnan(case_mean_dice(r, shown))),
                    key=lambda r: case_mean_dice(r, shown))
    if not scored:
        return []
    picks = {"best": scored[-1], "median": scored[(len(scored) - 1) // 2], "worst": scored[0]}
    roles: dict[str, list[str]] = {}
    for role, result in picks.items():
        roles.setdefault(result.case, []).append(role)
    by_name = {r.case: r for r in scored}
    return [(", ".join(r), by_name[case]) for case, r in roles.items()]


def case_mean_dice(result: CaseScores, shown: list[str]) -> float:
    """Mean Dice over the structures in the case's reference or prediction (NaN if none)."""
    values = [result.scores[n]["dice"] for n in shown if is_present(result.scores[n])]
    return float(np.mean(values)) if values else math.nan


def _header(results: list[CaseScores], summary: dict) -> str:
    refs = {str(r.reference.parent) for r in results if r.reference is not None}
    preds = {str(r.prediction.parent) for r in results if r.prediction is not None}
    failed = summary["failed_cases"]
    tolerance = summary.get("tolerance_mm")
    lines = [
        "<h1>Segmentation evaluation</h1>",
        f'<p class="meta">{_count(summary["n_cases"], "case")}, {len(failed)} failed; '
        f'{_count(len(shown_structures(summary)), "structure")}; mean Dice over structures '
        f'<b>{_fmt(summary["mean_dice"], 3)}</b>, mean surface Dice '
        f'<b>{_fmt(summary.get("mean_nsd", math.nan), 3)}</b>'
        + (f" at {tolerance:g} mm" if tolerance is not None else "") + "</p>",
        f'<p class="meta">predictions: {escape(", ".join(sorted(preds)) or "none")}; '
        f'references: {escape(", ".join(sorted(refs)) or "none")}</p>',
        # the version and the time zone: a page shown months later says what made it
        f'<p class="meta">written '
        f'{datetime.datetime.now().astimezone().isoformat(timespec="seconds")} '
        f"by medseg {escape(__version__)} "
        f"{'crossval' if summary.get('crossval') else 'evaluate'}</p>",
    ]
    if failed:
        lines.append(f'<p class="fail">Failed cases (each structure of their references '
                     f'missed: Dice 0, distances inf): '
                     f'{escape(", ".join(failed))}</p>')
    return "\n".join(lines)


def _summary_table(summary: dict, shown: list[str]) -> str:
    head = "".join(f"<th>{escape(title)}</th>" for _, title, _ in TABLE_METRICS)
    rows = []
    for name in shown:
        stats = summary["structures"][name]
        cells = "".join(_stat_cell(stats[m], _volume_digits(stats[m], d) if m.endswith("_ml")
                                   else d, m in TINTED) for m, _, d in TABLE_METRICS)
        rows.append(f'<tr><td class="name">{escape(name)}</td>{cells}</tr>')
    means = {"dice": summary["mean_dice"], "nsd": summary.get("mean_nsd", math.nan)}
    mean_cells = "".join(f"<td>{_fmt(means[m], d) if m in means else ''}</td>"
                         for m, _, d in TABLE_METRICS)
    rows.append(f'<tr class="mean"><td class="name">mean over structures</td>{mean_cells}</tr>')
    absent = summary.get("absent_structures", [])
    note = (f'<p class="meta">Not shown, absent from every reference and prediction: '
            f"{escape(', '.join(absent))}.</p>"
            if absent and len(absent) < len(summary["structures"]) else "")
    return ('<h2 id="summary">Summary per structure</h2>\n'
            '<p class="meta">Each cell: mean &plusmn; sd over the cases; below it the median, '
            "the interquartile range (IQR) and n, the number of finite values; "
            '<span class="inf">inf</span> counts cases where the structure is missing from one '
            "mask, or failed (the median counts them too). Volume difference: predicted "
            "&minus; reference.</p>\n"
            f'<div class="scroll"><table class="summary"><thead><tr><th class="name">structure'
            f"</th>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows)
            + f"\n</tbody></table></div>\n{note}")


def _crossval_tables(summary: dict, shown: list[str]) -> str:
    """`medseg crossval`'s additions: the mean Dice of each fold, and the largest-component
    test, for the `shown` structures (as the summary table and the console: a 117-label map
    of which a dataset holds 41 made 76 empty columns); nothing for `evaluate`."""
    crossval = summary.get("crossval")
    if not crossval:
        return ""
    folds = crossval["folds"]
    names = [n for n in next(iter(folds.values()))["dice"] if n in shown] if folds else []
    head = "".join(f"<th>{escape(name)}</th>" for name in names)
    rows = "\n".join(
        f'<tr><td class="name">fold {escape(fold)}</td><td>{entry["cases"]}</td>'
        f'<td>{len(entry["failed_cases"])}</td><td>{_fmt(entry["mean_dice"], 3)}</td>'
        + "".join(f"<td>{_fmt(entry['dice'][name], 3)}</td>" for name in names) + "</tr>"
        for fold, entry in folds.items())
    test = crossval["postprocessing"]["structures"]
    tested = "\n".join(
        f'<tr><td class="name">{escape(name)}</td>'
        + "".join(f"<td>{_fmt(value, digits)}</td>" for value in pair)
        + f'<td>{"yes" if entry["apply"] else "no"}</td></tr>'
        for name, entry in test.items() if name in shown
        for pair in [(entry["dice"], entry["dice_largest_component"])]
        for digits in [change_digits(*pair)])
    return ('<h2 id="folds">Cross-validation: each fold\'s held-out cases</h2>\n'
            '<p class="meta">Each case scored once, by the network of the fold that held it out '
            "(mean Dice per structure over the fold's cases where it is present).</p>\n"
            '<div class="scroll"><table class="summary"><thead><tr><th class="name">fold</th>'
            f"<th>cases</th><th>failed</th><th>mean Dice</th>{head}</tr></thead>\n<tbody>\n"
            f"{rows}\n</tbody></table></div>\n"
            '<h2 id="postprocessing">Keeping only the largest component</h2>\n'
            '<p class="meta">Mean Dice over the held-out cases before and after keeping only '
            "each structure's largest 26-connected component; chosen where it raises the "
            "mean (nnU-Net's rule), as postprocessing.json lists.</p>\n"
            '<table class="summary"><thead><tr><th class="name">structure</th><th>raw</th>'
            "<th>largest component</th><th>chosen</th></tr></thead>\n<tbody>\n"
            f"{tested}\n</tbody></table>")


def change_digits(before: float, after: float, digits: int = 4) -> int:
    """Decimals (`digits` at least, 12 at most) that show `before` and `after` apart where
    they differ: a gain of 0.00002 read "0.0570 -> 0.0570 (raises it)" at 4."""
    while digits < 12 and before != after and f"{before:.{digits}f}" == f"{after:.{digits}f}":
        digits += 1
    return digits


def _volume_digits(stats: dict, digits: int) -> int:
    """Decimals that give the smallest volume statistic two significant digits (up to 5):
    a lesion of 0.008 ml read "0.00 &plusmn; 0.00" at the hippocampus's 0.01 ml."""
    values = [abs(stats[k]) for k in ("mean", "sd", "median", "iqr")
              if math.isfinite(stats[k])]
    # rounding noise is no value: the sd of five equal 0.027 ml is 3.9e-18, not a volume
    values = [v for v in values if v > 1e-9 * max(values, default=0.0)]
    if not values:
        return digits
    return max(digits, min(5, 1 - math.floor(math.log10(min(values)))))


def _stat_cell(stats: dict, digits: int, tinted: bool = False) -> str:
    # each "word value" pair held together (&nbsp;): a narrow column broke "n 175" and
    # "25 inf" across lines, leaving the number apart from what it counts
    if stats["n"] == 0:  # every value infinite (or none): the median says which
        main, detail = "&ndash;", ("n&nbsp;0" if math.isnan(stats["median"]) else
                                   f"median&nbsp;{_fmt(stats['median'], digits)} &middot; "
                                   "n&nbsp;0")
    else:
        main = f"{_fmt(stats['mean'], digits)} &plusmn; {_fmt(stats['sd'], digits)}"
        detail = (f"median&nbsp;{_fmt(stats['median'], digits)}<br>IQR&nbsp;"
                  f"{_fmt(stats['iqr'], digits)} &middot; n&nbsp;{stats['n']}")
    if stats.get("n_inf"):
        detail += f' &middot; <span class="inf">{stats["n_inf"]}&nbsp;inf</span>'
    style = _tint(stats["mean"]) if tinted else ""
    return f'<td{style}><span class="m">{main}</span><span class="d">{detail}</span></td>'


def _tint(value: float) -> str:
    """A cell's background from red (0) to green (1) for a score in [0, 1]; none for NaN."""
    if not math.isfinite(value):
        return ""
    hue = int(round(120 * min(max(value, 0.0), 1.0)))
    return f' style="background: hsl({hue}, 65%, 93%)"'


def _conventions(summary: dict) -> str:
    tolerance = summary.get("tolerance_mm")
    tol = f"{tolerance:g} mm" if tolerance is not None else "the tolerance"
    return (
        '<p class="conv"><b>Definitions.</b> Distances are in mm on the reference grid with its '
        "voxel spacing. HD95: 95th percentile of the surface distances, the larger of the two "
        "directions. HD: the largest surface distance either way (a far stray island shows "
        "here, not in HD95). ASSD: mean of the surface distances of both directions together. "
        "NSD "
        f"(surface Dice): share of both surfaces within {tol} of the other surface. Volumes "
        "in ml; difference = predicted &minus; reference. <b>Empty structures.</b> Absent from "
        "both masks: every score undefined, left out of the statistics and of n (as nnU-Net). "
        "Absent from one mask: Dice, IoU and NSD 0, HD95, HD and ASSD infinite (counted as "
        "<span class=\"inf\">inf</span>, left out of mean, sd and IQR; the median counts "
        "them, so half the cases or more missed make it infinite). A case with "
        "no usable prediction misses each structure of its reference (Dice, IoU and NSD 0, "
        "infinite distances); a structure its reference lacks is undefined there, as one "
        f"absent from both masks.{_ignored_voxels(summary)}</p>")


def _ignored_voxels(summary: dict) -> str:
    ignore = summary.get("ignore_label")
    if ignore is None:
        return ""
    return (f" <b>Unannotated voxels.</b> Where a reference holds id {ignore} ('ignore'), both "
            "masks count as background: a prediction there is neither right nor wrong. "
            "Surfaces cut by such voxels meet in both masks, so surface scores measure the "
            "annotated part only and are not comparable with those of dense references.")


def _case_table(results: list[CaseScores], shown: list[str], ignore_label: int | None
                ) -> str:
    rows = []
    for result in results:
        # a failed case as the summary scores it: Dice and NSD 0 for each structure of its
        # reference, the others left out
        present = _scored_structures(result, shown)
        worst = min(present, key=lambda n: result.scores[n]["dice"], default=None)
        nsd = [result.scores[n]["nsd"] for n in present]
        if worst is None:
            worst_text = "&ndash;"
        elif result.error:
            worst_text = "every structure of its reference (0)"
        else:
            worst_text = f"{escape(worst)} ({result.scores[worst]['dice']:.3f})"
        status = _status(result, ignore_label)
        dice = [result.scores[n]["dice"] for n in present]
        # tinted as the summary is: in 200 rows the poor cases stand out
        means = [float(np.mean(v)) if v else math.nan for v in (dice, nsd)]
        cells = ("".join(f"<td{_tint(m)}>{_fmt(m, 3)}</td>" for m in means)
                 + f'<td class="name">{worst_text}</td>')
        rows.append(f'<tr><td class="name">{escape(result.case)}</td>{cells}'
                    f'<td class="status">{status}</td></tr>')
    return ('<h2 id="cases">Cases</h2>\n<p class="meta">Means over the structures present in '
            "the case's reference or prediction.</p>\n"
            '<table class="cases"><thead><tr><th class="name">case</th><th>mean Dice</th>'
            '<th>mean NSD</th><th class="name">lowest Dice</th><th class="status">status</th>'
            "</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>")


def _status(result: CaseScores, ignore_label: int | None = None) -> str:
    """The case's status cell: its error, or ok, with what was done to or left out of it."""
    if result.error:
        return f'<span class="fail">{escape(result.error)}</span>'
    notes = []
    if result.resampled:
        notes.append("prediction resampled onto the reference grid")
    notes.extend(escape(note) for note in result.notes)
    if ignore_label in result.unlisted:
        notes.append(f"label id {ignore_label} of the prediction is the label map's 'ignore' "
                     "(unannotated voxels, no structure), not scored")
    unlisted = [v for v in result.unlisted if v != ignore_label]
    if unlisted:  # the console says so; the page said "ok"
        ids = ", ".join(str(v) for v in unlisted[:10]) + (
            f" and {len(unlisted) - 10} more" if len(unlisted) > 10 else "")
        notes.append(f"label id{'s' if len(unlisted) > 1 else ''} {ids} of the "
                     "prediction not in the label map, not scored")
    return "; ".join(f'<span class="note">{n}</span>' for n in notes) or "ok"


def _scored_structures(result: CaseScores, shown: list[str]) -> list[str]:
    """The structures a case is scored on: those in its reference or prediction; for a
    failed case, those scored as missed (Dice 0: in its reference, or every one when its
    reference could not be read)."""
    if result.error:
        return [n for n in shown if not math.isnan(result.scores[n]["dice"])]
    return [n for n in shown if is_present(result.scores[n])]


def _boxplots(results: list[CaseScores], shown: list[str], summary: dict) -> str:
    scored = [r for r in results if not r.error]
    if not scored:
        return '<h2 id="boxplots">Box plots</h2>\n<p class="fail">No case could be scored.</p>'
    png = boxplots_png(scored, shown, summary.get("tolerance_mm"))
    return ('<h2 id="boxplots">Box plots per structure</h2>\n<p class="meta">Scored cases only '
            "(each dot a case; infinite values are left out and counted in the shaded band at "
            "the right, off the scale). Volume difference: predicted &minus; reference in % of "
            "the reference volume (infinite where only the prediction holds the structure), "
            "so that small and large structures share one axis; the tables give it in ml. "
            "Boxes: quartiles and median (red).</p>\n"
            + _img(png, "box plots of Dice, surface Dice, HD95 and volume difference (%) per "
                        "structure", density=BOX_DENSITY))


def _montages(results: list[CaseScores], labels: dict[int, str] | None,
              shown: list[str], ignore_label: int | None = None,
              scans: Scans | None = None) -> str:
    head = _montages_head(scans)
    if labels is None:
        return (head + '\n<p class="note">No label map was given to the report writer, so no '
                "overlays were drawn.</p>")
    parts = [head]
    for role, result in rank_cases(results, shown):
        title = f"{role}: {result.case} (mean Dice {case_mean_dice(result, shown):.3f})"
        parts.append(f"<h3>{escape(title)}</h3>")
        try:
            pair = load_pair(result.prediction, result.reference, labels, result.resampled,
                             ignore_label)
        except Exception as exc:  # the files changed since scoring: say so, keep the report
            parts.append(f'<p class="fail">cannot draw this case: {escape(str(exc))}</p>')
            continue
        # drawn as scored: unannotated voxels are background in both
        prediction, reference = leave_out_ignored(pair.prediction, pair.reference,
                                                  ignore_label)
        pair = dataclasses.replace(pair, prediction=prediction, reference=reference)
        underlay, note = _underlay(scans, result.case, pair)
        parts.extend([note] if note else [])
        parts.append(_img(montage_png(pair, labels, result.scores, title, underlay),
                          f"overlay montage of case {result.case}", density=MONTAGE_DENSITY))
        del underlay  # freed before the next case's files are read: one large CT at a time
    if len(parts) == 1:
        parts.append('<p class="fail">No case could be scored, so there is nothing to draw.'
                     "</p>")
    return "\n".join(parts)


def _montages_head(scans: Scans | None) -> str:
    if scans is None:
        background = ("grey: labelled reference structures; the structure shown in lighter "
                      "grey")
    else:
        background = (f"drawn on the case's scan: a CT in its {window_text(True)}, any other "
                      f"scan in a {window_text(False)}; of a scan of several channels in one "
                      "file, the first; a case without its scan (a note says why) on flat "
                      "greys")
    return ('<h2 id="montages">Overlays: best, median and worst scored cases</h2>\n'
            f'<p class="meta"><span class="swatch" style="background:{REFERENCE_HEX}"></span>'
            f'reference contour<span class="swatch" style="background:{PREDICTION_HEX}">'
            "</span>prediction contour &nbsp; (the reference's drawn just inside it, the "
            "prediction's just outside it, so that both show: where they agree, the two "
            f"rings touch; {background}; "
            '<span class="swatch" style="height: 10px; '
            f'background:{ISLAND_HEX}"></span>filled: parts of the prediction that do not '
            "touch the reference structure, projected through the whole view, so that a "
            "stray island off the slice shows). Each structure: axial, coronal and sagittal "
            "slices through its largest cross-sections, zoomed on it; axial and coronal in "
            "radiological view (patient's right on the left), sagittal with anterior on the "
            "left. Cases ranked by mean Dice; failed cases (named at the top of the report) have "
            "no overlay.</p>")


def _underlay(scans: Scans | None, case: str, pair: LoadedPair
              ) -> tuple[Underlay | None, str | None]:
    """The case's scan for its montage and the page's line about it; without one (none
    given, or it cannot be drawn: the note says why) the montage keeps its flat greys."""
    if scans is None:
        return None, None
    try:
        underlay = load_underlay(scans, case, Geometry(pair.reference.shape, pair.affine))
    except MedsegError as exc:
        print(f"medseg: note: report.html: case {case} drawn without its scan: {exc}",
              file=sys.stderr)
        return None, f'<p class="note">Drawn without its scan: {escape(str(exc))}</p>'
    kind = "a CT in Hounsfield units: " if underlay.hounsfield else ""
    channel = f"{shown}; " if (shown := channel_text(underlay)) else ""
    return underlay, (f'<p class="meta">On the scan {escape(str(underlay.path))} '
                      f"({channel}{kind}{window_text(underlay.hounsfield)}).</p>")


def _img(png: bytes, alt: str, density: int = 1) -> str:
    """An inline picture; one of `density` pixels per displayed pixel is given its displayed
    size (the CSS keeps it within the page)."""
    data = base64.b64encode(png).decode("ascii")
    size = ""
    if density > 1:
        width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR chunk
        size = f' width="{round(width / density)}" height="{round(height / density)}"'
    return f'<p><img alt="{escape(alt)}"{size} src="data:image/png;base64,{data}"></p>'


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(value: float, digits: int) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "&minus;inf"
    if math.isnan(value):
        return "&ndash;"
    return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.0"
