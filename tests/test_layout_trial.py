"""What a layouts-and-planning trial found: a dataset.csv beside images/ + labels/ was
ignored (its further channels dropped), nnU-Net's numTraining was never checked and a case
whose files lost the file_ending vanished, nnU-Net's noNorm / rescale_to_0_1 channels were
z-scored (a 0/1 mask became all zeros), train took a duplicate case that check calls an
error, a channel off its case's grid was blamed on the label, and a huge plan.patch_size
crashed in an allocation."""

from __future__ import annotations

import dataclasses
import json
import shutil
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, TINY_TRAINING, as_sets, synthetic_fingerprint
from test_multichannel import stopped_two_channel_run, write_two_channel_dataset

from medseg.check import check_dataset
from medseg.cli import main
from medseg.config import PlanConfig
from medseg.datasets import list_dataset, load_dataset
from medseg.errors import MedsegError
from medseg.plan import Plan, fingerprint, make_plan
from medseg.transforms import IMAGE, case_dict, preprocessing


def test_auto_layout_reads_a_dataset_csv_before_the_folders(tmp_path):
    for folder in ("images", "t2", "labels"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "c0.nii.gz").write_bytes(b"x")
    (tmp_path / "dataset.csv").write_text("image,t2,label\nimages/c0.nii.gz,t2/c0.nii.gz,"
                                          "labels/c0.nii.gz\n", encoding="utf-8")
    listing = list_dataset(tmp_path)
    assert listing.layout == "csv" and len(listing.dataset.cases[0].images) == 2
    assert list_dataset(tmp_path, "folders").layout == "folders"  # still there when asked
    # a review: a dataset.csv of the patients' data beside the folders is not a description
    (tmp_path / "dataset.csv").write_text("case,age,sex\nc0,61,F\n", encoding="utf-8")
    assert list_dataset(tmp_path).layout == "folders"


def test_the_layout_found_is_saved_for_a_resume(phantom_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 *as_sets([f"dataset.path={phantom_dataset}", "dataset.layout=auto",
                           *TINY_TRAINING])]) == 0
    assert "layout: msd" in (run / "workflow.yaml").read_text(encoding="utf-8")


