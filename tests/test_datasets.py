import json

import pytest

from medseg.datasets import label_names_from_json, load_dataset, make_splits
from medseg.errors import MedsegError
from medseg.phantoms import write_phantom_dataset


def test_msd_dataset(phantom_dataset):
    dataset = load_dataset(phantom_dataset)
    assert len(dataset.cases) == 6
    assert dataset.labels == {0: "background", 1: "liver", 2: "kidney", 3: "spine"}
    assert dataset.modalities == ("CT",)
    assert dataset.cases[0].name == "phantom_000"


def test_missing_listed_file_names_it(tmp_path):
    write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(16, 16, 8))
    (tmp_path / "labelsTr" / "phantom_001.nii.gz").unlink()
    with pytest.raises(MedsegError, match="dataset.json: listed in dataset.json but missing"):
        load_dataset(tmp_path)


def test_nnunet_layout(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("a", "b"):
        for channel in (0, 1):
            (tmp_path / "imagesTr" / f"{case}_{channel:04d}.nii.gz").write_bytes(b"x")
        (tmp_path / "labelsTr" / f"{case}.nii.gz").write_bytes(b"x")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "CT"}, "labels": {"background": 0, "tumor": 1},
        "numTraining": 2, "file_ending": ".nii.gz"}), encoding="utf-8")
    dataset = load_dataset(tmp_path)
    assert [c.name for c in dataset.cases] == ["a", "b"]
    assert len(dataset.cases[0].images) == 2
    assert dataset.modalities == ("MR", "CT")
    assert dataset.labels == {0: "background", 1: "tumor"}


