"""`check_dataset`: one table row per problem, each naming the case file; exit 0/1/2."""

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import past_folds

from medseg.check import check_dataset
from medseg.errors import MedsegError

SHAPE = (8, 9, 10)
LABELS = {"0": "background", "1": "organ"}


def save(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def image(seed):
    """Soft tissue in Hounsfield units with fat (-200) at one corner: unlike neither CT nor
    MR (check notes a CT without values below -100 and an MR with values down to -500)."""
    data = np.random.default_rng(seed).normal(40.0, 30.0, size=SHAPE).astype(np.float32)
    data[0, 0, 0] = -200.0
    return data


def label(value=1, dtype=np.uint8):
    data = np.zeros(SHAPE, dtype=dtype)
    data[2:5, 2:5, 2:5] = value
    return data


def msd(root, entries):
    (root / "dataset.json").write_text(json.dumps({
        "labels": LABELS, "modality": {"0": "CT"},
        "training": [{"image": i, "label": lab} for i, lab in entries]}), encoding="utf-8")
    return root


def write_case(root, name, image_data=None, label_data=None, image_affine=None,
               label_affine=None, seed=0):
    save(root / "imagesTr" / f"{name}.nii.gz",
         image(seed) if image_data is None else image_data, image_affine)
    save(root / "labelsTr" / f"{name}.nii.gz", label() if label_data is None else label_data,
         label_affine)
    return (f"imagesTr/{name}.nii.gz", f"labelsTr/{name}.nii.gz")


def test_clean_dataset(tmp_path):
    entries = [write_case(tmp_path, f"ok{k}", seed=k) for k in range(5)]  # 5 folds
    report = check_dataset(msd(tmp_path, entries))
    assert report.problems == () and report.exit_code() == 0
    assert report.format_table().endswith("(msd layout, 5 cases): clean")


def test_every_problem_is_a_row_naming_the_case_file(tmp_path):
    entries = [write_case(tmp_path, f"ok{k}", seed=k) for k in range(4)]
    nan_image = image(10)
    nan_image[1, 1, 1] = np.nan
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    entries += [
        write_case(tmp_path, "shape", label_data=np.zeros((8, 9, 11), np.uint8)),
        write_case(tmp_path, "geometry", label_affine=shifted, seed=11),
        write_case(tmp_path, "outside_map", label_data=label(7), seed=12),
        write_case(tmp_path, "fractional", label_data=label(0.5, np.float32), seed=13),
        write_case(tmp_path, "nan", image_data=nan_image),
        write_case(tmp_path, "empty", label_data=np.zeros(SHAPE, np.uint8), seed=14),
        write_case(tmp_path, "flat", image_data=np.zeros((8, 9), np.float32), seed=15),
        write_case(tmp_path, "fourd", image_data=np.zeros((*SHAPE, 2), np.float32)),
        write_case(tmp_path, "copy", seed=0),  # the same voxels as ok0
        write_case(tmp_path, "coarse", image_affine=np.diag([5.0, 5, 5, 1]),
                   label_affine=np.diag([5.0, 5, 5, 1]), seed=16),
        write_case(tmp_path, "lps", image_affine=lps, label_affine=lps, seed=17),
        ("imagesTr/gone.nii.gz", "labelsTr/ok0.nii.gz"),
        ("../outside.nii.gz", "labelsTr/ok1.nii.gz"),
    ]
    report = check_dataset(msd(tmp_path, entries))
    rows = {(p.case, p.file.name, p.message) for p in report.problems}

    def has(case, file, text):
        assert any(c == case and f == file and text in m for c, f, m in rows), (case, rows)

    has("shape", "shape.nii.gz", "not on the grid of shape.nii.gz: shape (8, 9, 11) "
                                  "differs from (8, 9, 10)")
    has("geometry", "geometry.nii.gz", "affines differ by up to 0.5 mm (tolerance 0.001 mm)")
    has("outside_map", "outside_map.nii.gz", "label values [7] are not in the label map")
    has("fractional", "fractional.nii.gz", "non-integer values (e.g. 0.5)")
    has("nan", "nan.nii.gz", "NaN or Inf")
    has("empty", "empty.nii.gz", "label is empty")
    has("flat", "flat.nii.gz", "expected a 3D volume")
    has("fourd", "fourd.nii.gz", "expected a 3D volume")
    has("copy", "copy.nii.gz", "same voxels as case ok0")
    has("coarse", "coarse.nii.gz", "spacing (5, 5, 5) mm is an outlier")
    has("lps", "lps.nii.gz", "orientation LPS differs from the usual RAS")
    has("gone", "gone.nii.gz", "image missing")
    has("outside", "outside.nii.gz", "path leaves the dataset folder")
    assert not any(p.case.startswith("ok") for p in report.problems)
    assert report.exit_code() == 1
    table = report.format_table()
    assert "imagesTr/nan.nii.gz" in table and "labelsTr/empty.nii.gz" in table
    assert table.splitlines()[0].split() == ["severity", "case", "file", "problem"]


def test_unreadable_description_raises(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(MedsegError, match="dataset.json: not valid JSON"):
        check_dataset(tmp_path)
    with pytest.raises(MedsegError, match="dataset folder not found"):
        check_dataset(tmp_path / "nowhere")


def test_nnunet_orphans_and_missing_channels(tmp_path):
    save(tmp_path / "imagesTr" / "a_0000.nii.gz", image(1))
    save(tmp_path / "imagesTr" / "a_0001.nii.gz", image(2))
    save(tmp_path / "labelsTr" / "a.nii.gz", label())
    save(tmp_path / "imagesTr" / "b_0000.nii.gz", image(3))  # channel 1 and label missing
    save(tmp_path / "labelsTr" / "c.nii.gz", label())  # no image at all
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz"}), encoding="utf-8")
    report = check_dataset(tmp_path)
    found = {(p.case, p.file.name, p.message.split(" (")[0]) for p in report.problems}
    assert ("b", "b_0000.nii.gz", "image without a label in labelsTr") in found
    assert ("c", "c_0000.nii.gz", "image missing") in found
    assert ("c", "c_0001.nii.gz", "image missing") in found
    assert not any(case == "a" for case, _, _ in found)


def test_check_agrees_with_training_on_spare_labels_hidden_files_and_no_cases(tmp_path):
    from medseg.datasets import load_dataset

    pairs = tmp_path / "pairs"  # two cases: training needs as many for its folds
    for k, name in enumerate("ab"):
        save(pairs / "images" / f"{name}.nii.gz", image(k + 1))
        save(pairs / "labels" / f"{name}.nii.gz", label())
    save(pairs / "labels" / "spare.nii.gz", label())  # no image: training leaves it out
    assert [c.name for c in load_dataset(pairs).cases] == ["a", "b"]
    report = check_dataset(pairs)
    assert [(p.severity, p.file.name) for p in past_folds(report.problems)] == [
        ("warning", "spare.nii.gz")]

    nnunet = tmp_path / "nnunet"
    for k, name in enumerate("ab"):
        save(nnunet / "imagesTr" / f"{name}_0000.nii.gz", image(k + 2))
        save(nnunet / "labelsTr" / f"{name}.nii.gz", label())
    (nnunet / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"\0" * 100)  # macOS metadata
    (nnunet / "labelsTr" / "._a.nii.gz").write_bytes(b"\0" * 100)
    (nnunet / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz"}), encoding="utf-8")
    assert [c.name for c in load_dataset(nnunet).cases] == ["a", "b"]
    assert past_folds(check_dataset(nnunet).problems) == ()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "x"}, "training": []}), encoding="utf-8")
    report = check_dataset(empty)
    assert report.exit_code() == 1
    assert [p.message for p in report.problems] == [
        "the dataset lists no cases: training would refuse it"]


