"""Inputs are told apart by their names, not by the files they lead to: two links to one scan
are two cases (or two channels of one), while one file named twice stays one input."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.predict import collect_inputs, group_channels, output_name


def scan(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(path))
    return path


def test_two_links_to_one_scan_are_two_cases(tmp_path):
    original = scan(tmp_path / "store" / "hippocampus_001.nii.gz")
    folder = tmp_path / "links"
    folder.mkdir()
    for name in ("patientA.nii.gz", "patientB.nii.gz"):
        (folder / name).symlink_to(original)
    found = collect_inputs([folder])
    assert [p.name for p in found] == ["patientA.nii.gz", "patientB.nii.gz"]
    assert [output_name(p) for p in found] == ["patientA.nii.gz", "patientB.nii.gz"]
    # in the other order, the same two
    reversed_order = collect_inputs([folder / "patientB.nii.gz", folder / "patientA.nii.gz"])
    assert [p.name for p in reversed_order] == ["patientB.nii.gz", "patientA.nii.gz"]


def test_a_link_to_an_input_given_before_it_is_a_case_of_its_own(tmp_path):
    first = scan(tmp_path / "a.nii.gz")
    (tmp_path / "nn").mkdir()
    (tmp_path / "nn" / "case_0000.nii.gz").symlink_to(first)
    found = collect_inputs([first, tmp_path / "nn"])
    assert [output_name(p) for p in found] == ["a.nii.gz", "case.nii.gz"]


def test_one_file_named_twice_is_one_input(tmp_path):
    file = scan(tmp_path / "scans" / "a.nii.gz")
    (tmp_path / "via").symlink_to(tmp_path / "scans")  # the same folder under another name
    relative = Path(os.path.relpath(file, Path.cwd()))
    found = collect_inputs([tmp_path / "scans", file, relative, tmp_path / "via" / "a.nii.gz",
                            tmp_path / "scans" / ".." / "scans" / "a.nii.gz"])
    assert found == [file]


def test_one_scan_linked_as_two_channels_makes_one_two_channel_case(tmp_path):
    original = scan(tmp_path / "t1.nii.gz")
    folder = tmp_path / "mc"
    folder.mkdir()
    for name in ("p1_0000.nii.gz", "p1_0001.nii.gz"):
        (folder / name).symlink_to(original)
    cases = group_channels(collect_inputs([folder]), channels=2)
    assert [tuple(p.name for p in case) for case in cases] == [("p1_0000.nii.gz",
                                                                "p1_0001.nii.gz")]
