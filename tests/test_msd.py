"""`medseg convert-msd`: an MSD task of 4D multi-channel images written in nnU-Net's layout,
trained on, and its 4D test images predicted as they are."""

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SHAPE, SMALL_SPACING, TINY_TRAINING, as_sets

from medseg.cli import main
from medseg.datasets import load_dataset
from medseg.errors import MedsegError
from medseg.io import read_volume
from medseg.phantoms import make_phantom

CHANNELS = ("T2", "ADC")


def _affine() -> np.ndarray:
    affine = np.diag([*SMALL_SPACING, 1.0])
    affine[:3, 3] = (-60.0, 40.5, 12.25)
    return affine


def _save(data: np.ndarray, path: Path, code: int = 1) -> None:
    image = nib.Nifti1Image(data, _affine())
    image.header.set_qform(_affine(), code=code)
    image.header.set_sform(_affine(), code=2)
    nib.save(image, path)


@pytest.fixture(scope="module")
def msd_task(tmp_path_factory) -> Path:
    """An MSD task of 6 training and 2 test cases, two channels in each 4D image."""
    root = tmp_path_factory.mktemp("msd") / "Task05_Phantom"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    training, test = [], []
    for index in range(8):
        phantom = make_phantom(50 + index, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        second = np.flip(phantom.image, axis=0) * 0.5 + 100  # unlike the first channel
        stacked = np.stack([phantom.image, second], axis=-1).astype(np.int16)
        name = f"phantom_{index:03d}"
        if index < 6:
            _save(stacked, root / "imagesTr" / f"{name}.nii.gz")
            _save(phantom.label.astype(np.uint8), root / "labelsTr" / f"{name}.nii.gz")
            training.append({"image": f"./imagesTr/{name}.nii.gz",
                             "label": f"./labelsTr/{name}.nii.gz"})
        else:
            _save(stacked, root / "imagesTs" / f"{name}.nii.gz")
            test.append(f"./imagesTs/{name}.nii.gz")
    description = {"name": "Phantom", "licence": "CC-BY-SA 4.0", "tensorImageSize": "4D",
                   "modality": {str(k): name for k, name in enumerate(CHANNELS)},
                   "labels": {"0": "background", "1": "liver", "2": "kidney", "3": "spine"},
                   "numTraining": 6, "numTest": 2, "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def converted(msd_task, tmp_path_factory) -> Path:
    before = _digests(msd_task)
    out = tmp_path_factory.mktemp("converted") / "Dataset005_Phantom"
    assert main(["convert-msd", str(msd_task), str(out), "--jobs", "2"]) == 0
    assert _digests(msd_task) == before  # the task is only read
    return out


def test_each_channel_keeps_its_voxels_and_header(msd_task, converted):
    for folder, name in (("imagesTr", "phantom_000"), ("imagesTs", "phantom_007")):
        source = msd_task / folder / f"{name}.nii.gz"
        for channel in range(len(CHANNELS)):
            target = converted / folder / f"{name}_{channel:04d}.nii.gz"
            original, written = read_volume(source, channel=channel), read_volume(target)
            np.testing.assert_array_equal(original.data, written.data)
            np.testing.assert_array_equal(original.geometry.affine, written.geometry.affine)
            header = nib.load(target).header
            assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 2
            assert header.get_data_dtype() == np.int16 and nib.load(target).ndim == 3
    label = "labelsTr/phantom_003.nii.gz"
    assert (converted / label).read_bytes() == (msd_task / label).read_bytes()
    assert not (converted / "labelsTr" / "phantom_007.nii.gz").exists()


def test_the_converted_task_reads_as_nnunet_with_every_channel(converted):
    description = json.loads((converted / "dataset.json").read_text(encoding="utf-8"))
    assert description["channel_names"] == {"0": "T2", "1": "ADC"}
    assert description["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spine": 3}
    assert description["numTraining"] == 6 and description["file_ending"] == ".nii.gz"
    assert description["licence"] == "CC-BY-SA 4.0"
    dataset = load_dataset(converted)
    assert len(dataset.cases) == 6 and dataset.modalities == ("MR", "MR")
    assert [p.name for p in dataset.cases[0].images] == ["phantom_000_0000.nii.gz",
                                                         "phantom_000_0001.nii.gz"]


def test_the_4d_task_itself_is_refused_with_the_way_out(msd_task):
    with pytest.raises(MedsegError, match="medseg convert-msd") as caught:
        load_dataset(msd_task)
    assert "2 channels" in str(caught.value)


def test_train_on_the_conversion_and_predict_the_4d_test_images(converted, msd_task,
                                                                 tmp_path):
    from helpers import REPO

    run = tmp_path / "run"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 *as_sets([f"dataset.path={converted}", "dataset.layout=auto", *TINY_TRAINING,
                           "train.epochs=1"])]) == 0
    assert main(["predict", "--model", str(run), "--input", str(msd_task / "imagesTs"),
                 "--output", str(tmp_path / "from4d")]) == 0
    assert main(["predict", "--model", str(run), "--input", str(converted / "imagesTs"),
                 "--output", str(tmp_path / "split")]) == 0
    masks = sorted(p.name for p in (tmp_path / "from4d").glob("*.nii.gz"))
    assert masks == ["phantom_006.nii.gz", "phantom_007.nii.gz"]
    for name in masks:
        four_d, split = nib.load(tmp_path / "from4d" / name), nib.load(tmp_path / "split" / name)
        np.testing.assert_array_equal(np.asarray(four_d.dataobj), np.asarray(split.dataobj))
        assert four_d.shape == SMALL_SHAPE
        np.testing.assert_array_equal(four_d.affine, split.affine)


