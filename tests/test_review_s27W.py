"""Session 27 (W): review of predict's batch changes (masks judged cut short, inputs left
out of the output folder, frames cleared)."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.predict import _finished_output, without_earlier_masks


def _mask_bytes(tmp_path: Path) -> bytes:
    data = (np.arange(20 * 20 * 12) % 3).astype(np.uint8).reshape(20, 20, 12)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "plain.nii")
    return (tmp_path / "plain.nii").read_bytes()


@pytest.mark.parametrize("pack", [
    pytest.param(lambda raw: gzip.compress(raw[:400]) + gzip.compress(raw[400:]),
                 id="two-gzip-members"),
    pytest.param(lambda raw: gzip.compress(raw) + b"\0" * 512, id="zero-padding"),
    pytest.param(lambda raw: gzip.compress(raw + b"x" * 100), id="bytes-after-voxels"),
])
def test_a_whole_nii_gz_of_another_tool_is_not_called_cut_short(tmp_path, pack, capsys):
    # the gzip trailer holds the last member's length only: a whole mask of several members
    # (bgzip, cat a.gz b.gz), padded with zeros, or with bytes after its voxels (accepted
    # in a .nii) was called cut short and predicted over without --overwrite
    mask = tmp_path / "case.nii.gz"
    mask.write_bytes(pack(_mask_bytes(tmp_path)))
    assert nib.load(str(mask)).get_fdata().shape == (20, 20, 12)
    assert _finished_output(mask)
    assert "cut short" not in capsys.readouterr().err


def test_a_nii_gz_cut_short_or_missing_a_member_is_still_caught(tmp_path):
    raw = _mask_bytes(tmp_path)
    mask = tmp_path / "case.nii.gz"
    mask.write_bytes(gzip.compress(raw)[:-30])
    assert not _finished_output(mask)
    mask.write_bytes(gzip.compress(raw[:400]) + gzip.compress(raw[400:800]))
    assert not _finished_output(mask)


def _volume(path: Path, label_map: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4))
    if label_map:
        image.header.set_intent("label")
    nib.save(image, path)
    return path


def test_a_scan_in_the_output_folder_named_as_another_inputs_mask_is_not_left_out(tmp_path):
    # two sites' scans of one name, `--input site_a site_b --output site_b`: site_b's scan
    # was taken for site_a's mask and left out, so site_a's case was skipped as done on it,
    # or with --overwrite its mask replaced site_b's scan; it was refused before
    from medseg.predict import collect_inputs

    first = _volume(tmp_path / "site_a" / "case1.nii.gz")
    second = _volume(tmp_path / "site_b" / "case1.nii.gz")
    inputs = collect_inputs([tmp_path / "site_a", tmp_path / "site_b"])
    assert without_earlier_masks(inputs, tmp_path / "site_b") == [first, second]
    # medseg's own masks there (intent 'label') are still left out
    _volume(second, label_map=True)
    assert without_earlier_masks(inputs, tmp_path / "site_b") == [first]


def test_an_output_folder_left_empty_by_a_stopped_batch_is_no_series_input(tmp_path):
    # `--input scans/* --output scans/pred` stopped before its first mask (killed, or a
    # shard, whose folder is kept) left scans/pred empty: the shell pattern took it in as a
    # DICOM series and the same command was refused ("--output ... is this DICOM series'
    # folder"), the very thing leaving earlier masks out was to end
    from medseg.predict import _refuse_writing_onto_inputs, collect_inputs, output_name

    scans = [_volume(tmp_path / "scans" / f"case{i}.nii.gz") for i in range(2)]
    out = tmp_path / "scans" / "pred"
    out.mkdir()
    (out / ".case0.nii.gz.1234.part").write_bytes(b"")
    inputs = collect_inputs(sorted(str(p) for p in (tmp_path / "scans").iterdir()))
    kept = without_earlier_masks(inputs, out)
    assert kept == scans
    _refuse_writing_onto_inputs([(output_name(p), (p,)) for p in kept], out)
    # a series of its own there is still the refusal's
    (out / "IM0001").write_bytes(b"DICM")
    assert out in without_earlier_masks(
        collect_inputs(sorted(str(p) for p in (tmp_path / "scans").iterdir())), out)


def test_an_empty_mask_in_the_output_folder_is_still_left_out(tmp_path):
    # a mask emptied by a full disk is no scan: left out as before (then predicted again)
    from medseg.predict import collect_inputs

    scans = [_volume(tmp_path / "scans" / f"case{i}.nii.gz") for i in range(2)]
    out = tmp_path / "scans" / "pred"
    _volume(out / "case0.nii.gz", label_map=True)
    (out / "case1.nii.gz").write_bytes(b"")
    inputs = collect_inputs(sorted(str(p) for p in (tmp_path / "scans").iterdir()))
    assert without_earlier_masks(inputs, out) == scans