def test_nnunet_dataset_entry_lists_each_cases_files(tmp_path, monkeypatch):
    """nnU-Net v2 reads the files of 'dataset' instead of scanning imagesTr/labelsTr: medseg
    scanned, and trained on the labels the entry had replaced."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "refined").mkdir()
    for case in ("a", "b"):
        (tmp_path / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"x")
        (tmp_path / "labelsTr" / f"{case}.nii.gz").write_bytes(b"x")
        (tmp_path / "refined" / f"{case}.nii.gz").write_bytes(b"x")
    monkeypatch.setenv("MEDSEG_TEST_IMAGES", str(tmp_path / "imagesTr"))
    description = {
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": 1},
        "numTraining": 2, "file_ending": ".nii.gz",
        "dataset": {"b": {"images": ["$MEDSEG_TEST_IMAGES/b_0000.nii.gz"],
                          "label": "refined/b.nii.gz"},
                    "a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "refined/a.nii.gz"}}}
    (tmp_path / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    dataset = load_dataset(tmp_path)
    assert [(c.name, c.images, c.label) for c in dataset.cases] == [
        ("a", (tmp_path / "imagesTr" / "a_0000.nii.gz",), tmp_path / "refined" / "a.nii.gz"),
        ("b", (tmp_path / "imagesTr" / "b_0000.nii.gz",), tmp_path / "refined" / "b.nii.gz")]
    description["dataset"]["a"]["images"].append("imagesTr/a_0001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    with pytest.raises(MedsegError, match="'dataset' entry 'a' lists 2 image"):
        load_dataset(tmp_path)
    description["channel_names"] = ["CT"]
    (tmp_path / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    with pytest.raises(MedsegError, match="'channel_names' must map channel numbers"):
        load_dataset(tmp_path)


def test_folder_pairs_need_matching_labels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "x.nii.gz").write_bytes(b"x")
    with pytest.raises(MedsegError, match="x.nii.gz: no label with the same name"):
        load_dataset(tmp_path)


def test_no_dataset_description(tmp_path):
    with pytest.raises(MedsegError, match="no dataset.json"):
        load_dataset(tmp_path)


def test_splits_are_seeded_disjoint_and_cover_everything():
    names = [f"case_{i}" for i in range(23)]
    splits = make_splits(names, 5, seed=0)
    assert splits == make_splits(list(reversed(names)), 5, seed=0)
    assert splits != make_splits(names, 5, seed=1)
    vals = [name for split in splits for name in split["val"]]
    assert sorted(vals) == sorted(names)
    for split in splits:
        assert not set(split["train"]) & set(split["val"])
        assert len(split["train"]) + len(split["val"]) == 23


def test_label_names_both_styles(tmp_path):
    msd = tmp_path / "msd.json"
    msd.write_text(json.dumps({"labels": {"0": "background", "1": "Anterior"}}), encoding="utf-8")
    nnunet = tmp_path / "nnunet.json"
    nnunet.write_text(json.dumps({"labels": {"background": 0, "Anterior": 1}}), encoding="utf-8")
    assert label_names_from_json(msd) == label_names_from_json(nnunet) == {
        0: "background", 1: "Anterior"}


def test_csv_layout_with_channels(tmp_path):
    for name in ("a_t1.nii.gz", "a_t2.nrrd", "a_seg.nii.gz", "b_t1.nii.gz", "b_t2.nrrd",
                 "b_seg.nii.gz"):
        (tmp_path / "files").mkdir(exist_ok=True)
        (tmp_path / "files" / name).write_bytes(b"x")
    (tmp_path / "dataset.csv").write_text(
        "case,image,label,t2\n"
        "a,files/a_t1.nii.gz,files/a_seg.nii.gz,files/a_t2.nrrd\n"
        ",files/b_t1.nii.gz,files/b_seg.nii.gz,files/b_t2.nrrd\n", encoding="utf-8")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "background", "1": "tumour"}),
                                          encoding="utf-8")
    for source in (tmp_path, tmp_path / "dataset.csv"):
        dataset = load_dataset(source)
        assert [c.name for c in dataset.cases] == ["a", "b_t1"]
        assert [p.name for p in dataset.cases[0].images] == ["a_t1.nii.gz", "a_t2.nrrd"]
        assert dataset.cases[1].label.name == "b_seg.nii.gz"
        assert dataset.modalities == ("MR", "MR")
        assert dataset.labels == {0: "background", 1: "tumour"}


def test_csv_errors_name_the_file(tmp_path):
    csv_path = tmp_path / "dataset.csv"
    csv_path.write_text("image,mask\nx.nii.gz,y.nii.gz\n", encoding="utf-8")
    with pytest.raises(MedsegError, match="dataset.csv: CSV needs the columns image and label"):
        load_dataset(csv_path)
    csv_path.write_text("image,label\nx.nii.gz,\n", encoding="utf-8")
    with pytest.raises(MedsegError, match="listed in dataset.csv but missing"):
        load_dataset(tmp_path)


def test_a_csv_column_of_notes_is_named_not_reported_as_images_missing(tmp_path):
    """Every further column is a channel: a 'note' column gave 'image missing' for each case
    (and 'same file as case a' for the others) without naming the column."""
    for name in ("a.nii.gz", "a_seg.nii.gz", "b.nii.gz", "b_seg.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    csv_path = tmp_path / "dataset.csv"
    csv_path.write_text("image,label,note\na.nii.gz,a_seg.nii.gz,left side\n"
                        "b.nii.gz,b_seg.nii.gz,left side\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=r"dataset.csv: no cell of column 'note' names an "
                                          r"existing file \(such as 'left side'; every "
                                          r"column but case"):
        load_dataset(tmp_path)
    csv_path.write_text("image,label,t2\na.nii.gz,a_seg.nii.gz,b.nii.gz\n"
                        "b.nii.gz,b_seg.nii.gz,gone.nii.gz\n", encoding="utf-8")
    with pytest.raises(MedsegError, match="listed in dataset.csv but missing: .*gone.nii.gz"):
        load_dataset(tmp_path)  # one file missing: that file named
    csv_path.write_text("image,label,note\nmoved/a.nii.gz,a_seg.nii.gz,x\n", encoding="utf-8")
    with pytest.raises(MedsegError, match="listed in dataset.csv but missing"):
        load_dataset(tmp_path)  # the dataset moved: not blamed on the note column


def test_a_csv_channel_whose_files_are_all_missing_is_not_called_a_note(tmp_path):
    """A t2 column whose files were not copied yet (every cell an image file name) was
    refused as a column of notes, naming no file, and `medseg check` listed nothing; a note
    longer than a file name may be was an OSError ('File name too long'), not the column."""
    from medseg.check import check_dataset

    for name in ("a.nii.gz", "a_seg.nii.gz", "b.nii.gz", "b_seg.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    csv_path = tmp_path / "dataset.csv"
    csv_path.write_text("image,label,t2\na.nii.gz,a_seg.nii.gz,t2/a.nii.gz\n"
                        "b.nii.gz,b_seg.nii.gz,t2/b.nii.gz\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=r"listed in dataset.csv but missing: .*a.nii.gz$"):
        load_dataset(tmp_path)
    missing = [p for p in check_dataset(tmp_path).problems if p.message == "image missing"]
    assert [p.file.name for p in missing] == ["a.nii.gz", "b.nii.gz"]
    note = "the patient moved during the scan; " * 10  # 350 characters, no file name
    csv_path.write_text(f"image,label,note\na.nii.gz,a_seg.nii.gz,{note}\n"
                        f"b.nii.gz,b_seg.nii.gz,short\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=r"no cell of column 'note' names an existing file"):
        load_dataset(tmp_path)


def test_folder_pairs_match_by_name_across_formats_and_dicom_folders(tmp_path):
    (tmp_path / "images" / "dicom_case").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "x.nrrd").write_bytes(b"x")
    (tmp_path / "labels" / "x.nii.gz").write_bytes(b"x")
    (tmp_path / "labels" / "dicom_case.nii.gz").write_bytes(b"x")
    (tmp_path / "labels" / "spare.nii.gz").write_bytes(b"x")  # ignored by training
    dataset = load_dataset(tmp_path)
    assert [(c.name, c.images[0].name, c.label.name) for c in dataset.cases] == [
        ("dicom_case", "dicom_case", "dicom_case.nii.gz"), ("x", "x.nrrd", "x.nii.gz")]


def test_nnunet_other_file_ending(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "a_0000.mha").write_bytes(b"x")
    (tmp_path / "labelsTr" / "a.mha").write_bytes(b"x")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".mha"}), encoding="utf-8")
    dataset = load_dataset(tmp_path)
    assert dataset.cases[0].images[0].name == "a_0000.mha" and dataset.modalities == ("CT",)


def test_paths_leaving_the_folder(tmp_path):
    from medseg.datasets import leaves_folder

    assert leaves_folder(tmp_path / "a" / ".." / ".." / "b.nii.gz", tmp_path)
    assert leaves_folder(tmp_path.parent / "b.nii.gz", tmp_path)
    assert not leaves_folder(tmp_path / "a" / ".." / "b.nii.gz", tmp_path)


def test_two_cases_of_one_name_are_refused(tmp_path):
    for site in ("siteA", "siteB"):
        (tmp_path / site).mkdir()
        for kind in ("img0", "lab0"):
            (tmp_path / site / f"{kind}.nii.gz").write_bytes(b"x")
    (tmp_path / "dataset.csv").write_text(
        "image,label\nsiteA/img0.nii.gz,siteA/lab0.nii.gz\nsiteB/img0.nii.gz,siteB/lab0.nii.gz\n",
        encoding="utf-8")
    with pytest.raises(MedsegError, match="are both named 'img0'"):
        load_dataset(tmp_path)


def test_two_files_of_one_case_in_folder_pairs_are_refused(tmp_path):
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "p0.nii.gz").write_bytes(b"x")
    (tmp_path / "images" / "p0.nii").write_bytes(b"x")
    with pytest.raises(MedsegError, match="p0.nii and p0.nii.gz are both case 'p0'"):
        load_dataset(tmp_path)


def test_nnunet_image_without_label_is_refused(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("a", "b"):
        (tmp_path / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"x")
    (tmp_path / "labelsTr" / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz"}), encoding="utf-8")
    with pytest.raises(MedsegError, match="b_0000.nii.gz: image without a label"):
        load_dataset(tmp_path)


def test_nnunet_v1_folder_is_read_as_nnunet(tmp_path):
    write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(16, 16, 8))
    for image in (tmp_path / "imagesTr").glob("*.nii.gz"):
        image.rename(image.with_name(image.name.replace(".nii.gz", "_0000.nii.gz")))
    dataset = load_dataset(tmp_path)  # auto: the CASE_0000 files say nnU-Net v1
    assert [c.images[0].name for c in dataset.cases] == ["phantom_000_0000.nii.gz",
                                                          "phantom_001_0000.nii.gz"]
    with pytest.raises(MedsegError, match="set dataset.layout: nnunet"):
        load_dataset(tmp_path, layout="msd")


@pytest.mark.parametrize(("modality", "message"), [
    ({"0": "T2", "1": "ADC"}, "lists 2 channels"),
    ({"T1": "MR"}, "must map channel numbers"),
])
def test_msd_channel_tables_are_checked(tmp_path, modality, message):
    write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(16, 16, 8))
    description = tmp_path / "dataset.json"
    data = json.loads(description.read_text(encoding="utf-8"))
    data["modality"] = modality
    description.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(MedsegError, match=message):
        load_dataset(tmp_path)


def test_workflow_labels_may_leave_out_background(phantom_dataset):
    dataset = load_dataset(phantom_dataset, labels={1: "liver", 2: "kidney", 3: "spine"})
    assert dataset.labels == {0: "background", 1: "liver", 2: "kidney", 3: "spine"}


def test_folder_pairs_labels_json_may_leave_out_background(tmp_path):
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "p0.nii.gz").write_bytes(b"x")
    (tmp_path / "labels.json").write_text(json.dumps({"1": "liver"}), encoding="utf-8")
    assert load_dataset(tmp_path).labels == {0: "background", 1: "liver"}


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "whole": [1, 2], "core": 2}, "region-based labels .* are not supported"),
    ({"background": 0, "liver": 1, "ignore": 5},
     r"'ignore' must be the id one past the structures' \(2, as nnU-Net requires\), not 5"),
    ({"background": 0, "ignore": 1}, "the label map names 'ignore' but no structure"),
])
def test_nnunet_label_kinds_medseg_cannot_train_are_named(tmp_path, labels, message):
    from medseg.datasets import label_names_from_json

    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": labels}), encoding="utf-8")
    with pytest.raises(MedsegError, match=f"dataset.json: {message}"):
        label_names_from_json(path)


@pytest.mark.parametrize("labels", [{"background": 0, "whole": [1, 2], "core": 2},
                                    {"background": 0, "liver": 1, "ignore": 5}])
def test_a_workflows_labels_replace_a_map_medseg_cannot_read(tmp_path, labels):
    """BraTS in nnU-Net's layout has regions in dataset.json over label files of plain ids:
    the workflow's dataset.labels, which the docs say replaces the map, was refused too."""
    write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(16, 16, 8))
    description = tmp_path / "dataset.json"
    data = json.loads(description.read_text(encoding="utf-8"))
    data["labels"] = labels
    description.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(MedsegError):
        load_dataset(tmp_path)
    dataset = load_dataset(tmp_path, labels={1: "liver", 2: "kidney", 3: "spine"})
    assert dataset.labels == {0: "background", 1: "liver", 2: "kidney", 3: "spine"}


