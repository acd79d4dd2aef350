"""Damaged or odd input files are refused in one line naming the file, not read silently:
a compressed file whose checksum fails, a DICOM slice cut short before its 'DICM' marker,
values beyond float32, a pipe named like a scan (findings of a damaged-input trial)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import axial_positions, write_series
from helpers import past_folds

from medseg.check import check_dataset
from medseg.errors import MedsegError
from medseg.io import read_label_map, read_volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def noisy(shape=(24, 24, 24), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int16)


def test_a_nifti_gz_whose_crc_fails_is_refused(tmp_path):
    raw = bytearray(nifti(tmp_path / "x.nii.gz", noisy()).read_bytes())
    raw[-8] ^= 0xFF  # the CRC in gzip's trailer: nibabel never reads that far
    (tmp_path / "crc.nii.gz").write_bytes(bytes(raw))
    with pytest.raises(MedsegError, match=r"crc\.nii\.gz: cannot read voxel data \(CRC check"):
        read_volume(tmp_path / "crc.nii.gz")
    with pytest.raises(MedsegError, match="CRC check"):  # label maps are read alike
        read_label_map(tmp_path / "crc.nii.gz")


def test_a_nifti_gz_cut_short_by_its_trailer_is_refused(tmp_path):
    raw = nifti(tmp_path / "x.nii.gz", noisy()).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[:-8])  # every voxel is there, the trailer is not
    with pytest.raises(MedsegError, match=r"cut\.nii\.gz: cannot read voxel data \(Compressed "
                                          r"file ended"):
        read_volume(tmp_path / "cut.nii.gz", dtype=None)


def test_a_whole_nifti_gz_reads_as_before(tmp_path):
    data = noisy()
    path = nifti(tmp_path / "x.nii.gz", data)
    np.testing.assert_array_equal(read_volume(path, dtype=None).data, data)
    np.testing.assert_array_equal(read_volume(path).data, data.astype(np.float32))


def metaimage(path: Path, data: np.ndarray, compressed: bool = True) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path), useCompression=compressed)
    return path


def test_a_compressed_metaimage_with_a_flipped_bit_is_refused(tmp_path):
    raw = bytearray(metaimage(tmp_path / "a.mha", noisy()).read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the zlib stream: ITK inflates it without a check
    (tmp_path / "flip.mha").write_bytes(bytes(raw))
    with pytest.raises(MedsegError, match=r"flip\.mha: cannot read voxel data: the compressed "
                                          r"data is damaged"):
        read_volume(tmp_path / "flip.mha")


def test_a_detached_metaimage_names_its_damaged_or_missing_data_file(tmp_path):
    header = metaimage(tmp_path / "b.mhd", noisy())
    data_file = tmp_path / "b.zraw"
    raw = bytearray(data_file.read_bytes())
    raw[-2] ^= 0x04
    data_file.write_bytes(bytes(raw))
    with pytest.raises(MedsegError, match=r"b\.zraw: cannot read voxel data: the compressed "
                                          r"data is damaged"):
        read_volume(header)
    data_file.unlink()
    with pytest.raises(MedsegError, match=r"b\.mhd: cannot read voxel data: the header's data "
                                          r"file b\.zraw is missing"):
        read_volume(header)


def test_a_metaimage_cut_short_is_refused_without_itks_console_lines(tmp_path):
    whole = metaimage(tmp_path / "c.mha", noisy(), compressed=False).read_bytes()
    (tmp_path / "short.mha").write_bytes(whole[:-10])
    with pytest.raises(MedsegError, match=r"short\.mha: cannot read voxel data: 27638 bytes "
                                          r"where the header's size needs 27648"):
        read_volume(tmp_path / "short.mha")
    compressed = metaimage(tmp_path / "z.mha", noisy()).read_bytes()
    (tmp_path / "zshort.mha").write_bytes(compressed[:-100])
    with pytest.raises(MedsegError, match="the compressed data is cut short"):
        read_volume(tmp_path / "zshort.mha")
    np.testing.assert_array_equal(read_volume(tmp_path / "c.mha", dtype=None).data,
                                  noisy().transpose(2, 1, 0))


def test_a_dicom_slice_cut_before_its_marker_at_the_end_of_the_series_is_refused(tmp_path):
    """Left out as 'not DICOM', the volume came out one slice short without a word."""
    paths = write_series(tmp_path, np.zeros((8, 8, 4), np.int16), axial_positions(4))
    paths[-1].write_bytes(paths[-1].read_bytes()[:100])  # 100 bytes of the zero preamble
    (tmp_path / "notes.txt").write_text("a note beside the series", encoding="utf-8")
    with pytest.raises(MedsegError, match=rf"{paths[-1].name}: not a DICOM file, though named "
                                          rf"or begun like one \(100 bytes: a slice cut short"):
        read_volume(tmp_path)


def test_a_slice_without_a_suffix_cut_short_is_refused_but_a_notes_file_is_not(tmp_path):
    paths = write_series(tmp_path, np.zeros((8, 8, 3), np.int16), axial_positions(3))
    (tmp_path / "README").write_text("series exported by the scanner", encoding="utf-8")
    (tmp_path / "LOCKFILE").write_bytes(b"")  # as some DICOM CDs carry
    assert read_volume(tmp_path).data.shape == (8, 8, 3)
    cut = tmp_path / "IM0099"
    cut.write_bytes(bytes(60))  # a slice without a suffix, cut inside its preamble
    with pytest.raises(MedsegError, match="IM0099: not a DICOM file"):
        read_volume(tmp_path)
    cut.unlink()
    paths[0].rename(tmp_path / "1.2.840.99")  # a UID for a name: its 'suffix' is a number
    (tmp_path / "1.2.840.98").write_bytes(bytes(90))
    with pytest.raises(MedsegError, match=r"1\.2\.840\.98: not a DICOM file"):
        read_volume(tmp_path)


def test_values_beyond_float32_are_named_as_such_by_read_and_by_check(tmp_path, capfd):
    data = np.zeros((16, 16, 16))
    data[2, 2, 2] = 1e39  # finite as stored (float64), infinite as float32
    path = nifti(tmp_path / "big.nii.gz", data)
    with pytest.raises(MedsegError, match=r"big\.nii\.gz: voxel values up to 1e\+39 are beyond "
                                          r"float32's range"):
        read_volume(path)
    assert "overflow" not in capfd.readouterr().err  # numpy's cast warning is not printed

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    ramp = np.linspace(0.0, 1.0, 16 ** 3).reshape((16, 16, 16))  # not constant: no warning
    for name, image in (("a", data), ("b", ramp)):
        nifti(root / "images" / f"{name}.nii.gz", image)
        nifti(root / "labels" / f"{name}.nii.gz", label)
    problems = past_folds(check_dataset(root, layout="folders").problems)
    assert [(p.severity, p.case) for p in problems] == [("error", "a")]
    assert "beyond float32's range" in problems[0].message


def test_a_pipe_named_like_a_scan_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "a.nii.gz"
    os.mkfifo(fifo)
    result: list = []

    def read() -> None:
        try:
            read_volume(fifo)
        except MedsegError as exc:
            result.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # opened it: blocked waiting for a writer; let it go
        with open(fifo, "wb"):
            pass
        pytest.fail("read_volume opened the pipe")
    assert result == [f"{fifo}: not a regular file (a pipe, socket or device)"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", cwd=cwd, timeout=300)


def test_a_header_nibabel_mends_leaves_the_console_to_medseg(tmp_path):
    image = nib.Nifti1Image(noisy(), np.eye(4))
    image.header["pixdim"][1] = 0  # nibabel logs "pixdim[1,2,3] should be non-zero"
    image.to_filename(str(tmp_path / "pixdim0.nii.gz"))
    result = run_cli("convert", str(tmp_path / "pixdim0.nii.gz"), str(tmp_path / "o.nii.gz"))
    assert result.returncode == 0  # the sform gives the spacing
    assert result.stderr == ""


@pytest.mark.slow
def test_predict_with_every_case_failing_leaves_no_output_folder(tmp_path, trained_run):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = np.zeros((16, 16, 16), np.float32)
    bad[0, 0, 0] = np.nan
    nifti(inputs / "nan.nii.gz", bad)
    os.mkfifo(inputs / "pipe.nii.gz")  # left out of the batch before: now a failed case
    output = tmp_path / "masks"
    result = run_cli("predict", "--model", str(trained_run), "--input", str(inputs),
                     "--output", str(output))
    assert result.returncode == 2, result.stderr
    assert "pipe.nii.gz: not a regular file" in result.stderr + result.stdout
    assert "failed 2" in result.stdout
    assert not output.exists()


def test_valid_metaimage_variants_read_as_itk_reads_them(tmp_path):
    """A review found the data check refusing files ITK reads: 'ElementDataFile = Local',
    gzip-framed compressed data, voxels written as text."""
    import gzip
    import zlib

    data = noisy((6, 7, 8))
    whole = metaimage(tmp_path / "z.mha", data).read_bytes()
    header, _, body = whole.partition(b"ElementDataFile = LOCAL\n")
    (tmp_path / "local.mha").write_bytes(header + b"ElementDataFile = Local\n" + body)
    framed = gzip.compress(zlib.decompress(body))
    header = header.replace(b"CompressedDataSize = %d" % len(body),
                            b"CompressedDataSize = %d" % len(framed))
    (tmp_path / "gzip.mha").write_bytes(header + b"ElementDataFile = LOCAL\n" + framed)
    (tmp_path / "text.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nBinaryData = False\nDimSize = 2 2 2\n"
        b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n1 2 3 4 5 6 7 8\n")
    for name in ("local.mha", "gzip.mha"):
        np.testing.assert_array_equal(read_volume(tmp_path / name, dtype=None).data,
                                      data.transpose(2, 1, 0))
    assert read_volume(tmp_path / "text.mha", dtype=None).data.sum() == 36


def test_bytes_after_a_whole_nifti_gz_are_ignored_as_gzip_does(tmp_path):
    data = noisy()
    raw = nifti(tmp_path / "x.nii.gz", data).read_bytes()
    (tmp_path / "junk.nii.gz").write_bytes(raw + b"JUNK AFTER THE STREAM")
    np.testing.assert_array_equal(read_volume(tmp_path / "junk.nii.gz", dtype=None).data, data)


def test_a_raw_non_image_data_set_named_dcm_is_skipped_as_before(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset

    write_series(tmp_path, np.zeros((8, 8, 3), np.int16), axial_positions(3))
    report = Dataset()  # a structured report without the Part 10 preamble
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    report.SeriesInstanceUID = "1.2.3.4"
    pydicom.dcmwrite(tmp_path / "report.dcm", report, enforce_file_format=False,
                     little_endian=True, implicit_vr=True)
    assert read_volume(tmp_path).data.shape == (8, 8, 3)
