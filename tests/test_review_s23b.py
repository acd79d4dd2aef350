"""Review of io.read_channels, predict's packed cases, the archive's sizes and `medseg plan`
(session 23b)."""

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import read_channels


def test_read_channels_names_a_value_beyond_float32_without_a_warning(tmp_path: Path):
    data = np.ones((4, 4, 4, 2))
    data[1, 1, 1, 1] = 1e300
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would be a second line on stderr
        with pytest.raises(MedsegError, match="beyond float32"):
            read_channels(path, np.float32)


def test_read_channels_holds_the_voxels_once(tmp_path: Path):
    """The channels are the file's array, not a copy of it: a BrainTumour-sized case of
    four channels would otherwise need twice its float32 size at once."""
    import tracemalloc

    data = np.random.default_rng(0).integers(-3000, 3000, (48, 48, 48, 4)).astype(np.int16)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    tracemalloc.start()
    try:
        volumes = read_channels(path, np.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.75 * data.size * 4
    for k, volume in enumerate(volumes):
        np.testing.assert_array_equal(volume.data, data[..., k])


def _handmade_archive(path: Path, sizes: dict | None) -> None:
    import hashlib
    import json
    import zipfile

    members = {"plan.json": b"{}\n", "workflow.yaml": b"dataset: {}\n",
               "fold_0/checkpoints/best.safetensors": b"weights", "fold_0/metrics.jsonl": b""}
    manifest = {"format": 1, "medseg_version": "0.1.0", "folds": [0],
                "files": {name: hashlib.sha256(data).hexdigest()
                          for name, data in members.items()}}
    if sizes is not None:
        manifest["sizes"] = sizes
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fold_0/", b"")  # a directory entry, as zip tools add
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("medseg_model.json", json.dumps(manifest))


def test_an_archive_without_sizes_is_refused(tmp_path: Path):
    """A manifest without `sizes` (of a development version of medseg 0.1.0 before they were
    recorded) is not of format 1 since session 24a: each member's size is checked before
    anything is unpacked (tests/test_review_s24a.py)."""
    from medseg.archive import unpack

    archive = tmp_path / "old.zip"
    _handmade_archive(archive, None)
    with pytest.raises(MedsegError, match="is not of format 1"):
        unpack(archive, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_size_that_is_no_number_is_refused_in_one_line(tmp_path: Path):
    from medseg.archive import unpack

    archive = tmp_path / "odd.zip"
    sizes = {"plan.json": 3, "workflow.yaml": 12, "fold_0/checkpoints/best.safetensors": 7,
             "fold_0/metrics.jsonl": 0, "extra": "many"}
    _handmade_archive(archive, sizes)
    try:
        unpack(archive, tmp_path / "run")  # the listed members' sizes are right: unpacked
    except MedsegError as exc:
        assert str(archive) in str(exc)
    sizes["plan.json"] = "3"
    _handmade_archive(archive, sizes)
    # refused as 'plan.json unpacks to 3 bytes, and medseg_model.json says 3' until 26c
    with pytest.raises(MedsegError, match="gives plan.json a size of '3', not a number"):
        unpack(archive, tmp_path / "run2")


def test_plan_takes_the_network_keys_of_train_init_as_train_does(trained_run, phantom_dataset,
                                                                  tmp_path):
    """A workflow with train.init: train plans the network keys it leaves unset from the
    source run's plan (so its weights fit); `medseg plan` printed and saved the automatic
    plan instead, not 'byte for byte' train's."""
    import json

    from helpers import REPO

    from medseg.cli import main

    out = tmp_path / "plan"
    args = ["plan", str(REPO / "workflows" / "demo.yaml"), "--set",
            f"dataset.path={phantom_dataset}", "--set", f"train.init={trained_run}",
            "--set", "plan.base_filters=4", "--set", "plan.max_filters=16", "--out", str(out)]
    assert main(args) == 0
    source = json.loads((trained_run / "plan.json").read_text(encoding="utf-8"))
    planned = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    for key in ("target_spacing", "patch_size", "filters", "network"):
        assert planned[key] == source[key], key


def test_plan_out_keeps_a_folder_holding_only_the_users_own_workflow(phantom_dataset, tmp_path,
                                                                     capsys):
    """`medseg plan exp/workflow.yaml --out exp`: a folder no plan wrote (no plan.json) whose
    only file is named as one of a plan's was taken for a plan folder, and the user's own
    workflow (comments and all) replaced by the resolved one."""
    from helpers import REPO

    from medseg.cli import main

    folder = tmp_path / "exp"
    folder.mkdir()
    mine = "# my notes\n" + (REPO / "workflows" / "demo.yaml").read_text(encoding="utf-8")
    (folder / "workflow.yaml").write_text(mine, encoding="utf-8")
    code = main(["plan", str(folder / "workflow.yaml"), "--set",
                 f"dataset.path={phantom_dataset}", "--out", str(folder)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(folder) in err and len(err.strip().splitlines()) == 1
    assert (folder / "workflow.yaml").read_text(encoding="utf-8") == mine