def test_nnunet_file_ending_that_matches_no_label_is_named(tmp_path):
    save(tmp_path / "imagesTr" / "a_0000.nii.gz", image(1))
    save(tmp_path / "labelsTr" / "a.nii.gz", label())
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nrrd"}), encoding="utf-8")
    with pytest.raises(MedsegError, match=r"dataset.json: 'file_ending' is '.nrrd', but "
                                          r"labelsTr holds a.nii.gz and no .nrrd file"):
        check_dataset(tmp_path)


def test_folders_layout_without_its_folders_is_one_line(tmp_path):
    save(tmp_path / "images" / "a.nii.gz", image(1))
    with pytest.raises(MedsegError, match=r"labels: folder not found: the folders layout "
                                          r"needs images/ and labels/"):
        check_dataset(tmp_path, layout="folders")


def test_cases_sharing_one_channel_are_not_duplicates(tmp_path):
    zeros = np.zeros(SHAPE, np.float32)  # a missing T2, filled with zeros in every case
    for k, name in enumerate("abc"):
        save(tmp_path / "imagesTr" / f"{name}_0000.nii.gz", image(k))
        save(tmp_path / "imagesTr" / f"{name}_0001.nii.gz", zeros)
        save(tmp_path / "labelsTr" / f"{name}.nii.gz", label())
    save(tmp_path / "imagesTr" / "d_0000.nii.gz", image(0))  # case a again, both channels
    save(tmp_path / "imagesTr" / "d_0001.nii.gz", zeros)
    save(tmp_path / "labelsTr" / "d.nii.gz", label())
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz"}), encoding="utf-8")
    duplicates = [(p.case, p.message) for p in check_dataset(tmp_path).problems
                  if "duplicate" in p.message]
    assert duplicates == [("d", "same voxels as case a in every channel and the label "
                                "(duplicate case)")]


