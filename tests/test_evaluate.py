import json
import math
import time

import nibabel as nib
import numpy as np
import pytest
from helpers import requires_shared
from scipy import ndimage

from medseg.cli import main
from medseg.datasets import label_names_from_json
from medseg.errors import MedsegError
from medseg.evaluate import evaluate_pairs, infer_labels, load_pair, pair_cases
from medseg.report import format_table, run_evaluation, write_reports

LABELS = {0: "background", 1: "a", 2: "b"}
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def save(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), AFFINE if affine is None else affine), path)


def phantom():
    reference = np.zeros((10, 10, 10), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    reference[6:9, 6:9, 6:9] = 2
    return reference


@pytest.fixture()
def folders(tmp_path):
    reference = phantom()
    shifted = np.roll(reference, 1, axis=0)
    save(tmp_path / "ref" / "c1.nii.gz", reference)
    save(tmp_path / "ref" / "c2.nii.gz", reference)
    save(tmp_path / "ref" / "c3.nii.gz", reference)
    save(tmp_path / "pred" / "c1.nii.gz", reference)
    save(tmp_path / "pred" / "c2.nii.gz", shifted)
    return tmp_path


def test_missing_prediction_is_a_failure_not_dropped(folders):
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    assert [r.case for r in results] == ["c1", "c2", "c3"]
    assert results[0].scores["a"]["dice"] == 1.0
    assert results[0].scores["a"]["hd95_mm"] == 0.0 and results[0].scores["a"]["nsd"] == 1.0
    assert results[1].scores["a"]["dice"] == pytest.approx(2 * 48 / 128)
    assert results[1].scores["a"]["hd95_mm"] == pytest.approx(2.0)  # one 2 mm voxel along x
    assert results[2].error and results[2].scores["a"]["dice"] == 0.0
    assert math.isinf(results[2].scores["a"]["hd95_mm"])


def test_reports(folders, tmp_path):
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    summary = write_reports(results, tmp_path / "out")
    rows = (tmp_path / "out" / "scores.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == ("case,structure,dice,iou,hd95_mm,hd_mm,assd_mm,nsd,ref_ml,pred_ml,diff_ml,"
                       "spacing_i_mm,spacing_j_mm,spacing_k_mm,error")
    assert len(rows) == 1 + 3 * 2
    assert rows[1].startswith("c1,a,1,1,0,0,0,1,") and rows[1].endswith(",2,2,3,")
    # a failed case keeps its reference volume and spacing
    assert rows[-1].startswith("c3,b,0,0,inf,inf,inf,0,0.324,,,2,2,3,no prediction")
    saved = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert saved["failed_cases"] == ["c3"]
    dice_a = saved["structures"]["a"]["dice"]
    assert dice_a["n"] == 3
    assert dice_a["mean"] == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    assert saved["structures"]["a"]["hd95_mm"] == {
        # the median of 0, 2 and the miss's inf
        "mean": 1.0, "sd": pytest.approx(math.sqrt(2)), "median": 2.0, "iqr": 1.0, "n": 2,
        "n_inf": 1}
    assert (tmp_path / "out" / "report.html").is_file()
    assert "a " in format_table(summary) and "failed cases" in format_table(summary)


def test_grid_mismatch_is_reported(folders):
    save(folders / "pred" / "c3.nii.gz", np.zeros((10, 10, 10)), np.eye(4))
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    assert "not on the same grid" in results[2].error
    assert "--resample" in results[2].error and "c3.nii.gz" in results[2].error


def test_resample_from_a_finer_grid(tmp_path):
    reference = phantom()
    fine = np.repeat(np.repeat(reference, 2, axis=0), 2, axis=1)  # 1 mm in-plane
    fine_affine = np.diag([1.0, 1.0, 3.0, 1.0])
    fine_affine[:2, 3] = -0.5  # voxel centres of the fine grid sit 0.5 mm either side
    save(tmp_path / "ref" / "c1.nii.gz", reference)
    save(tmp_path / "pred" / "c1.nii.gz", fine, fine_affine)
    pair = load_pair(tmp_path / "pred" / "c1.nii.gz", tmp_path / "ref" / "c1.nii.gz", LABELS,
                     resample=True)
    assert pair.resampled and np.array_equal(pair.prediction, reference)


def test_a_prediction_of_an_unknown_label_only_misses_every_structure(folders):
    save(folders / "pred" / "c3.nii.gz", np.full((10, 10, 10), 7))
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    assert results[2].error is None and results[2].unlisted == (7,)
    assert results[2].scores["a"]["dice"] == 0.0 and results[2].scores["b"]["pred_ml"] == 0.0


def test_parallel_jobs_give_the_serial_scores(folders):
    pairs = pair_cases(folders / "pred", folders / "ref")
    serial = evaluate_pairs(pairs, LABELS)
    parallel = evaluate_pairs(pairs, LABELS, jobs=2)
    assert [r.case for r in parallel] == [r.case for r in serial]
    assert [r.error for r in parallel] == [r.error for r in serial]
    for a, b in zip(serial, parallel, strict=True):
        assert json.dumps(a.scores) == json.dumps(b.scores)


def test_infer_labels(folders):
    labels = infer_labels(pair_cases(folders / "pred", folders / "ref"))
    assert labels == {0: "background", 1: "label_1", 2: "label_2"}


@pytest.mark.parametrize("table", [
    {"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}},  # MSD
    {"labels": {"background": 0, "Anterior": 1, "Posterior": 2},  # nnU-Net v2
     "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"},
])
def test_run_evaluation_names_structures_from_dataset_json(folders, tmp_path, capsys, table):
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps(table), encoding="utf-8")
    summary = run_evaluation(folders / "pred", folders / "ref", labels, tmp_path / "ev",
                             tolerance_mm=1.0)
    out = capsys.readouterr().out
    assert list(summary["structures"]) == ["Anterior", "Posterior"]
    assert summary["failed_cases"] == ["c3"] and summary["tolerance_mm"] == 1.0
    assert "Anterior" in out and "nsd@1mm" in out and "report.html" in out
    for name in ("scores.csv", "summary.json", "report.html"):
        assert (tmp_path / "ev" / name).is_file()


def test_run_evaluation_without_out_writes_nothing(folders, tmp_path, capsys):
    summary = run_evaluation(folders / "pred", folders / "ref", None, None)
    assert list(summary["structures"]) == ["label_1", "label_2"]
    assert "label_1" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "ref"]


