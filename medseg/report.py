"""Per-case CSV, summary.json, report.html and a console table from scored cases.

`run_evaluation` is the whole `medseg evaluate` job: pair, score, write, print.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from medseg import __version__
from medseg.errors import MedsegError
from medseg.evaluate import (
    CaseScores,
    case_name,
    evaluate_pairs,
    infer_labels,
    pair_cases,
    unpaired_predictions,
)
from medseg.fileio import atomic_write_texts, json_safe, output_folder
from medseg.metrics import METRICS, is_present, present_or_all
from medseg.report_scans import Scans

# metrics whose mean over structures is given in the summary and in the console table
HEADLINE = ("dice", "nsd")


def run_evaluation(pred_dir: Path, ref_dir: Path, labels_path: Path | None,
                   out_dir: Path | None, tolerance_mm: float = 2.0, jobs: int = 1,
                   resample: bool = False, label_names: dict[int, str] | None = None,
                   only_cases: set[str] | None = None, ignore_label: int | None = None,
                   scans: Scans | None = None) -> dict:
    """Score every reference against the prediction of the same name, print a table and,
    with `out_dir`, write scores.csv, summary.json and report.html. Returns the summary
    (its `failed_cases` is non-empty when some case could not be scored). Label names come
    from `labels_path`, else `label_names`, else the values found in the references.
    `only_cases` scores those cases alone (predict --reference: its batch). Reference voxels
    of the 'ignore' label (`labels_path`'s, else `ignore_label`) are left out of the scores.
    `scans` are drawn under the report's overlays."""
    from medseg.datasets import label_names_from_json, split_ignore_label

    _refuse_bad_options(jobs, tolerance_mm, out_dir)
    if scans is not None and out_dir is None:
        print("medseg: note: the scans are drawn in report.html, which is written with --out "
              "only", file=sys.stderr)
    pairs = pair_cases(pred_dir, ref_dir)
    if only_cases is not None:  # named as the inputs are spelled; the pairs in one spelling
        only_cases = {case_name(case) for case in only_cases}
        pairs = _pairs_of(pairs, only_cases, ref_dir)
    if labels_path is not None:
        labels, ignore_label = split_ignore_label(label_names_from_json(labels_path))
    else:
        labels = dict(label_names) if label_names else infer_labels(pairs)
    if not any(k > 0 for k in labels):
        why = (f"{labels_path} names no structure" if labels_path is not None else
               f"the references in {ref_dir} and their predictions hold only background")
        print(f"medseg: note: nothing to score: {why}", file=sys.stderr)
    # made before the scoring, not after it; removed again if nothing is written in it
    with output_folder(out_dir) if out_dir is not None else contextlib.nullcontext():
        results = evaluate_pairs(pairs, labels, tolerance_mm=tolerance_mm, jobs=jobs,
                                 resample=resample, ignore_label=ignore_label)
        summary = summarize(results, tolerance_mm)
        summary["labels"] = {str(k): name for k, name in sorted(labels.items())}
        if ignore_label is not None:  # for the report's overlays, and for the record
            summary["ignore_label"] = ignore_label
        print(format_table(summary))  # first: the scores are shown even if writing them fails
        _print_notes(results, summary, pred_dir, ref_dir, pairs, only_cases)
        _note_unlisted(results, labels_path, ignore_label)
        if labels_path is None and not label_names:
            _note_never_predicted(results)
        if out_dir is not None:
            write_reports(results, out_dir, labels=labels, tolerance_mm=tolerance_mm,
                          summary=summary, scans=scans)
            print(f"wrote {out_dir / 'scores.csv'}, {out_dir / 'summary.json'} and "
                  f"{out_dir / 'report.html'}")
    return summary


def _refuse_bad_options(jobs: int, tolerance_mm: float, out_dir: Path | None) -> None:
    if jobs < 1:
        raise MedsegError(f"--jobs must be at least 1, got {jobs}")
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise MedsegError(f"--tolerance-mm must be a finite number >= 0, got {tolerance_mm}")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise MedsegError("output folder path is a file", out_dir)


def _print_notes(results: list[CaseScores], summary: dict, pred_dir: Path, ref_dir: Path,
                 pairs: list, only_cases: set[str] | None) -> None:
    """Below the table: why each failed case failed, doubtful headers, predictions left
    unscored, and the cases resampled onto their reference's grid."""
    for result in results:
        if result.error:
            print(f"  {result.case}: {result.error}", file=sys.stderr)
        for note in result.notes:
            print(f"medseg: note: {result.case}: {note}", file=sys.stderr)
    unscored = [case for case in unpaired_predictions(pred_dir, pairs)
                if only_cases is None or case in only_cases]
    if unscored:
        more = f" and {len(unscored) - 5} more" if len(unscored) > 5 else ""
        print(f"medseg: note: {len(unscored)} prediction(s) without a reference in {ref_dir} "
              f"were not scored: {', '.join(unscored[:5])}{more}", file=sys.stderr)
    if summary["resampled_cases"]:
        print(f"resampled onto the reference grid (nearest neighbour): "
              f"{', '.join(summary['resampled_cases'])}")


def _note_unlisted(results: list[CaseScores], labels_path: Path | None,
                   ignore_label: int | None) -> None:
    """Prediction ids the label map does not name: left unscored (nnU-Net's rule), but said,
    since a map of another numbering would score every structure as missed. The map's
    'ignore' id is said apart: the map names it, but as no structure."""
    source = f"the label map {labels_path}" if labels_path is not None else "the label map"
    holding = [r for r in results if ignore_label in r.unlisted]
    if holding:
        print(f"medseg: note: label id {ignore_label}, which {source} names 'ignore' "
              f"(unannotated reference voxels, no structure), is in {len(holding)} "
              f"prediction(s) and was not scored: {_some_cases(holding)}", file=sys.stderr)
    holding = [r for r in results if set(r.unlisted) - {ignore_label}]
    if holding:
        ids = sorted({v for r in holding for v in r.unlisted} - {ignore_label})
        print(f"medseg: note: label ids {ids} of {len(holding)} prediction(s) are not in "
              f"{source} and were not scored: {_some_cases(holding)}", file=sys.stderr)


def _some_cases(results: list[CaseScores]) -> str:
    cases = [r.case for r in results]
    return ", ".join(cases[:5]) + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")


def _note_never_predicted(results: list[CaseScores]) -> None:
    """Ids found in the references (labels read from the files, no map given) that no
    prediction holds: often an unannotated id (nnU-Net's 'ignore'), scored as a structure
    every case misses, which halves the mean Dice."""
    scored = [r for r in results if not r.error]
    never = [name for name in (scored[0].scores if scored else {})
             if any(r.scores[name]["ref_ml"] > 0 for r in scored)
             and all(r.scores[name]["pred_ml"] == 0 for r in scored)]
    if never:
        print(f"medseg: note: {', '.join(map(shown_name, never))} in the references but in no "
              f"prediction: if "
              f"such an id marks unannotated voxels, give --labels a map that names it "
              f"'ignore' (nnU-Net's) to leave them out", file=sys.stderr)


def _pairs_of(pairs: list, cases: set[str], ref_dir: Path) -> list:
    """The pairs of `cases`; references of other cases are not scored (a note says so)."""
    kept = [pair for pair in pairs if pair[0] in cases]
    if not kept:
        raise MedsegError(f"no reference for any of the {len(cases)} case(s) predicted "
                          f"(references are paired by file name)", ref_dir)
    others = len(pairs) - len(kept)
    if others:
        print(f"medseg: note: {others} reference(s) in {ref_dir} of cases not in this batch "
              f"were not scored", file=sys.stderr)
    return kept


def summarize(results: list[CaseScores], tolerance_mm: float | None = None) -> dict:
    """Per structure and metric: mean, sd, median, IQR and n over the finite values, and
    n_inf, the number of infinite distances (a structure missing from one mask, or a
    failed case). `unscored_label_ids`: per case, its prediction's ids that the label map
    does not name; `files`: per case, the prediction and reference scored. `mean_dice` and
    `mean_nsd` average the structures present in some case."""
    structures = list(results[0].scores) if results else []
    summary: dict = {"medseg_version": __version__,
                     "n_cases": len(results),
                     "failed_cases": [r.case for r in results if r.error],
                     "resampled_cases": [r.case for r in results if r.resampled],
                     "tolerance_mm": tolerance_mm,
                     "unscored_label_ids": {r.case: list(r.unlisted)
                                            for r in results if r.unlisted},
                     "files": {r.case: {"prediction": _absolute(r.prediction),
                                        "reference": _absolute(r.reference)}
                               for r in results},
                     "structures": {}}
    for name in structures:
        summary["structures"][name] = {
            metric: _stats([r.scores[name][metric] for r in results]) for metric in METRICS
        }
    absent = absent_structures(results)
    summary["absent_structures"] = absent
    shown = present_or_all(structures, absent)
    for metric in HEADLINE:
        means = [summary["structures"][name][metric]["mean"] for name in shown]
        finite = [m for m in means if math.isfinite(m)]
        summary[f"mean_{metric}"] = float(np.mean(finite)) if finite else float("nan")
    return summary


def _absolute(path: Path | None) -> str | None:
    return None if path is None else os.path.abspath(path)  # `../preds` resolved


def absent_structures(results: list[CaseScores]) -> list[str]:
    """Structures that no case has in its reference or its prediction (a failed case counts
    by its reference, which is read even when its prediction is missing or unusable)."""
    structures = list(results[0].scores) if results else []
    return [name for name in structures
            if not any(is_present(r.scores[name]) for r in results)]


def write_reports(results: list[CaseScores], out_dir: Path, labels: dict[int, str] | None = None,
                  tolerance_mm: float | None = None, html: bool = True,
                  summary: dict | None = None, scans: Scans | None = None) -> dict:
    """Write scores.csv (a row per case and structure), summary.json and (with `html`)
    report.html into out_dir; return the summary (`summary`: summarize's, already made).
    `labels` (id -> name) lets the report draw the overlay montages, on `scans` if given."""
    if summary is None:
        summary = summarize(results, tolerance_mm)
    page = None
    if html:  # rendered first, so that a failure leaves no new CSV beside an old report
        from medseg.report_html import render_report

        page = render_report(results, summary, labels, scans)
    files = {"scores.csv": scores_csv(results),
             "summary.json": json.dumps(json_safe(summary), indent=2) + "\n"}
    if page is not None:
        files["report.html"] = page
    try:
        atomic_write_texts({out_dir / name: text for name, text in files.items()})
    except OSError as exc:
        raise MedsegError(f"cannot write ({exc.strerror or exc})",
                          exc.filename or out_dir) from exc
    return summary


SPACING_COLUMNS = ("spacing_i_mm", "spacing_j_mm", "spacing_k_mm")


def scores_csv(results: list[CaseScores]) -> str:
    """CSV text: case, structure, METRICS..., the reference's voxel size along its three file
    axes (to group cases by resolution, e.g. slice thickness), error (NaN empty, infinity as
    inf, an unknown spacing empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "structure", *METRICS, *SPACING_COLUMNS, "error"])
    for result in results:
        # 7 digits, a float32's: a header's 0.8 mm is 0.800000011920929 as read, not 0.80000001
        spacing = [f"{s:.7g}" for s in result.spacing] if result.spacing else [""] * 3
        for name, scores in result.scores.items():
            writer.writerow([result.case, name, *(_fmt(scores[m]) for m in METRICS),
                             *spacing, result.error or ""])
    return buffer.getvalue()


def shown_name(name: str) -> str:
    """A label name on one line for the console: a line break or another control character
    in it (a label map may hold any text) is written escaped, as "left\\nkidney"."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in name)


def format_table(summary: dict) -> str:
    """A compact console table: Dice mean and sd, NSD mean, HD95 median, n and inf counts."""
    tolerance = summary.get("tolerance_mm")
    nsd_head = f"nsd@{tolerance:g}mm" if tolerance is not None else "nsd"
    rows = [("structure", "mean dice", "sd", nsd_head, "hd95 median mm", "n", "inf")]
    shown = present_or_all(list(summary["structures"]), summary.get("absent_structures", []))
    absent = [name for name in summary["structures"] if name not in shown]
    for name in shown:
        stats = summary["structures"][name]
        rows.append((shown_name(name), _num(stats["dice"]["mean"]), _num(stats["dice"]["sd"]),
                     _num(stats["nsd"]["mean"]), _num(stats["hd95_mm"]["median"], 2),
                     str(stats["dice"]["n"]), str(stats["hd95_mm"]["n_inf"])))
    rows.append(("mean", _num(summary["mean_dice"]), "", _num(summary.get("mean_nsd", math.nan)),
                 "", str(summary["n_cases"]), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    if absent:
        lines.append(f"not shown, absent from every reference and prediction: {len(absent)} "
                     f"structure{'s' if len(absent) > 1 else ''} (listed in summary.json)")
    if summary["failed_cases"]:
        lines.append(f"failed cases (each structure of their references missed: Dice 0, "
                     f"distances inf): "
                     f"{', '.join(summary['failed_cases'])}")
    return "\n".join(lines)


def _stats(values: list[float]) -> dict:
    """Mean, sd and IQR of the finite values; the median of every value but NaN, infinite
    distances (a structure missed) included: two misses of three cases make an HD95 median
    of inf, not the one hit's 0 mm."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    scored = [v for v in values if not math.isnan(v)]
    n_inf = len(scored) - finite.size
    median = float(np.median(scored)) if scored else float("nan")
    if finite.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "median": median,
                "iqr": float("nan"), "n": 0, "n_inf": n_inf}
    q1, q3 = np.percentile(finite, [25, 75])
    return {"mean": float(finite.mean()), "sd": float(finite.std(ddof=1)) if finite.size > 1
            else float("nan"), "median": median, "iqr": float(q3 - q1),
            "n": int(finite.size), "n_inf": n_inf}


def _num(value: float, digits: int = 4) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _fmt(value: float) -> str:
    if math.isnan(value):
        return ""
    # 8 digits: a Dice of 0.99999983 is not 1, nor 2915.999 ml 2916
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.8g}"