def test_two_files_of_one_label_are_still_an_error(tmp_path):
    for k, name in enumerate("ab"):
        save(tmp_path / "images" / f"{name}.nii.gz", image(k + 1))
        save(tmp_path / "labels" / f"{name}.nii.gz", label())
    save(tmp_path / "labels" / "a.nii", label())
    report = check_dataset(tmp_path, layout="folders")
    assert [(p.severity, p.file.name) for p in past_folds(report.problems)] == [
        ("error", "a.nii.gz")]


def test_a_sheared_scan_is_a_warning_since_predict_refuses_it(tmp_path):
    sheared = np.eye(4)
    sheared[0, 2] = 0.5  # the slice axis leans 27 degrees towards x
    entries = [write_case(tmp_path, f"ok{k}", seed=k) for k in range(2)]
    entries.append(write_case(tmp_path, "tilted", image_affine=sheared, label_affine=sheared,
                              seed=5))
    report = check_dataset(msd(tmp_path, entries))
    assert [(p.severity, p.case) for p in past_folds(report.problems)] == [("warning", "tilted")]
    assert "voxel axes sheared by up to 26.6 degrees" in report.problems[0].message
    assert "predict refuses such a scan, and evaluate" in report.problems[0].message


def test_label_ids_with_a_gap_are_refused_for_training_and_flagged_by_check(tmp_path):
    """BraTS's ids 0, 1, 2, 4 planned a fifth class (3) that the masks then held, and every
    case failed its evaluation: "label values [3] are not in the label map"."""
    from medseg.datasets import load_dataset
    from medseg.plan import fingerprint

    gapped = tmp_path / "gapped"
    entries = [write_case(gapped, f"c{k}", label_data=label(4 if k else 2), seed=k)
               for k in range(2)]
    msd(gapped, entries)
    description = json.loads((gapped / "dataset.json").read_text(encoding="utf-8"))
    description["labels"] = {"0": "background", "1": "a", "2": "b", "4": "d"}
    (gapped / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    report = check_dataset(gapped)
    assert [(p.file.name, p.message) for p in past_folds(report.problems)] == [
        ("dataset.json", "label map ids: 3 missing from 0, 1, 2, 4; training needs ids "
                         "0, 1, 2, ... without a gap")]
    with pytest.raises(MedsegError, match=r"label ids must run 0, 1, 2, \.\.\. without a gap "
                                          r"for training \(as nnU-Net requires\): 3 missing "
                                          r"from 0, 1, 2, 4; renumber"):
        fingerprint(load_dataset(gapped), progress=False)

    pairs = tmp_path / "pairs"  # no label map: the ids come from the label files
    save(pairs / "images" / "a.nii.gz", image(1))
    save(pairs / "labels" / "a.nii.gz", label(1))
    save(pairs / "images" / "b.nii.gz", image(2))
    save(pairs / "labels" / "b.nii.gz", label(4))  # the file to renumber is named
    with pytest.raises(MedsegError, match=r"labels/b\.nii\.gz: holds id 4; label ids must run "
                                          r".*: 2, 3 missing from 0, 1, 4"):
        fingerprint(load_dataset(pairs), progress=False)
    assert [(p.severity, p.case, p.file.name, p.message)
            for p in past_folds(check_dataset(pairs).problems)] == [
        ("error", "b", "b.nii.gz", "holds label id 4, past a gap in the label files' ids: 2, 3 "
                                   "missing from 0, 1, 4; training needs ids 0, 1, 2, ... "
                                   "without a gap")]

    # a negative id in the label map: training wrote a plan.json its own predict refused
    description["labels"] = {"-1": "out", "0": "background", "1": "a", "2": "b", "3": "c",
                             "4": "d"}
    (gapped / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    assert [p.message for p in past_folds(check_dataset(gapped).problems)] == [
        "label map ids: -1 negative; training needs ids 0, 1, 2, ... without a gap"]
    with pytest.raises(MedsegError, match=r"without a gap for training \(as nnU-Net "
                                          r"requires\): -1 negative; renumber"):
        fingerprint(load_dataset(gapped), progress=False)


def test_label_id_problems_are_found_from_the_ids_present_whatever_their_size():
    """The gaps were found by listing range(max + 1): one voxel of 2**31 - 1 in a label file
    needed hundreds of GiB."""
    from medseg.datasets import label_id_problem

    assert label_id_problem([0, 1, 2]) is None
    assert label_id_problem([0, 2**31 - 1]) == "1-2147483646 missing from 0, 2147483647"
    assert label_id_problem(range(0, 100, 2)).startswith(
        "1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, ... (37 more) missing from 0, 2, 4")


def test_a_path_outside_the_folder_is_a_warning_and_no_row_at_all_in_a_csv(tmp_path):
    """Training takes such paths: `check` may not call them errors; a CSV lists files
    anywhere by design."""
    store = tmp_path / "store"
    entries = [write_case(store, f"ok{k}", seed=k) for k in range(3)]
    absolute = [(str(store / i), str(store / lab)) for i, lab in entries]
    folder = tmp_path / "msd"
    folder.mkdir()
    report = check_dataset(msd(folder, absolute))
    assert {(p.severity, p.message.split(" (")[0]) for p in past_folds(report.problems)} == {
        ("warning", "path leaves the dataset folder")}
    assert len(past_folds(report.problems)) == 6  # every image and label
    listing = tmp_path / "cases.csv"
    listing.write_text("image,label\n" + "".join(f"{i},{lab}\n" for i, lab in absolute),
                       encoding="utf-8")
    clean = check_dataset(listing)
    assert clean.layout == "csv" and past_folds(clean.problems) == ()
    assert clean.exit_code() == 0


def test_the_verdict_counts_in_words(tmp_path):
    entries = [write_case(tmp_path, f"ok{k}", seed=k) for k in range(5)]  # 5 folds
    (tmp_path / entries[4][0]).unlink()  # its image gone, its label its own
    assert "1 error, 0 warnings" in check_dataset(msd(tmp_path, entries)).format_table()


def test_a_file_or_a_wrong_layout_is_named_for_what_it_is(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text('{"1": "a"}', encoding="utf-8")
    with pytest.raises(MedsegError, match="labels.json: not a dataset folder, dataset.json or "
                                          "CSV file"):
        check_dataset(labels)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
        "file_ending": ".nii.gz"}), encoding="utf-8")
    with pytest.raises(MedsegError, match=r"'training' must be a list of \{image, label\} "
                                          r"\(an nnU-Net dataset\? set dataset.layout"):
        check_dataset(tmp_path, layout="msd")


def test_an_image_unlike_its_channels_modality_is_a_warning(tmp_path):
    """A CT dataset in the folders layout (MR by default) was z-scored as MR without a word;
    a blank image was not mentioned either."""
    ct = image(0)
    ct[0, 0, 0] = -1024.0
    entries = [write_case(tmp_path, "ct", seed=0), write_case(tmp_path, "blank", seed=1)]
    save(tmp_path / "imagesTr" / "ct.nii.gz", ct)
    save(tmp_path / "imagesTr" / "blank.nii.gz", np.zeros(SHAPE, np.float32))
    root = msd(tmp_path, entries)
    description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    description["modality"] = {"0": "MR"}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    problems = sorted(past_folds(check_dataset(root).problems), key=lambda p: p.case)
    assert [(p.severity, p.case) for p in problems] == [("warning", "blank"), ("warning", "ct")]
    messages = [p.message for p in problems]
    assert messages[0] == "every voxel is 0 (the channel is MR: set dataset.modality to what " \
                          "the images are)"
    assert messages[1].startswith("values down to -1024 look like CT Hounsfield units, not MR")
