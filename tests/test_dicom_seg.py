"""DICOM SEG output (`medseg predict --dicom-seg`): each SEG frame lies on the source image
it refers to and holds the NIfTI mask's slice; series a SEG cannot refer to are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_factory import axial_positions, enhanced_file, write_series, write_volume_as_dicom
from helpers import SMALL_SHAPE, SMALL_SPACING, requires_shared
from pydicom.uid import EnhancedCTImageStorage

from medseg.cli import main
from medseg.config import PredictConfig
from medseg.dicom_seg import build_seg, seg_path, seg_source, write_seg
from medseg.errors import MedsegError
from medseg.phantoms import make_phantom
from medseg.predict import load_predictor, predict_paths

LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "spine"}


def _labels_by_source_image(seg_file: Path, folder: Path) -> dict[str, np.ndarray]:
    """The SEG's label map of each source image, by SOPInstanceUID: (rows, columns)."""
    seg = hd.seg.segread(seg_file)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            for f in sorted(folder.iterdir())]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True,
                                               skip_overlap_checks=True)
    return dict(zip(uids, pixels, strict=True))


def _mask_by_source_image(mask: np.ndarray, folder: Path) -> dict[str, np.ndarray]:
    """The mask's slice through each source image: a slice lies where its position puts it
    along the normal, so slice k of the volume is the k-th image by depth."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    normal = np.cross(*np.reshape(np.asarray(headers[0].ImageOrientationPatient, float),
                                  (2, 3)))
    by_depth = sorted(headers, key=lambda h: np.asarray(h.ImagePositionPatient, float) @ normal)
    return {h.SOPInstanceUID: mask[:, :, k].T for k, h in enumerate(by_depth)}


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory) -> Path:
    """A phantom as an oblique, flipped CT series whose file names run against its slices."""
    from test_predict import lps_oblique

    phantom = make_phantom(11, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    folder = tmp_path_factory.mktemp("dicom") / "ct_case"
    write_volume_as_dicom(folder, phantom.image, lps_oblique(SMALL_SPACING))
    files = sorted(folder.iterdir())
    for file, name in zip(files, reversed(files), strict=True):  # names against the order
        file.rename(file.with_name(f"tmp_{name.name}"))
    for file in folder.iterdir():
        file.rename(file.with_name(file.name.removeprefix("tmp_")))
    return folder


def test_predict_writes_a_seg_whose_frames_are_the_mask_on_each_source_image(
        trained_run, dicom_case, tmp_path):
    out = tmp_path / "out"
    results = predict_paths(load_predictor(trained_run), [dicom_case], out, PredictConfig(),
                            dicom_seg=True)
    assert [r.error for r in results] == [None]
    mask = np.asarray(nib.load(out / "ct_case.nii.gz").dataobj)
    assert len(np.unique(mask)) > 1, "the tiny model segments something"
    seg_file = out / "ct_case.seg.dcm"
    found = _labels_by_source_image(seg_file, dicom_case)
    expected = _mask_by_source_image(mask, dicom_case)
    assert found.keys() == expected.keys()
    for uid, labels in expected.items():
        np.testing.assert_array_equal(found[uid], labels)
    seg = pydicom.dcmread(seg_file)
    source = pydicom.dcmread(next(dicom_case.iterdir()), stop_before_pixels=True)
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == \
        [(1, "liver"), (2, "kidney"), (3, "spine")]
    assert not list(out.glob(".*part*")), "no temporary file is left"


def test_a_case_is_done_only_when_its_seg_is_written_too(trained_run, dicom_case, tmp_path):
    out = tmp_path / "out"
    predictor = load_predictor(trained_run)
    predict_paths(predictor, [dicom_case], out, PredictConfig())
    assert not seg_path(out / "ct_case.nii.gz").exists()
    again = predict_paths(predictor, [dicom_case], out, PredictConfig(), dicom_seg=True)
    assert not again[0].skipped and again[0].error is None
    assert (out / "ct_case.seg.dcm").is_file()
    third = predict_paths(predictor, [dicom_case], out, PredictConfig(), dicom_seg=True)
    assert third[0].skipped


def test_a_series_without_a_frame_of_reference_is_refused_before_any_prediction(
        trained_run, dicom_case, tmp_path, capsys):
    folder = tmp_path / "anonymized"
    shutil.copytree(dicom_case, folder)
    for file in folder.iterdir():
        header = pydicom.dcmread(file)
        del header.FrameOfReferenceUID
        header.save_as(file)
    out = tmp_path / "out"
    results = predict_paths(load_predictor(trained_run), [folder], out, PredictConfig(),
                            dicom_seg=True)
    assert "no DICOM SEG: the image has no FrameOfReferenceUID" in results[0].error
    assert str(folder) in results[0].error
    assert not out.exists() or not any(out.iterdir()), "nothing is written for the case"
    assert "\n" not in results[0].error


def test_volume_inputs_get_a_nifti_mask_and_a_note(trained_run, tmp_path, capsys):
    phantom = make_phantom(3, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), np.diag([*SMALL_SPACING, 1])),
             scan)
    out = tmp_path / "out"
    results = predict_paths(load_predictor(trained_run), [scan], out, PredictConfig(),
                            dicom_seg=True)
    assert results[0].error is None
    assert sorted(p.name for p in out.iterdir()) == ["scan.nii.gz"]
    assert "--dicom-seg: 1 input(s) are volume files" in capsys.readouterr().err


def test_cli_dicom_seg(trained_run, dicom_case, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(trained_run), "--input", str(dicom_case),
                 "--output", str(out), "--dicom-seg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ct_case.nii.gz", "ct_case.seg.dcm"]


def test_a_multiframe_source_gets_one_seg_frame_per_source_frame(tmp_path):
    rng = np.random.default_rng(0)
    positions = axial_positions(5)[::-1]  # frames stored from the top down
    source_file = enhanced_file(tmp_path / "enhanced.dcm",
                                rng.integers(0, 2000, (6, 7, 5)).astype(np.uint16), positions)
    header = pydicom.dcmread(source_file)  # the factory's file is a CT Image, as older tests need
    header.SOPClassUID = header.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    header.save_as(source_file)
    source = seg_source(source_file, None, False)
    mask = np.zeros((7, 6, 5), np.uint8)  # (columns, rows, slices), slices by depth
    for k in range(5):
        mask[k, :, k] = 1 + k % 3
    target = tmp_path / "enhanced.seg.dcm"
    write_seg(build_seg(mask, source, LABELS), target)
    seg = hd.seg.segread(target)
    uid = pydicom.dcmread(source_file, stop_before_pixels=True).SOPInstanceUID
    frames = seg.get_pixels_by_source_frame(uid, list(range(1, 6)), combine_segments=True,
                                            skip_overlap_checks=True)
    for frame_number in range(5):  # frame f lies at positions[f]: slice 4 - f by depth
        np.testing.assert_array_equal(frames[frame_number], mask[:, :, 4 - frame_number].T)


def test_a_mask_of_another_shape_is_refused(tmp_path):
    write_series(tmp_path / "s", np.zeros((6, 7, 3), np.uint16), axial_positions(3))
    source = seg_source(tmp_path / "s", None, False)
    with pytest.raises(MedsegError, match=r"/s: no DICOM SEG: mask shape \(6, 7, 3\) is "
                                          r"not the series'"):
        build_seg(np.zeros((6, 7, 3), np.uint8), source, LABELS)


def test_real_series_seg_round_trip_and_anonymized_refusal(tmp_path):
    """A real GE MR series: its anonymized copy has no FrameOfReferenceUID and is refused;
    with one added (to a copy), the SEG's frames hold the mask on each image."""
    original = requires_shared("dicom", "ge_mr")
    with pytest.raises(MedsegError, match="has no FrameOfReferenceUID"):
        seg_source(original, None, False)
    folder = tmp_path / "ge_mr"
    folder.mkdir()
    for file in sorted(original.rglob("*")):
        if not file.is_file() or file.name.startswith("reference"):
            continue
        header = pydicom.dcmread(file)
        header.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.511.9"
        header.save_as(folder / file.name)
    source = seg_source(folder, None, False)
    rng = np.random.default_rng(1)
    shape = (source.columns, source.rows, len(source.slices))
    mask = rng.integers(0, 3, shape).astype(np.uint8)
    target = tmp_path / "ge_mr.seg.dcm"
    write_seg(build_seg(mask, source, {0: "background", 1: "a", 2: "b"}), target)
    found = _labels_by_source_image(target, folder)
    for uid, labels in _mask_by_source_image(mask, folder).items():
        np.testing.assert_array_equal(found[uid], labels)


