"""Session 27 (O): segmenting new scans end to end, DICOM series and ITK volumes."""
from __future__ import annotations

import gzip

import numpy as np
import pydicom
import pytest
from dicom_factory import write_series

from medseg.dicom_seg import seg_source
from medseg.errors import MedsegError
from medseg.io import read_volume


def test_uneven_spacing_names_where_the_spacing_changes_and_how_many_gaps_are_off(tmp_path):
    # 4 mm gaps, then 7 mm from slice 7 on (as the GE head CT of dcm_qa_ct): the last gap,
    # 7.01 mm by rounding, was named alone, as if one slice were missing near the end
    gaps = [4.0] * 6 + [7.0] * 4 + [7.01]
    depths = np.concatenate([[0.0], np.cumsum(gaps)])
    stored = np.random.default_rng(0).integers(0, 3000, (6, 5, len(depths))).astype(np.uint16)
    write_series(tmp_path, stored, [[0.0, 0.0, float(z)] for z in depths])
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    message = str(caught.value)
    assert ("a gap of 7.00 mm between slices 7 and 8 of 12 (IM0006.dcm and IM0007.dcm, at "
            "24.00 mm along the slice normal) where the median gap is 4.00 mm") in message
    assert "4 more of the 11 gaps are off the median too, up to 7.01 mm" in message


def test_one_uneven_gap_is_named_without_a_count(tmp_path):
    stored = np.random.default_rng(1).integers(0, 3000, (6, 5, 4)).astype(np.uint16)
    write_series(tmp_path, stored, [[0.0, 0.0, z] for z in (0.0, 2.5, 5.0, 10.0)])
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    assert "gap of 5.00 mm between slices 3 and 4 of 4" in str(caught.value)
    assert "more of the" not in str(caught.value)


def test_series_folders_deeper_than_the_folder_given_are_named_in_the_hint(tmp_path):
    # a CD export: DICOM/PA0/ST0/SE0, SE1; `--input FOLDER/*` of the folder given (or of
    # DICOM) gave one folder of both series again
    study = tmp_path / "DICOM" / "PA000000" / "ST000000"
    for number, uid in enumerate(("1.2.3.4.1", "1.2.3.4.2")):
        stored = np.random.default_rng(number).integers(0, 3000, (6, 5, 3)).astype(np.uint16)
        write_series(study / f"SE00000{number}", stored,
                     [[0.0, 0.0, 2.5 * k] for k in range(3)], series_uid=uid)
    for given in (tmp_path, tmp_path / "DICOM"):
        with pytest.raises(MedsegError) as caught:
            read_volume(given)
        assert f"(--input {study}/*)" in str(caught.value)


def test_series_folders_of_other_parents_get_their_common_folder(tmp_path):
    for number, patient in enumerate(("p1", "p2")):
        stored = np.random.default_rng(number).integers(0, 3000, (6, 5, 3)).astype(np.uint16)
        write_series(tmp_path / patient / "CT", stored, [[0.0, 0.0, 2.5 * k] for k in range(3)],
                     series_uid=f"1.2.3.4.{number}")
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    assert f"(--input {tmp_path}/*)" in str(caught.value)


def test_a_slice_linked_to_nowhere_is_refused_not_left_out(tmp_path):
    # a series folder of links into an archive, one of whose targets is gone (a share not
    # mounted): the last slice was left out unsaid, the volume a slice short
    stored = np.random.default_rng(2).integers(0, 3000, (6, 5, 4)).astype(np.uint16)
    slices = write_series(tmp_path / "archive", stored, [[0.0, 0.0, 2.5 * k] for k in range(4)])
    series = tmp_path / "series"
    series.mkdir()
    for path in slices:
        (series / path.name).symlink_to(path)
    slices[-1].unlink()
    with pytest.raises(MedsegError) as caught:
        read_volume(series)
    message = str(caught.value)
    assert message.startswith(f"{series / slices[-1].name}: cannot be read (it links to ")
    assert "which does not exist" in message and "would lack this slice" in message
    # a link to nowhere not named like a slice (a note) is no slice: skipped
    (series / slices[-1].name).unlink()
    (series / "notes.txt").symlink_to(tmp_path / "gone.txt")
    assert read_volume(series).spatial_shape == (5, 6, 3)


def test_copies_of_an_anonymized_series_are_named_copies_not_echoes(tmp_path):
    # the SOPInstanceUID blanked in the data set and kept in the file meta, as in
    # TotalSegmentator's CT series: a second copy of it in a subfolder was said to be
    # "several volumes (echoes, phases or time points)"
    stored = np.random.default_rng(3).integers(0, 3000, (6, 5, 3)).astype(np.uint16)
    positions = [[0.0, 0.0, 2.5 * k] for k in range(3)]
    for folder in (tmp_path, tmp_path / "backup"):
        write_series(folder, stored, positions)
    for path in sorted(tmp_path.rglob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID = ""
        dataset.save_as(path)
    for path in sorted((tmp_path / "backup").iterdir()):  # the same images, copied
        twin = pydicom.dcmread(tmp_path / path.name)
        dataset = pydicom.dcmread(path)
        dataset.file_meta.MediaStorageSOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID
        dataset.save_as(path)
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    assert "are copies of one image (the same SOPInstanceUID)" in str(caught.value)
    assert "echoes" not in str(caught.value)


def _gzipped(path) -> None:
    packed = path.with_name(path.name + ".gz")
    packed.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()


def test_a_gzipped_slice_beside_the_series_is_refused_not_left_out(tmp_path):
    stored = np.random.default_rng(4).integers(0, 3000, (6, 5, 4)).astype(np.uint16)
    slices = write_series(tmp_path, stored, [[0.0, 0.0, 2.5 * k] for k in range(4)])
    _gzipped(slices[-1])  # the last slice: the series was read 3 slices long, unsaid
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    assert str(caught.value).startswith(f"{slices[-1]}.gz: a DICOM slice compressed as a file")
    assert "would lack it" in str(caught.value)


def test_a_series_of_gzipped_slices_is_named_as_such(tmp_path):
    stored = np.random.default_rng(5).integers(0, 3000, (6, 5, 3)).astype(np.uint16)
    for path in write_series(tmp_path, stored, [[0.0, 0.0, 2.5 * k] for k in range(3)]):
        _gzipped(path)
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    assert ("3 compressed DICOM file(s), e.g. IM0000.dcm.gz: medseg does not open compressed "
            "DICOM files, unpack them first") in str(caught.value)


def test_dicom_seg_names_a_tilted_series_tilt_before_its_missing_frame_of_reference(tmp_path):
    # as without --dicom-seg: the series' own problem first (it was refused for the missing
    # FrameOfReferenceUID, its tilt left for the next try)
    stored = np.random.default_rng(6).integers(0, 3000, (6, 5, 4)).astype(np.uint16)
    paths = write_series(tmp_path, stored, [[0.0, 0.6 * k, 2.5 * k] for k in range(4)])
    for path in paths:
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(path)
    with pytest.raises(MedsegError, match="gantry tilt of 13.5 degrees"):
        seg_source(tmp_path, None, False)
