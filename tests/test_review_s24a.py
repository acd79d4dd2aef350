"""Review of `medseg convert-msd` (the folders a failed conversion leaves, `converted_from`,
scaled integer images) and the model archive's required `sizes` (session 24a)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_archive import _rewrite
from test_msd import _affine, _save

from medseg import msd
from medseg.archive import MANIFEST, unpack
from medseg.cli import main
from medseg.errors import MedsegError
from medseg.io import read_volume
from medseg.msd import convert_msd

SHAPE = (6, 5, 4)


def _scaled(raw: np.ndarray, path: Path, slope: float, inter: float) -> None:
    image = nib.Nifti1Image(raw, _affine())
    image.header.set_qform(_affine(), code=1)
    image.header.set_sform(_affine(), code=2)
    image.header.set_slope_inter(slope, inter)  # after the image is made: nibabel keeps it
    nib.save(image, path)


def _task(root: Path, images: list[tuple[np.ndarray, float, float]]) -> Path:
    """A one-channel MSD task of these images (stored integers, scl_slope, scl_inter), each
    with a label of two structures."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    training = []
    for index, (raw, slope, inter) in enumerate(images):
        name = f"case_{index:03d}"
        _scaled(raw, root / "imagesTr" / f"{name}.nii.gz", slope, inter)
        _save((np.arange(raw.size).reshape(raw.shape) % 3).astype(np.uint8),
              root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz",
                         "label": f"./labelsTr/{name}.nii.gz"})
    description = {"name": "Small", "modality": {"0": "CT"},
                   "labels": {"0": "background", "1": "a", "2": "b"},
                   "numTraining": len(training), "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


def _raw(seed: int, low: int = -300, high: int = 300) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, SHAPE).astype(np.int16)


@pytest.fixture
def small_task(tmp_path: Path) -> Path:
    return _task(tmp_path / "Task09_Small", [(_raw(0), 1.0, 0.0), (_raw(1), 1.0, 0.0)])


def _failing_second_item(monkeypatch, before_failing=None) -> None:
    """`_convert_item` converts the first item and fails on the second (after calling
    `before_failing`)."""
    calls = []
    original = msd._convert_item

    def convert(item):
        calls.append(item)
        if len(calls) == 2:
            if before_failing is not None:
                before_failing()
            raise MedsegError("cannot read voxel data (damaged)", item[2])
        return original(item)

    monkeypatch.setattr(msd, "_convert_item", convert)


def test_a_failed_conversion_removes_the_parent_folders_it_made(small_task, tmp_path,
                                                                monkeypatch):
    _failing_second_item(monkeypatch)
    with pytest.raises(MedsegError, match="damaged"):
        convert_msd(small_task, tmp_path / "new" / "a" / "out")
    assert not (tmp_path / "new").exists()


def test_a_failed_conversion_keeps_folders_it_did_not_make_or_that_hold_others_files(
        small_task, tmp_path, monkeypatch):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("x", encoding="utf-8")
    middle = kept / "new" / "a"
    # something else writes beside the conversion while it runs
    _failing_second_item(monkeypatch, lambda: (middle / "other.txt").write_text(
        "y", encoding="utf-8"))
    with pytest.raises(MedsegError, match="damaged"):
        convert_msd(small_task, middle / "out")
    assert sorted(p.name for p in middle.iterdir()) == ["other.txt"]
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt", "new"]


def test_an_empty_out_folder_that_existed_is_kept_empty(small_task, tmp_path, monkeypatch):
    out = tmp_path / "empty"
    out.mkdir()
    _failing_second_item(monkeypatch)
    with pytest.raises(MedsegError):
        convert_msd(small_task, out)
    assert out.is_dir() and not any(out.iterdir())