@pytest.mark.parametrize("text, message", [
    # a second name for id 2 took the first's place: 'Posterior' vanished from the table
    ('{"labels": {"background": 0, "Anterior": 1, "Posterior": 2, "Tail": 2}}',
     "label ids must be unique; repeated: 2"),
    ('{"labels": {"1": "liver", "01": "spleen"}}', "label ids must be unique; repeated: 1"),
    # int(1.9) was 1: 'Posterior' overwrote 'Anterior'
    ('{"background": 0, "Anterior": 1, "Posterior": 1.9}',
     "label ids must be integers; 'Posterior' is 1.9"),
    ('{"labels": {"1": "liver", "1": "spleen"}}', "key '1' appears twice in one object"),
    # each of these raised a bare ValueError or OverflowError (exit 1, no file named)
    ('{"labels": {"background": 0, "liver": "--1"}}', "label ids must be integers"),
    ('{"labels": {"background": 0, "liver": NaN}}', "label ids must be integers"),
    ('{"labels": {"background": 0, "liver": Infinity}}', "label ids must be integers"),
    ('{"labels": {"\u00b2": "liver"}}', "label ids must be integers"),
    ('{"labels": {"0": "background", "1": " ", "2": "kidney"}}',
     "label names must not be empty \\(id 1\\)"),
    # str() named the structures "None" (written so into plan.json) and "{'name': 'liver'}"
    ('{"labels": {"0": "background", "1": "liver", "2": null}}',
     "label names must be text; id 2 is named null"),
    ('{"labels": {"1": {"name": "liver"}}}',
     'label names must be text; id 1 is named {"name": "liver"}'),
])
def test_label_maps_that_would_misname_structures_are_refused(tmp_path, text, message):
    path = tmp_path / "labels.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MedsegError, match=f"labels.json: {message}"):
        label_names_from_json(path)