def test_nnunet_num_training_is_checked(tmp_path):
    write_two_channel_dataset(tmp_path, n_cases=3)
    description = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    description["numTraining"] = 4
    (tmp_path / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    message = "'numTraining' is 4, but labelsTr holds .nii.gz labels for 3 cases"
    with pytest.raises(MedsegError, match=f"dataset.json: {message}"):
        load_dataset(tmp_path)
    rows = [(p.severity, p.message) for p in check_dataset(tmp_path).problems]
    assert ("error", message) in rows


def test_an_nnunet_case_whose_files_lost_the_file_ending_is_named(tmp_path):
    write_two_channel_dataset(tmp_path, n_cases=3)
    for path in [*tmp_path.glob("imagesTr/case2_*.nii.gz"), tmp_path / "labelsTr/case2.nii.gz"]:
        nib.save(nib.load(path), str(path).removesuffix(".gz"))
        path.unlink()
    with pytest.raises(MedsegError, match="'numTraining' is 3, but labelsTr holds .nii.gz "
                                          "labels for 2 cases"):
        load_dataset(tmp_path)
    rows = {(p.severity, p.file.name) for p in check_dataset(tmp_path).problems
            if "not of dataset.json's file_ending '.nii.gz'" in p.message}
    assert rows == {("error", "case2_0000.nii"), ("error", "case2_0001.nii"),
                    ("warning", "case2.nii")}


def test_an_msd_num_training_off_its_list_is_only_a_warning(phantom_dataset, tmp_path):
    root = tmp_path / "msd"
    shutil.copytree(phantom_dataset, root)
    description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    description["numTraining"] = 99
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    assert len(load_dataset(root).cases) == 6
    rows = [(p.severity, p.message) for p in check_dataset(root).problems]
    assert ("warning", "'numTraining' is 99, but 'training' lists 6 cases") in rows


def test_nnunet_channel_names_choose_the_normalization(tmp_path):
    write_two_channel_dataset(tmp_path, n_cases=2)
    description = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    assert load_dataset(tmp_path).modalities == ("CT", "MR")
    description["channel_names"] = {"0": "rescale_to_0_1", "1": "noNorm"}
    (tmp_path / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    assert load_dataset(tmp_path).modalities == ("rescale_to_0_1", "noNorm")
    single = synthetic_fingerprint([[1.0, 1.0, 1.0]], [[32, 32, 32]])
    fp = dataclasses.replace(single, modalities=["noNorm", "rescale_to_0_1"],
                             intensity=single.intensity * 2)
    plan = make_plan(fp, PlanConfig())
    assert plan.normalization == [{"scheme": "none"}, {"scheme": "rescale_to_0_1"}]
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    mask = np.zeros((8, 8, 8), np.float32)
    mask[2:5, 2:5, 2:5] = 1.0  # z-scored over its nonzero voxels, it became all zeros
    for channel in range(2):
        nib.save(nib.Nifti1Image(mask * 7.0 if channel else mask + 3.0, np.eye(4)),
                 str(tmp_path / f"c{channel}.nii.gz"))
    plan = Plan(**{**plan.to_json(), "target_spacing": [1.0, 1.0, 1.0]})
    image = preprocessing(plan, with_label=False)(case_dict([tmp_path / "c1.nii.gz",
                                                             tmp_path / "c0.nii.gz"]))[IMAGE]
    assert torch.equal(torch.unique(image[0]), torch.tensor([0.0, 7.0]))  # noNorm: as is
    assert torch.equal(torch.unique(image[1]), torch.tensor([0.0, 1.0]))  # 3..4 -> 0..1
    rgb = Plan(**{**plan.to_json(), "in_channels": 1, "modalities": ["rgb_to_0_1"],
                  "normalization": [{"scheme": "rgb_to_0_1"}]})
    nib.save(nib.Nifti1Image(mask * 255.0, np.eye(4)), str(tmp_path / "rgb.nii.gz"))
    image = preprocessing(rgb, with_label=False)(case_dict([tmp_path / "rgb.nii.gz"]))[IMAGE]
    assert torch.equal(torch.unique(image[0]), torch.tensor([0.0, 1.0]))  # 0..255 -> 0..1


def test_training_refuses_a_duplicate_case_naming_it(tmp_path):
    write_two_channel_dataset(tmp_path, n_cases=3)
    for channel in (0, 1):
        shutil.copy(tmp_path / f"imagesTr/case0_{channel:04d}.nii.gz",
                    tmp_path / f"imagesTr/case3_{channel:04d}.nii.gz")
    shutil.copy(tmp_path / "labelsTr/case0.nii.gz", tmp_path / "labelsTr/case3.nii.gz")
    description = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    (tmp_path / "dataset.json").write_text(json.dumps({**description, "numTraining": 4}),
                                           encoding="utf-8")
    with pytest.raises(MedsegError, match=r"case3_0000.nii.gz: same voxels as case case0 in "
                                          r"every channel and the label: a duplicate case"):
        fingerprint(load_dataset(tmp_path), progress=False)


def test_one_scan_with_two_raters_labels_is_two_cases_that_check_points_out(tmp_path):
    """A review: the duplicate refusal stopped multi-rater collections (LIDC, QUBIQ), and
    check hashed the stored type where training hashes float32 (an int16 case beside its
    float32 copy: training refused, check passed)."""
    write_two_channel_dataset(tmp_path, n_cases=3)
    for channel in (0, 1):  # case0 again, as float64, with another rater's label
        image = nib.load(tmp_path / f"imagesTr/case0_{channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj, np.float64), image.affine),
                 str(tmp_path / f"imagesTr/case3_{channel:04d}.nii.gz"))
    label = nib.load(tmp_path / "labelsTr/case0.nii.gz")
    other_rater = np.asarray(label.dataobj).copy()
    other_rater[other_rater == 2] = 0
    nib.save(nib.Nifti1Image(other_rater, label.affine), str(tmp_path / "labelsTr/case3.nii.gz"))
    description = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    (tmp_path / "dataset.json").write_text(json.dumps({**description, "numTraining": 4}),
                                           encoding="utf-8")
    fingerprint(load_dataset(tmp_path), progress=False)  # not refused
    rows = [(p.severity, p.case, p.message) for p in check_dataset(tmp_path).problems
            if "case0" in p.message]
    assert rows == [("warning", "case3", "same image voxels as case case0, with another label "
                                         "(two raters?): keep them in one fold "
                                         "(train.splits_file), or one may be trained on and the "
                                         "other validated on")]
    nib.save(label, str(tmp_path / "labelsTr/case3.nii.gz"))  # the same label: a duplicate
    assert [p.severity for p in check_dataset(tmp_path).problems
            if "case0" in p.message] == ["error"]
    # no label to compare (a CSV's empty label cell): neither a duplicate nor 'another label'
    (tmp_path / "labelsTr/case3.nii.gz").write_bytes(b"")
    rows = [(p.severity, p.message) for p in check_dataset(tmp_path).problems
            if p.case == "case3"]
    assert ("warning", "same image voxels as case case0 (a duplicate, or one scan annotated "
                       "twice: the labels could not both be read to tell)") in rows, rows
    assert not any("another label" in message for _, message in rows)


def test_a_channel_off_its_cases_grid_is_named_against_channel_0(tmp_path):
    write_two_channel_dataset(tmp_path, n_cases=2)
    path = tmp_path / "imagesTr" / "case1_0001.nii.gz"
    image = nib.load(path)
    moved = image.affine.copy()
    moved[2, 2] *= 1.5
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), moved), str(path))
    with pytest.raises(MedsegError, match=r"case1_0001.nii.gz: not on the grid of "
                                          r"case1_0000.nii.gz, the case's first channel"):
        fingerprint(load_dataset(tmp_path), progress=False)


