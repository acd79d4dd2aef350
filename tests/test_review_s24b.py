"""Review of `medseg predict`'s exit code when one 4D input of another channel count is
refused, and of `predict --statistics` on multi-channel models (session 24b; the train
--overwrite refusal's line order is tested in test_workflow_trial.py)."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_multichannel import stopped_two_channel_run

from medseg.cli import main


def _packed(files, target, extra: int = 0) -> None:
    """One 4D NIfTI of the channel files (and `extra` more copies of channel 0)."""
    images = [nib.load(path) for path in files]
    volumes = [np.asarray(image.dataobj, np.float32) for image in images]
    volumes += [volumes[0]] * extra
    nib.save(nib.Nifti1Image(np.stack(volumes, axis=-1), images[0].affine), target)


def _channel_files_and_packed_case(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    """A two-channel run, a case's two channel files, and a folder holding those files and
    `packed.nii.gz`, one 4D NIfTI of the same two volumes."""
    data, run = stopped_two_channel_run(tmp_path)
    channels = [data / "imagesTr" / f"case0_{k:04d}.nii.gz" for k in (0, 1)]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in channels:
        shutil.copy(path, inputs)
    _packed(channels, inputs / "packed.nii.gz")
    return run, channels, inputs


def test_a_refused_4d_input_fails_alone_and_the_batch_exits_1(tmp_path, capsys):
    """A two-channel model given a case as channel files, one 4D NIfTI of its two channels
    and one of three volumes: the third is refused in one line naming it and what it holds,
    the other two are segmented, and the command exits 1 (some cases failed), as docs/cli.md
    says; given alone, the refused file is every case of the batch: exit 2, no folder."""
    run, channels, inputs = _channel_files_and_packed_case(tmp_path)
    three = tmp_path / "three.nii.gz"
    _packed(channels, three, extra=1)
    output = tmp_path / "pred"
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--input", str(inputs), str(three),
                 "--output", str(output)]) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in output.glob("*.nii.gz")) == ["case0.nii.gz", "packed.nii.gz"]
    assert not (output / "three.nii.gz").exists()
    errors = [line for line in captured.err.splitlines() if line.startswith("medseg: error:")]
    assert errors == [f"medseg: error: {three}: the model takes 2 channels: it holds 3 "
                      f"volumes; name the files CASE_0000 ... CASE_0001, or give one 4D "
                      f"NIfTI of 2 volumes per case"]
    assert f"failed: {three}" in captured.err
    assert "predicted 2 of 3 cases" in captured.out and "failed 1" in captured.out
    mask = nib.load(output / "packed.nii.gz")
    assert mask.shape == nib.load(channels[0]).shape  # a 3D mask on the 4D file's grid
    # the refused file alone: nothing could be done with the inputs given
    alone = tmp_path / "alone"
    assert main(["predict", "--model", str(run), "--input", str(three), "--output",
                 str(alone)]) == 2
    assert f"{three}: the model takes 2 channels: it holds 3 volumes" in capsys.readouterr().err
    assert not alone.exists()


def test_statistics_measure_every_channel_of_a_multi_channel_model(tmp_path, capsys):
    """`predict --statistics` measured channel 0 only: a two-channel model's table gives
    intensity_mean_1 / intensity_sd_1 as well, the same for a case given as channel files
    and as one 4D NIfTI of them, each equal to the channel's values inside the mask."""
    import csv

    run, channels, inputs = _channel_files_and_packed_case(tmp_path)
    output = tmp_path / "pred"
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--output",
                 str(output), "--statistics"]) == 0
    with open(output / "statistics.csv", encoding="utf-8", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["case", "label", "structure", "voxels", "volume_ml",
                             "intensity_mean", "intensity_sd", "intensity_mean_1",
                             "intensity_sd_1", "note"]
    by_case = {(row["case"], row["label"]): row for row in rows}
    mask = np.asarray(nib.load(output / "case0.nii.gz").dataobj)
    values = [np.asarray(nib.load(path).dataobj, np.float32) for path in channels]
    for (case, label), row in by_case.items():
        assert row["note"] == ""
        inside = mask == int(label)
        if not inside.any():
            continue
        for suffix, volume in (("", values[0]), ("_1", values[1])):
            assert float(row[f"intensity_mean{suffix}"]) == \
                pytest.approx(volume[inside].mean(), abs=0.006)
            assert float(row[f"intensity_sd{suffix}"]) == \
                pytest.approx(volume[inside].std(), abs=0.006)
        other = by_case[("packed" if case == "case0" else "case0", label)]
        assert {k: v for k, v in other.items() if k != "case"} == \
            {k: v for k, v in row.items() if k != "case"}


def test_a_channel_that_cannot_be_read_is_named_and_the_others_measured(tmp_path):
    from medseg.volumetry import CaseInputs, case_rows

    mask = np.ones((4, 4, 4), np.uint8)
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "m.nii.gz")
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 7.0, np.float32), affine),
             tmp_path / "c0.nii.gz")
    item = CaseInputs("a", tmp_path / "m.nii.gz", tmp_path / "c0.nii.gz",
                      (tmp_path / "c0.nii.gz", tmp_path / "gone.nii.gz"))
    row = case_rows(item, {0: "background", 1: "liver"}, channels=2)[0]
    assert row["intensity_mean"] == 7.0 and row["intensity_mean_1"] == ""
    assert row["note"].startswith("channel 1: scan not read:")


def test_a_4d_file_that_cannot_be_read_is_named_once_not_per_channel(tmp_path):
    from medseg.volumetry import CaseInputs, case_rows

    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    (tmp_path / "c.nii.gz").write_bytes(b"not a NIfTI")
    item = CaseInputs("a", tmp_path / "m.nii.gz", tmp_path / "c.nii.gz",
                      (tmp_path / "c.nii.gz",))
    row = case_rows(item, {0: "background", 1: "liver"}, channels=3)[0]
    assert row["note"].startswith("scan not read:") and row["note"].count("not read") == 1
    assert row["intensity_mean"] == row["intensity_mean_2"] == ""