def test_nnunet_label_ids_may_be_written_as_text_or_whole_floats(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{"labels": {"background": "0", "liver": "1", "spleen": 2.0}}',
                    encoding="utf-8")
    assert label_names_from_json(path) == {0: "background", 1: "liver", 2: "spleen"}


@pytest.mark.parametrize(("description", "message"), [
    ({"training": [], "modality": {"0": "MR"}}, "dataset.json: no 'labels' mapping found"),
    ({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}, "no 'labels' mapping found"),
    ([{"image": "a.nii.gz", "label": "b.nii.gz"}],
     "dataset.json: a dataset description must be one JSON object"),
    (None, "must be one JSON object {...}, got null"),
    ({"training": [], "modality": {}, "labels": {"0": "background", "1": "x"}},
     "dataset.json: 'modality' names no channel"),
])
def test_descriptions_that_do_not_describe_a_dataset_are_named(tmp_path, description, message):
    (tmp_path / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(MedsegError, match=message):
        load_dataset(tmp_path)


@pytest.mark.parametrize(("header", "message"), [
    ("image,label,image", "column 'image' appears twice in the header"),
    ("image,t2,label,", "column 4 of the header has no name"),
    # a header that forgot the second channel's column: that channel was dropped unsaid
    ("image,label", "line 2 has more cells than the header names \\('c.nii.gz' has no "
                    "column; a header name missing\\?\\)"),
])
def test_csv_headers_that_would_drop_a_channel_are_refused(tmp_path, header, message):
    csv_path = tmp_path / "dataset.csv"
    csv_path.write_text(f"{header}\na.nii.gz,b.nii.gz,c.nii.gz\n", encoding="utf-8")
    with pytest.raises(MedsegError, match=f"dataset.csv: {message}"):
        load_dataset(csv_path)


@pytest.mark.parametrize(("stray", "message"), [
    ("a_0001.nii.gz", r"a_0001.nii.gz: channel 0001 is not in dataset.json's channel_names "
                      r"\(0000\)"),
    ("a1.nii.gz", "a1.nii.gz: not named CASE_XXXX.nii.gz"),
])
def test_nnunet_files_no_case_reads_are_refused(tmp_path, stray, message):
    """A second channel left out of channel_names was dropped without a word."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "a_0000.nii.gz").write_bytes(b"x")
    (tmp_path / "imagesTr" / stray).write_bytes(b"x")
    (tmp_path / "labelsTr" / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"}, "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz"}), encoding="utf-8")
    with pytest.raises(MedsegError, match=message):
        load_dataset(tmp_path)