def test_refusals(msd_task, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x", encoding="utf-8")
    cases = [([str(msd_task), str(busy)], "output folder is not empty"),
             ([str(msd_task), str(msd_task / "out")], "lies inside the task folder"),
             ([str(tmp_path), str(tmp_path / "o")], "no dataset.json"),
             ([str(msd_task), str(tmp_path / "o"), "--jobs", "0"], "--jobs must be at least 1")]
    for argv, expected in cases:
        assert main(["convert-msd", *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (msd_task / "out").exists()
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]


def test_an_image_of_other_channels_is_refused_before_writing(msd_task, tmp_path, capsys):
    task = tmp_path / "task"
    import shutil

    shutil.copytree(msd_task, task)
    description = json.loads((task / "dataset.json").read_text(encoding="utf-8"))
    description["modality"] = {"0": "T2", "1": "ADC", "2": "DWI"}
    (task / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    assert main(["convert-msd", str(task), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds 2 volume(s), and dataset.json's 'modality' names 3 channel(s)" in err
    assert "phantom_000.nii.gz" in err and not (tmp_path / "out").exists()


def test_a_broken_file_leaves_no_half_conversion(msd_task, tmp_path, capsys):
    task = tmp_path / "task"
    import shutil

    shutil.copytree(msd_task, task)
    broken = task / "imagesTs" / "phantom_007.nii.gz"
    data = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(data[: len(data) // 2]))  # the header whole, voxels cut
    out = tmp_path / "out"
    assert main(["convert-msd", str(task), str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("medseg: error:")]
    assert len(errors) == 1 and "phantom_007.nii.gz: cannot read voxel data" in errors[0]
    assert not out.exists()


def test_the_real_hippocampus_task_converts_case_for_case(tmp_path):
    from helpers import requires_shared

    task = requires_shared("Task04_Hippocampus")
    out = tmp_path / "Dataset004_Hippocampus"
    assert main(["convert-msd", str(task), str(out), "--jobs", "2"]) == 0
    original, converted = load_dataset(task), load_dataset(out)
    assert [c.name for c in converted.cases] == sorted(c.name for c in original.cases)
    assert converted.labels == original.labels
    assert converted.modalities == original.modalities
    for case in original.cases[:5]:
        before = read_volume(case.images[0], dtype=None)
        after = read_volume(out / "imagesTr" / f"{case.name}_0000.nii.gz", dtype=None)
        np.testing.assert_array_equal(before.data, after.data)
        np.testing.assert_array_equal(before.geometry.affine, after.geometry.affine)
        assert (out / "labelsTr" / f"{case.name}.nii.gz").read_bytes() == \
            case.label.read_bytes()


@pytest.mark.parametrize(("extra", "suffix"), [((3,), ".nii.gz"), ((2, 2), ".nii"),
                                               ((1, 3), ".nii.gz")])
def test_read_channels_reads_each_volume_as_read_volume_picks_it(tmp_path, extra, suffix):
    from medseg.io import read_channels

    generator = np.random.default_rng(0)
    data = generator.integers(-500, 500, (5, 6, 7, *extra)).astype(np.int16)
    path = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti1Image(data, _affine()), path)
    for dtype in (np.float32, None):
        volumes = read_channels(path, dtype)
        assert len(volumes) == int(np.prod(extra))
        for k, volume in enumerate(volumes):
            one = read_volume(path, dtype, channel=k)
            np.testing.assert_array_equal(volume.data, one.data)
            assert volume.data.dtype == one.data.dtype
            np.testing.assert_array_equal(volume.geometry.affine, one.geometry.affine)


def test_read_channels_refuses_nan(tmp_path):
    from medseg.io import read_channels

    data = np.zeros((4, 4, 4, 2), np.float32)
    data[1, 1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(MedsegError, match="NaN or Inf"):
        read_channels(tmp_path / "nan.nii.gz")
