"""Session 26 (h): masks whose names differ only in letter case, on file systems that fold
case (macOS's and Windows' by default)."""
from __future__ import annotations

import unicodedata

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SHAPE, SMALL_SPACING, UTF8_FILE_NAMES

import medseg.predict
from medseg.cli import main
from medseg.errors import MedsegError
from medseg.fileio import names_fold_case
from medseg.phantoms import make_phantom


def _scan(path) -> None:
    phantom = make_phantom(1, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine), path)


def test_the_probe_says_what_the_file_system_does_and_leaves_nothing(tmp_path):
    (tmp_path / "probe").write_text("x", encoding="utf-8")
    folds = (tmp_path / "PROBE").exists()
    (tmp_path / "probe").unlink()
    assert names_fold_case(tmp_path / "not" / "made") is folds
    assert list(tmp_path.iterdir()) == []  # the probe removed, no folder made


def test_masks_differing_in_case_are_refused_where_the_output_folds_case(
        trained_run, tmp_path, capsys, monkeypatch):
    first, second = tmp_path / "in1" / "Case_a.nii.gz", tmp_path / "in2" / "case_A.nii.gz"
    for scan in (first, second):
        scan.parent.mkdir()
        _scan(scan)
    out = tmp_path / "out"
    args = ["predict", "--model", str(trained_run), "--output", str(out),
            "--input", str(first), str(second)]
    monkeypatch.setattr(medseg.predict, "names_fold_case", lambda folder: True)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("would both be written as Case_a.nii.gz and case_A.nii.gz, one file on this "
            "file system") in err
    assert not out.exists()  # refused before any work
    monkeypatch.setattr(medseg.predict, "names_fold_case", lambda folder: False)
    args[-2:] = [str(first), str(second)]
    assert main(args) == 0  # a file system that tells them apart writes both
    assert sorted(path.name for path in out.iterdir()) == ["Case_a.nii.gz", "case_A.nii.gz"]


@UTF8_FILE_NAMES
def test_the_two_unicode_spellings_of_a_name_clash_where_the_output_folds_case(
        tmp_path, monkeypatch):
    named = [(unicodedata.normalize(form, "café.nii.gz"), (tmp_path / form / "café.nii.gz",))
             for form in ("NFC", "NFD")]
    monkeypatch.setattr(medseg.predict, "names_fold_case", lambda folder: True)
    with pytest.raises(MedsegError, match="one file on this file system"):
        medseg.predict._refuse_clashing_outputs(named, tmp_path / "out")
    monkeypatch.setattr(medseg.predict, "names_fold_case", lambda folder: False)
    medseg.predict._refuse_clashing_outputs(named, tmp_path / "out")  # told apart


def test_no_probe_file_is_made_where_no_two_names_fold_to_one(tmp_path, monkeypatch):
    def probe(folder):
        raise AssertionError("probed")

    monkeypatch.setattr(medseg.predict, "names_fold_case", probe)
    named = [(name, (tmp_path / name,)) for name in ("a.nii.gz", "b.nii.gz")]
    medseg.predict._refuse_clashing_outputs(named, tmp_path / "out")
    with pytest.raises(AssertionError, match="probed"):
        medseg.predict._refuse_clashing_outputs([*named, ("A.nii.gz", (tmp_path / "A",))],
                                                tmp_path / "out")


@UTF8_FILE_NAMES
def test_names_the_file_system_tells_apart_are_not_folded_to_one(tmp_path, monkeypatch):
    """macOS's and Windows' case folding maps one letter to one: 'Straße' and 'STRASSE' are
    two files there (Python's casefold() made them one name and refused the batch)."""
    named = [(name, (tmp_path / name,)) for name in ("Stra\u00dfe.nii.gz", "STRASSE.nii.gz")]
    monkeypatch.setattr(medseg.predict, "names_fold_case", lambda folder: True)
    medseg.predict._refuse_clashing_outputs(named, tmp_path / "out")