def test_real_multiframe_series_seg_round_trip(tmp_path):
    """A real Siemens enhanced MR file (FrameOfReferenceUID added to a copy): one SEG frame
    per source frame, each the mask's slice at that frame's depth."""
    original = requires_shared("dicom", "siemens_multiframe")
    file = next(f for f in original.rglob("*") if f.is_file() and "reference" not in f.name)
    copy = tmp_path / "mf.dcm"
    header = pydicom.dcmread(file)
    header.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.511.8"
    header.save_as(copy)
    source = seg_source(copy, None, False)
    shape = (source.columns, source.rows, len(source.slices))
    mask = np.random.default_rng(2).integers(0, 2, shape).astype(np.uint8)
    target = tmp_path / "mf.seg.dcm"
    write_seg(build_seg(mask, source, {0: "background", 1: "a"}), target)
    frames = hd.seg.segread(target).get_pixels_by_source_frame(
        header.SOPInstanceUID, list(range(1, len(source.slices) + 1)), combine_segments=True,
        skip_overlap_checks=True)
    for k, (_, frame) in enumerate(source.slices):
        np.testing.assert_array_equal(frames[frame], mask[:, :, k].T)


def test_an_empty_mask_gets_one_blank_frame_not_one_per_segment_and_slice(tmp_path):
    """highdicom keeps every frame of an all-empty mask: 42 structures x 150 slices of
    blank frames were 195 MB."""
    write_series(tmp_path / "s", np.zeros((6, 7, 5), np.uint16), axial_positions(5))
    source = seg_source(tmp_path / "s", None, False)
    seg = build_seg(np.zeros((7, 6, 5), np.uint8), source, LABELS)
    # a blank frame per segment, on the first image: every structure was looked for
    assert int(seg.NumberOfFrames) == 3
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2, 3]
    write_seg(seg, tmp_path / "empty.seg.dcm")
    assert hd.seg.segread(tmp_path / "empty.seg.dcm").number_of_frames == 3