def test_run_evaluation_refuses_bad_options(folders, tmp_path):
    with pytest.raises(MedsegError, match="--jobs"):
        run_evaluation(folders / "pred", folders / "ref", None, None, jobs=0)
    with pytest.raises(MedsegError, match="--tolerance-mm"):
        run_evaluation(folders / "pred", folders / "ref", None, None, tolerance_mm=-1.0)
    (tmp_path / "file").write_text("", encoding="utf-8")
    with pytest.raises(MedsegError, match="is a file"):
        run_evaluation(folders / "pred", folders / "ref", None, tmp_path / "file")
    with pytest.raises(MedsegError, match="folder not found"):
        run_evaluation(tmp_path / "nope", folders / "ref", None, None)


def test_cli_uses_label_names(folders, tmp_path, capsys):
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"0": "background", "1": "Anterior",
                                             "2": "Posterior"}}), encoding="utf-8")
    code = main(["evaluate", "--pred", str(folders / "pred"), "--ref", str(folders / "ref"),
                 "--labels", str(labels), "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert code == 1  # c3 has no prediction
    assert "Anterior" in out and "Posterior" in out
    assert (tmp_path / "ev" / "summary.json").is_file()


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def totalseg(tmp_path_factory):
    """The 41-structure TotalSegmentator mask as reference for itself and for a copy shifted
    by one voxel (3 mm) along the first axis."""
    seg = requires_shared("totalseg_ct", "example_seg.nii.gz")
    labels = label_names_from_json(requires_shared("totalseg_ct", "labels.json"))
    root = tmp_path_factory.mktemp("totalseg")
    image = nib.load(seg)
    reference = np.asarray(image.dataobj)
    shifted = ndimage.shift(reference, (1, 0, 0), order=0, mode="constant", cval=0)
    (root / "ref").mkdir()
    for case, prediction in (("self", reference), ("shifted", shifted)):
        nib.save(image, root / "ref" / f"{case}.nii.gz")
        save(root / "pred" / f"{case}.nii.gz", prediction, image.affine)
    return root, labels, reference, shifted


def test_totalseg_case_against_itself_and_shifted(totalseg, capsys):
    root, labels, reference, shifted = totalseg
    started = time.perf_counter()
    self_case, shifted_case = evaluate_pairs(pair_cases(root / "pred", root / "ref"), labels)
    seconds = time.perf_counter() - started
    present = [k for k in sorted(labels) if k > 0 and (reference == k).any()]
    assert len(present) == 41
    for k in present:
        scores = self_case.scores[labels[k]]
        assert scores["dice"] == 1.0 and scores["iou"] == 1.0 and scores["nsd"] == 1.0
        assert scores["hd95_mm"] == 0.0 and scores["assd_mm"] == 0.0
    for k in present:  # the known drop: Dice from the overlap counted here
        ref_k, pred_k = reference == k, shifted == k
        expected = 2 * np.count_nonzero(ref_k & pred_k) / (ref_k.sum() + pred_k.sum())
        scores = shifted_case.scores[labels[k]]
        assert scores["dice"] == pytest.approx(expected), labels[k]
        assert scores["dice"] < 1.0
        assert scores["hd95_mm"] in (0.0, 3.0)  # every surface moved by one 3 mm voxel at most
        assert scores["nsd"] < 1.0  # 2 mm tolerance: the moved faces are 3 mm away
    with capsys.disabled():
        print(f"\n  two 41-structure totalseg cases scored in {seconds:.2f} s")


def test_totalseg_shift_is_fully_within_a_3mm_tolerance(totalseg):
    root, labels, reference, _ = totalseg
    result = evaluate_pairs(pair_cases(root / "pred", root / "ref"), labels,
                            tolerance_mm=3.0)[1]
    assert result.case == "shifted"
    for k in sorted(labels):
        if k > 0 and (reference == k).any():
            assert result.scores[labels[k]]["nsd"] == 1.0, labels[k]


def test_fractional_prediction_fails_and_unpaired_predictions_are_named(folders, tmp_path,
                                                                        capsys):
    probabilities = (phantom() > 0).astype(np.float32) * 0.6
    nib.save(nib.Nifti1Image(probabilities, AFFINE), folders / "pred" / "c3.nii.gz")
    save(folders / "pred" / "stray.nii.gz", phantom())
    summary = run_evaluation(folders / "pred", folders / "ref", None, None)
    err = capsys.readouterr().err
    assert summary["failed_cases"] == ["c3"]
    assert "c3.nii.gz: label has non-integer values (e.g. 0.6)" in err
    assert "1 prediction(s) without a reference" in err and "stray" in err


def test_two_files_of_one_case_are_refused(folders):
    (folders / "ref" / "c1.nrrd").write_bytes(b"never read")
    with pytest.raises(MedsegError, match=r"ref: c1.nii.gz and c1.nrrd are both case 'c1'"):
        pair_cases(folders / "pred", folders / "ref")


def test_resample_keeps_the_outer_half_of_border_voxels(tmp_path):
    """A structure touching the edge of a coarser prediction grid keeps its whole extent."""
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[:4] = 1  # touches the lower x edge
    coarse = reference[::2]  # the same segmentation on 2 mm along x
    coarse_affine = np.diag([2.0, 1.0, 1.0, 1.0])
    coarse_affine[0, 3] = 0.5  # coarse voxel centres midway between pairs of fine ones
    save(tmp_path / "ref" / "c1.nii.gz", reference, np.eye(4))
    save(tmp_path / "pred" / "c1.nii.gz", coarse, coarse_affine)
    pair = load_pair(tmp_path / "pred" / "c1.nii.gz", tmp_path / "ref" / "c1.nii.gz",
                     {0: "background", 1: "a"}, resample=True)
    assert np.array_equal(pair.prediction, reference)


def test_label_map_without_background_is_completed(folders, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b"}), encoding="utf-8")
    summary = run_evaluation(folders / "pred", folders / "ref", labels, None)
    assert summary["failed_cases"] == ["c3"]  # only the case with no prediction
    assert summary["structures"]["a"]["dice"]["n"] == 3


def test_repeated_label_names_are_refused(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "background", "1": "liver", "2": "liver"}),
                      encoding="utf-8")
    with pytest.raises(MedsegError, match="repeated: liver"):
        label_names_from_json(labels)


def test_inferred_labels_include_false_positive_labels(tmp_path):
    reference = np.zeros((10, 10, 10), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    prediction = reference.copy()
    prediction[8, 8, 8] = 2  # a label the reference does not have
    save(tmp_path / "ref" / "c1.nii.gz", reference)
    save(tmp_path / "pred" / "c1.nii.gz", prediction)
    summary = run_evaluation(tmp_path / "pred", tmp_path / "ref", None, None)
    assert summary["failed_cases"] == []
    assert summary["structures"]["label_1"]["dice"]["mean"] == 1.0
    assert summary["structures"]["label_2"]["dice"]["mean"] == 0.0


def test_unreadable_reference_is_a_user_error_with_or_without_labels(folders, tmp_path):
    (folders / "ref" / "c2.nii.gz").write_bytes(b"not a nifti")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b"}), encoding="utf-8")
    for labels_path in (None, labels):
        with pytest.raises(MedsegError, match="c2.nii.gz"):
            run_evaluation(folders / "pred", folders / "ref", labels_path, None)


def test_error_messages_are_one_line():
    error = MedsegError("expected 100 bytes\n - could the file be damaged?", "x.nii")
    assert str(error) == "x.nii: expected 100 bytes - could the file be damaged?"


def test_unknown_label_in_the_reference_is_refused_naming_the_reference(folders, capsys):
    reference = phantom()
    reference[0, 0, 0] = 5  # a structure the label map does not name: never silently dropped
    save(folders / "ref" / "c1.nii.gz", reference)
    labels = folders / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b"}), encoding="utf-8")
    assert main(["evaluate", "--pred", str(folders / "pred"), "--ref", str(folders / "ref"),
                 "--labels", str(labels)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"medseg: error: {folders / 'ref' / 'c1.nii.gz'}: label values [5] are not in the "
        "label map")


def test_hidden_files_are_not_cases(folders, capsys):
    (folders / "ref" / "._c1.nii.gz").write_bytes(b"macOS resource fork")
    save(folders / "pred" / ".c2.nii.gz.1234.part.nii.gz", phantom())
    summary = run_evaluation(folders / "pred", folders / "ref", None, None)
    assert summary["n_cases"] == 3 and "without a reference" not in capsys.readouterr().err


def test_float_labels_a_rounding_error_off_are_whole_numbers(folders, tmp_path, capsys):
    noisy = phantom().astype(np.float32) * np.float32(1.0000001)
    nib.save(nib.Nifti1Image(noisy, AFFINE), folders / "pred" / "c3.nii.gz")
    summary = run_evaluation(folders / "pred", folders / "ref", None, None)
    assert summary["failed_cases"] == [] and summary["structures"]["label_1"]["dice"]["mean"] > 0
    halves = phantom().astype(np.float32) * np.float32(1.004)
    nib.save(nib.Nifti1Image(halves, AFFINE), folders / "pred" / "c3.nii.gz")
    run_evaluation(folders / "pred", folders / "ref", None, None)
    assert "non-integer values (e.g. 1.004)" in capsys.readouterr().err  # not rounded to "1"


def test_grids_agree_within_an_absolute_tolerance_far_from_the_origin(tmp_path):
    affine = AFFINE.copy()
    affine[:3, 3] = 600.0
    moved = affine.copy()
    moved[0, 3] += 0.006  # 6 micrometres: more than GRID_ATOL, however far the origin
    save(tmp_path / "ref" / "c1.nii.gz", phantom(), affine)
    save(tmp_path / "pred" / "c1.nii.gz", phantom(), moved)
    with pytest.raises(MedsegError, match="not on the same grid"):
        load_pair(tmp_path / "pred" / "c1.nii.gz", tmp_path / "ref" / "c1.nii.gz", LABELS)


def test_a_structure_is_averaged_over_the_cases_that_have_it(tmp_path):
    reference = phantom()
    save(tmp_path / "ref" / "c1.nii.gz", reference)
    save(tmp_path / "pred" / "c1.nii.gz", np.roll(reference, 1, axis=0))
    for name in ("c2", "c3"):  # neither has structure b
        save(tmp_path / "ref" / f"{name}.nii.gz", np.where(reference == 2, 0, reference))
        save(tmp_path / "pred" / f"{name}.nii.gz", np.where(reference == 2, 0, reference))
    summary = run_evaluation(tmp_path / "pred", tmp_path / "ref", None, None)
    b = summary["structures"]["label_2"]["dice"]
    assert b["n"] == 1 and b["mean"] == pytest.approx(2 * 18 / 54)  # not (0.67 + 1 + 1) / 3


@pytest.mark.parametrize("prediction", ["missing", "other grid"])
def test_a_bad_reference_is_refused_whatever_its_prediction(folders, prediction):
    """The reference was read only when its prediction could be: with none (or one on
    another grid), a reference with an unknown label was scored as a failed case, exit 1."""
    reference = phantom()
    reference[0, 0, 0] = 7
    save(folders / "ref" / "c3.nii.gz", reference)
    if prediction == "other grid":
        save(folders / "pred" / "c3.nii.gz", np.zeros((6, 6, 6), np.uint8))
    labels = folders / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b"}), encoding="utf-8")
    with pytest.raises(MedsegError, match=r"c3.nii.gz: label values \[7\] are not in the"):
        run_evaluation(folders / "pred", folders / "ref", labels, None)


def test_a_structure_in_a_failed_cases_reference_is_not_called_absent(tmp_path):
    with_b = phantom()
    without_b = np.where(with_b == 2, 0, with_b)
    save(tmp_path / "ref" / "c1.nii.gz", without_b)
    save(tmp_path / "pred" / "c1.nii.gz", without_b)
    save(tmp_path / "ref" / "c2.nii.gz", with_b)  # its prediction is missing
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b"}), encoding="utf-8")
    summary = run_evaluation(tmp_path / "pred", tmp_path / "ref", labels, None)
    assert summary["absent_structures"] == []
    assert summary["mean_dice"] == pytest.approx(0.25)  # a (1 + 0) / 2, b 0 (c2 alone)
    ref_ml = summary["structures"]["b"]["ref_ml"]
    assert ref_ml["mean"] == pytest.approx((0 + 27 * 12 / 1000) / 2)


def sheared_affine():
    affine = AFFINE.copy()
    affine[:3, 2] = [0.0, 3.0 * np.sin(np.deg2rad(30)), 3.0 * np.cos(np.deg2rad(30))]
    return affine


def test_sheared_grids_are_refused_not_measured_wrong(folders):
    """Volumes and distances assume voxel axes at right angles: a 30 degree tilted slice axis
    overstated volumes by 15 %."""
    save(folders / "ref" / "c1.nii.gz", phantom(), sheared_affine())
    with pytest.raises(MedsegError, match=r"c1.nii.gz: the voxel axes are sheared \(up to "
                                          r"30.00 degrees"):
        run_evaluation(folders / "pred", folders / "ref", None, None)
    save(folders / "ref" / "c1.nii.gz", phantom())
    save(folders / "pred" / "c1.nii.gz", phantom(), sheared_affine())
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    assert "not on the same grid" in results[0].error


def test_a_distance_of_exactly_the_tolerance_is_within_it(tmp_path):
    """5 voxels of a float32 0.4 mm spacing are 2.0000000298 mm: NSD@2mm was 0.95, not 1."""
    affine = np.diag([0.4, 0.4, 0.4, 1.0])
    reference = np.zeros((30, 20, 20), np.uint8)
    reference[5:15, 5:15, 5:15] = 1
    save(tmp_path / "ref" / "c1.nii.gz", reference, affine)
    save(tmp_path / "pred" / "c1.nii.gz", np.roll(reference, 5, axis=0), affine)
    results = evaluate_pairs(pair_cases(tmp_path / "pred", tmp_path / "ref"),
                             {0: "background", 1: "a"}, tolerance_mm=2.0)
    assert results[0].scores["a"]["nsd"] == 1.0


def test_label_values_beyond_int32_are_refused_not_wrapped(folders):
    huge = phantom().astype(np.int64)
    huge[huge == 1] = 2**32 + 1  # was read as 1: a perfect Dice for a wrong structure
    nib.save(nib.Nifti1Image(huge, AFFINE, dtype=np.int64), folders / "pred" / "c1.nii.gz")
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    assert results[0].error == (f"{folders / 'pred' / 'c1.nii.gz'}: label values up to "
                                f"4294967297 (or down to 0) are beyond any label id")


def test_an_output_folder_that_cannot_be_written_is_refused_before_scoring(folders, capsys):
    blocker = folders / "afile"
    blocker.write_text("x", encoding="utf-8")
    assert main(["evaluate", "--pred", str(folders / "pred"), "--ref", str(folders / "ref"),
                 "--out", str(blocker / "sub")]) == 2
    captured = capsys.readouterr()
    assert "evaluate" not in captured.err.replace("medseg evaluate", "")  # no progress bar
    assert captured.err.strip().splitlines()[-1].startswith(
        f"medseg: error: {blocker / 'sub'}: cannot write in the output folder")


def test_predictions_of_which_none_pairs_with_a_reference_are_refused(folders, tmp_path):
    """The wrong --pred folder (or another naming) scored every case as missed, wrote the
    three files and exited 1, as if the model had failed on all of them."""
    save(tmp_path / "other" / "x1.nii.gz", phantom())
    with pytest.raises(MedsegError, match=r"other: no prediction has the name of a reference "
                                          r"in .*ref \(cases are paired by file name: x1 here, "
                                          r"c1 there\)"):
        run_evaluation(tmp_path / "other", folders / "ref", None, tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_an_empty_prediction_folder_is_refused(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsegError, match="empty: no prediction volumes found"):
        run_evaluation(tmp_path / "empty", folders / "ref", None, None)


def reference_with_an_unknown_label(folders):
    """c3's reference holds 7, which labels.json (returned) does not name: a refusal."""
    reference = phantom()
    reference[0, 0, 0] = 7
    save(folders / "ref" / "c3.nii.gz", reference)
    labels = folders / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b"}), encoding="utf-8")
    return labels


def test_a_refused_evaluation_leaves_no_output_folder_behind(folders):
    labels = reference_with_an_unknown_label(folders)
    with pytest.raises(MedsegError, match="c3.nii.gz: label values"):
        run_evaluation(folders / "pred", folders / "ref", labels, folders / "out")
    assert not (folders / "out").exists()
    labels.write_text('{"1": "a", "1": "b"}', encoding="utf-8")
    with pytest.raises(MedsegError, match="appears twice"):
        run_evaluation(folders / "pred", folders / "ref", labels, folders / "out")
    assert not (folders / "out").exists()


def test_a_failed_case_misses_only_the_structures_its_reference_holds(folders):
    """A missing prediction scored Dice 0 for every structure, also those its reference lacks:
    one failed case lowered the mean of every structure other cases have, and a structure
    in no case at all (listed as absent) got a mean Dice of 0."""
    only_a = phantom()
    only_a[only_a == 2] = 0
    save(folders / "ref" / "c3.nii.gz", only_a)  # c3 has no prediction
    labels = folders / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b", "3": "c"}), encoding="utf-8")
    summary = run_evaluation(folders / "pred", folders / "ref", labels, folders / "out")
    assert summary["failed_cases"] == ["c3"] and summary["absent_structures"] == ["c"]
    structures = summary["structures"]
    assert structures["b"]["dice"]["n"] == 2 and structures["b"]["dice"]["mean"] > 0.5
    assert structures["a"]["dice"]["n"] == 3 and structures["a"]["hd95_mm"]["n_inf"] == 1
    written = json.loads((folders / "out" / "summary.json").read_text(encoding="utf-8"))
    assert written["structures"]["c"]["dice"]["n"] == 0
    assert written["structures"]["c"]["dice"]["mean"] is None
    rows = (folders / "out" / "scores.csv").read_text(encoding="utf-8").splitlines()
    c3_b = next(row for row in rows if row.startswith("c3,b,"))
    assert c3_b.split(",")[2:5] == ["", "", ""]  # dice, iou, hd95 undefined, not 0 / inf
    c3_a = next(row for row in rows if row.startswith("c3,a,"))
    assert c3_a.split(",")[2:5] == ["0", "0", "inf"]


def test_a_refused_evaluation_removes_the_parent_folders_it_made_for_out(folders):
    """--out a/b/c made a and b too, and a refusal removed only c."""
    labels = reference_with_an_unknown_label(folders)
    (folders / "kept").mkdir()
    with pytest.raises(MedsegError, match="c3.nii.gz: label values"):
        run_evaluation(folders / "pred", folders / "ref", labels,
                       folders / "kept" / "new" / "deeper" / "out")
    assert (folders / "kept").is_dir() and not any((folders / "kept").iterdir())


def test_the_same_grid_stored_in_another_voxel_order_is_scored_without_resampling(folders):
    """A DICOM converter's mask (rows bottom-up) against medseg's of the same series failed
    as "affines differ by up to 499 mm", and predict --reference has no --resample."""
    reference = phantom()
    flipped = AFFINE.copy()
    flipped[:3, 1] *= -1
    flipped[:3, 3] += AFFINE[:3, 1] * (reference.shape[1] - 1)  # the same voxel centres
    save(folders / "pred" / "c1.nii.gz", np.flip(reference, axis=1), flipped)
    permuted = AFFINE[:, [2, 0, 1, 3]]
    save(folders / "pred" / "c2.nii.gz", np.transpose(reference, (2, 0, 1)), permuted)
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    for result in results[:2]:
        assert result.error is None and not result.resampled
        assert result.scores["a"]["dice"] == result.scores["b"]["dice"] == 1.0
    shifted = flipped.copy()
    shifted[:3, 3] += [1.0, 0, 0]  # half a voxel off: another grid, as before
    save(folders / "pred" / "c1.nii.gz", np.flip(reference, axis=1), shifted)
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    assert "not on the same grid" in results[0].error


def test_negative_label_values_without_a_label_map_are_not_dropped(folders, capsys):
    """Without --labels a -1 region was neither refused nor scored (background)."""
    negative = phantom().astype(np.int16)
    negative[0, 0, :] = -1
    image = nib.Nifti1Image(negative, AFFINE)
    nib.save(image, folders / "pred" / "c1.nii.gz")  # in a prediction: its case fails
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"),
                             infer_labels(pair_cases(folders / "pred", folders / "ref")))
    assert results[0].error.endswith("c1.nii.gz: label values [-1] are not in the label map")
    nib.save(image, folders / "ref" / "c2.nii.gz")  # in a reference: the evaluation stops
    assert main(["evaluate", "--pred", str(folders / "pred"), "--ref",
                 str(folders / "ref")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "c2.nii.gz: label values [-1] are negative: labels are class numbers 0, 1, 2, ... "
        "(or give --labels)")


def test_a_file_given_for_a_folder_is_named_as_not_a_folder(folders):
    with pytest.raises(MedsegError, match=r"c1.nii.gz: not a folder \(give the folder"):
        pair_cases(folders / "pred" / "c1.nii.gz", folders / "ref")


@pytest.mark.parametrize(("table", "named"), [
    ({"0": "background", "1.5": "liver"}, "'1.5' is not"),
    ({"1": "liver", "2": "spleen", "2.0": "x"}, "'2.0' is not"),
])
def test_a_label_id_that_is_not_a_whole_number_is_named(tmp_path, table, named):
    """The table was read again as name -> id, and the message named '0' or '1', which were
    fine."""
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(table), encoding="utf-8")
    with pytest.raises(MedsegError, match=f"label ids must be whole numbers; {named}"):
        label_names_from_json(path)


def test_a_refused_evaluation_removes_a_parent_named_again_by_dot_dot(folders, monkeypatch):
    """--out new/../out made new, and removing 'new/..' failed, which kept new."""
    monkeypatch.chdir(folders)
    labels = reference_with_an_unknown_label(folders)
    before = sorted(p.name for p in folders.iterdir())
    with pytest.raises(MedsegError, match="c3.nii.gz: label values"):
        run_evaluation(folders / "pred", folders / "ref", labels,
                       folders / "new" / ".." / "out")
    assert sorted(p.name for p in folders.iterdir()) == before


def test_the_console_and_report_say_a_failed_case_misses_its_references_structures(folders):
    labels = folders / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b"}), encoding="utf-8")
    empty = np.zeros((10, 10, 10), np.uint8)
    save(folders / "ref" / "c3.nii.gz", empty)  # no prediction, nothing to miss
    summary = run_evaluation(folders / "pred", folders / "ref", labels, folders / "out")
    assert summary["failed_cases"] == ["c3"]
    assert "failed cases (each structure of their references missed" in format_table(summary)
    html = (folders / "out" / "report.html").read_text(encoding="utf-8")
    assert "every structure (0)" not in html and "scored Dice 0" not in html
    row = next(line for line in html.splitlines() if '<td class="name">c3</td>' in line)
    assert "<td>0.000</td>" not in row  # no structure to score: undefined, not 0


def test_prediction_ids_the_label_map_does_not_name_are_noted_not_failed(folders, capsys):
    """A prediction with an id past the map (a 104-structure model scored against a reference
    of two) failed its whole case; nnU-Net scores the listed labels only. A negative value
    still fails the case: it is no class number."""
    labels = folders / "labels.json"
    labels.write_text(json.dumps({"1": "a", "2": "b"}), encoding="utf-8")
    extra = phantom()
    extra[0:2, 0:2, 0:2] = 9
    save(folders / "pred" / "c1.nii.gz", extra)
    summary = run_evaluation(folders / "pred", folders / "ref", labels, folders / "ev")
    assert summary["failed_cases"] == ["c3"]  # no prediction
    assert "c1" in (folders / "ev" / "report.html").read_text(encoding="utf-8")
    saved = json.loads((folders / "ev" / "summary.json").read_text(encoding="utf-8"))
    assert saved["unscored_label_ids"] == {"c1": [9]}
    assert saved["labels"] == {"0": "background", "1": "a", "2": "b"} and saved["medseg_version"]
    assert saved["files"]["c1"] == {"prediction": str((folders / "pred" / "c1.nii.gz").absolute()),
                                    "reference": str((folders / "ref" / "c1.nii.gz").absolute())}
    assert saved["files"]["c3"]["prediction"] is None  # no prediction
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"),
                             label_names_from_json(labels))
    assert results[0].error is None and results[0].unlisted == (9,)
    assert results[0].scores["a"]["dice"] == results[0].scores["b"]["dice"] == 1.0
    err = capsys.readouterr().err
    assert (f"medseg: note: label ids [9] of 1 prediction(s) are not in the label map {labels} "
            f"and were not scored: c1") in err
    negative = phantom().astype(np.int16)
    negative[0, 0, 0] = -3
    nib.save(nib.Nifti1Image(negative, AFFINE), folders / "pred" / "c1.nii.gz")
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"),
                             label_names_from_json(labels))
    assert results[0].error.endswith("c1.nii.gz: label values [-3] are not in the label map")