def test_a_patch_beyond_2_to_the_31_voxels_is_refused_naming_the_key():
    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]], [[64, 64, 64]])
    with pytest.raises(MedsegError, match=r"'plan.patch_size' makes patches of \[4000, 4000, "
                                          r"4000\] \(batch 2\): 1.28e\+11 voxels per training "
                                          r"step"):
        make_plan(fp, PlanConfig(patch_size=[4000, 4000, 4000]))


def test_a_file_ending_without_its_dot_is_named(tmp_path):
    write_two_channel_dataset(tmp_path, n_cases=2)
    description = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    (tmp_path / "dataset.json").write_text(json.dumps({**description, "file_ending": "nii.gz"}),
                                           encoding="utf-8")
    with pytest.raises(MedsegError, match=r"dataset.json: 'file_ending' must start with a dot "
                                          r"\('.nii.gz'\), not 'nii.gz'"):
        load_dataset(tmp_path)


def test_a_link_to_nowhere_is_named_as_one(phantom_dataset, tmp_path):
    root = tmp_path / "msd"
    shutil.copytree(phantom_dataset, root)
    label = root / "labelsTr" / "phantom_001.nii.gz"
    label.unlink()
    label.symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(MedsegError, match=r"missing: .*phantom_001.nii.gz \(a link to a file "
                                          r"that is not there\)"):
        load_dataset(root)
    rows = [p.message for p in check_dataset(root).problems if p.file == label]
    assert rows == ["label missing: a link to a file that is not there"]


def test_folder_pairs_match_accented_names_in_either_unicode_form(tmp_path, monkeypatch):
    """The listing is faked, so that the test runs where file names are ASCII (LC_ALL=C)."""
    names = {"images": unicodedata.normalize("NFD", "caf\u00e9.nii.gz"),
             "labels": unicodedata.normalize("NFC", "caf\u00e9.nii.gz")}
    for folder in names:
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(Path, "iterdir", lambda folder: iter([folder / names[folder.name]]))
    listing = list_dataset(tmp_path)
    assert [case.name for case in listing.dataset.cases] == ["caf\u00e9"]
    assert listing.orphans == ()


def test_a_run_planned_when_nonorm_read_as_mr_resumes(tmp_path, capsys):
    """A review: a run whose plan.json says MR for a channel the dataset now names noNorm
    (every non-CT name was MR before) was refused as another dataset on --resume."""
    data, run = stopped_two_channel_run(tmp_path)
    description = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    description["channel_names"] = {"0": "CT", "1": "noNorm"}
    (data / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    assert main(["train", "--resume", str(run)]) == 0
    description["channel_names"] = {"0": "noNorm", "1": "T2"}  # CT is another channel
    (data / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--fold", "1"]) == 2
    assert "differ from the run's ['CT', 'MR']" in capsys.readouterr().err


def test_splits_and_cases_name_accented_cases_alike(tmp_path):
    """A review: with folder names made NFC, a splits file of macOS (NFD) names no longer
    matched its cases."""
    from medseg.datasets import Case, read_splits

    decomposed = unicodedata.normalize("NFD", "caf\u00e9")
    assert Case(decomposed, ()).name == "caf\u00e9"
    path = tmp_path / "splits.json"
    path.write_text(json.dumps([{"train": [decomposed], "val": ["b"]}]), encoding="utf-8")
    assert read_splits(path)[0]["train"] == ["caf\u00e9"]


def test_the_digest_is_one_for_one_voxels_however_stored_and_chunked(monkeypatch):
    import medseg.io as io

    values = np.random.default_rng(0).integers(-1000, 2000, (7, 5, 3)).astype(np.int16)
    fortran = np.asfortranarray(values)
    digest = io.voxels_digest(fortran)
    assert io.voxels_digest(fortran.astype(np.float32)) == digest  # int16 and its float copy
    monkeypatch.setattr(io, "DIGEST_CHUNK_BYTES", 1)  # a slab per row
    assert io.voxels_digest(fortran) == digest
    assert io.voxels_digest(values) == io.voxels_digest(values.astype(np.float32))
    assert io.voxels_digest(values + 1) != io.voxels_digest(values)