def test_converted_from_names_the_task_folder_not_its_path(small_task, tmp_path, monkeypatch):
    out = tmp_path / "Dataset009_Small"
    assert main(["convert-msd", str(small_task), str(out)]) == 0
    text = (out / "dataset.json").read_text(encoding="utf-8")
    assert json.loads(text)["converted_from"] == "Task09_Small"
    assert str(tmp_path) not in text
    monkeypatch.chdir(small_task)  # the task given as "."
    convert_msd(Path("."), tmp_path / "again")
    description = json.loads((tmp_path / "again" / "dataset.json").read_text(encoding="utf-8"))
    assert description["converted_from"] == "Task09_Small"


def test_scaled_integers_keep_their_type_and_scaling(tmp_path):
    """int16 with scl_slope 0.5 was written as float64 (4 times the size): the stored
    integers and the scaling are kept, and read as the same values; integers scaled to whole
    numbers (HU from uint16 and -1024) are still written as those numbers."""
    ct = np.random.default_rng(2).integers(0, 3000, SHAPE).astype(np.uint16)
    task = _task(tmp_path / "Task10_Scaled", [(_raw(0), 0.5, 0.25), (ct, 1.0, -1024.0)])
    out = tmp_path / "out"
    convert_msd(task, out)
    scaled = out / "imagesTr" / "case_000_0000.nii.gz"
    written = nib.load(scaled)
    assert written.get_data_dtype() == np.int16
    assert (written.dataobj.slope, written.dataobj.inter) == (0.5, 0.25)
    np.testing.assert_array_equal(written.dataobj.get_unscaled(), _raw(0))
    source = read_volume(task / "imagesTr" / "case_000.nii.gz", dtype=None)
    after = read_volume(scaled, dtype=None)
    assert after.data.dtype == source.data.dtype
    np.testing.assert_array_equal(after.data, source.data)
    np.testing.assert_array_equal(after.affine, source.affine)
    whole = nib.load(out / "imagesTr" / "case_001_0000.nii.gz")
    assert whole.get_data_dtype() == np.int16 and whole.dataobj.slope == 1.0
    np.testing.assert_array_equal(np.asarray(whole.dataobj), ct.astype(np.int32) - 1024)


def _without_sizes(members: dict[str, bytes], name: str | None = None) -> None:
    """The manifest without `sizes` (or without the size of `name`)."""
    manifest = json.loads(members[MANIFEST])
    if name is None:
        del manifest["sizes"]
    else:
        del manifest["sizes"][name]
    members[MANIFEST] = json.dumps(manifest).encode()


@pytest.mark.parametrize(("name", "expected"), [
    (None, "is not of format 1"),
    ("plan.json", "gives no size for plan.json: not a model archive of format 1"),
])
def test_an_archive_without_sizes_is_refused_before_anything_is_unpacked(
        model_archive, phantom_dataset, tmp_path, capsys, monkeypatch, name, expected):
    changed = _rewrite(model_archive, tmp_path / "changed.zip",
                       lambda members: _without_sizes(members, name))
    copied = []
    monkeypatch.setattr("medseg.archive._copy_hashed", lambda *args: copied.append(args))
    with pytest.raises(MedsegError, match=expected):
        unpack(changed, tmp_path / "run")
    assert copied == [] and not (tmp_path / "run").exists()
    assert main(["predict", "--model", str(changed), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(changed) in err and len(err.strip().splitlines()) == 1, err
    assert copied == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_medseg_convert_keeps_scaled_integers_as_stored_in_nifti(tmp_path, suffix):
    """`medseg convert` wrote int16 with scl_slope 0.5 as float64, as convert-msd did: into a
    NIfTI now as stored with its scaling; NRRD stores no scaling, so floats there (the same
    values either way)."""
    source = tmp_path / "scaled.nii.gz"
    _scaled(_raw(0), source, 0.5, 0.25)
    before = source.read_bytes()
    target = tmp_path / f"out{suffix}"
    assert main(["convert", str(source), str(target)]) == 0
    assert source.read_bytes() == before
    after = read_volume(target, dtype=None)
    np.testing.assert_array_equal(after.data, read_volume(source, dtype=None).data)
    if suffix == ".nii.gz":
        written = nib.load(target)
        assert written.get_data_dtype() == np.int16
        assert (written.dataobj.slope, written.dataobj.inter) == (0.5, 0.25)