def test_segment_labels_are_valid_distinct_lo_values_in_any_script(tmp_path):
    """Non-Latin-1 names turned into '?' in the source's character set; a backslash split a
    name into two values; long names alike in 64 characters came out the same."""
    write_series(tmp_path / "s", np.zeros((6, 7, 3), np.uint16), axial_positions(3))
    source = seg_source(tmp_path / "s", None, False)
    names = {0: "background", 1: "Leber – foie 肝臓", 2: "kidney\\left", 3: "x" * 70,
             4: "x" * 70 + "y", 5: "two\nlines"}
    mask = np.zeros((7, 6, 3), np.uint8)
    mask[1:3, 1:3, 1] = 1
    write_seg(build_seg(mask, source, names), tmp_path / "names.seg.dcm")
    seg = pydicom.dcmread(tmp_path / "names.seg.dcm")
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels[:2] == ["Leber – foie 肝臓", "kidney/left"]
    assert labels[2].endswith(" (3)") and labels[3].endswith(" (4)")
    assert len(labels[2]) == len(labels[3]) == 64 and labels[4] == "two lines"


def test_a_seg_that_cannot_be_written_is_one_line_and_takes_the_old_one_with_it(
        trained_run, dicom_case, tmp_path, monkeypatch):
    """A full disk gave a flattened pydicom traceback naming the series; with --overwrite,
    the previous run's SEG stayed without its NIfTI."""
    import errno

    out = tmp_path / "out"
    predictor = load_predictor(trained_run)
    predict_paths(predictor, [dicom_case], out, PredictConfig(), dicom_seg=True)
    assert (out / "ct_case.seg.dcm").is_file()

    def disk_full(self, filename, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:  # as pydicom's tag context re-raises it
            raise OSError(f"With tag (7FE0,0010) got exception: {exc}\nTraceback ...") \
                from exc

    monkeypatch.setattr(pydicom.Dataset, "save_as", disk_full)
    results = predict_paths(predictor, [dicom_case], out, PredictConfig(), overwrite=True,
                            dicom_seg=True)
    assert results[0].error == f"{out / 'ct_case.seg.dcm'}: cannot write (No space left on " \
                               f"device)"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".medseg")) == []


def test_a_seg_written_into_a_subfolder_of_its_series_leaves_the_series_readable(
        trained_run, dicom_case, tmp_path):
    """formats.md allows --output inside the series; the SEG written there was then read as
    a second, 'enhanced' series of the folder, and the series could no longer be predicted
    or converted ("the folder holds 2 DICOM series"). A SEG, like a report, is no image."""
    from medseg.io import read_volume

    series = tmp_path / "series"
    shutil.copytree(dicom_case, series)
    before = read_volume(series)
    results = predict_paths(load_predictor(trained_run), [series], series / "masks",
                            PredictConfig(), dicom_seg=True)
    assert [r.error for r in results] == [None] and (series / "masks" / "series.seg.dcm").is_file()
    after = read_volume(series)
    np.testing.assert_array_equal(after.data, before.data)
    np.testing.assert_array_equal(after.affine, before.affine)


def test_a_folder_of_segs_only_is_named_as_holding_no_image(trained_run, dicom_case, tmp_path):
    """Pointing predict or convert at a --dicom-seg output folder read: "1 multi-frame
    file(s) without per-frame positions (their frames cannot be placed in space)"."""
    from medseg.io import read_volume

    out = tmp_path / "masks"
    predict_paths(load_predictor(trained_run), [dicom_case], out, PredictConfig(),
                  dicom_seg=True)
    (out / "ct_case.nii.gz").unlink()
    with pytest.raises(MedsegError) as refusal:
        read_volume(out)
    assert str(refusal.value).endswith(
        "no DICOM image found (1 file looked at; 1 DICOM file(s) that are no image (a "
        "segmentation or dose object, such as medseg's own --dicom-seg output), e.g. "
        "ct_case.seg.dcm)")
