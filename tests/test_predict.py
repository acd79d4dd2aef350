from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SHAPE, SMALL_SPACING

from medseg.config import PredictConfig
from medseg.errors import MedsegError
from medseg.io import read_volume
from medseg.phantoms import make_phantom
from medseg.predict import collect_inputs, load_predictor, output_name, predict_paths


def lps_oblique(spacing) -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                         [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation @ np.diag(spacing)
    affine[:3, 3] = [40.0, 60.0, -80.0]
    return affine


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same phantom stored three ways: LPS oblique, RAS, and permuted anisotropic."""
    folder = tmp_path_factory.mktemp("inputs")
    phantom = make_phantom(11, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    variants = {
        "lps_oblique": (phantom.image, lps_oblique(SMALL_SPACING), 1, 1),
        "ras_qform_only": (phantom.image, np.diag([*SMALL_SPACING, 1.0]), 1, 0),
        "permuted": (np.transpose(phantom.image, (2, 0, 1)),
                     np.array([[0, 4.0, 0, 0], [0, 0, 4.0, 0], [8.0, 0, 0, 0], [0, 0, 0, 1]]),
                     2, 2),
    }
    for name, (data, affine, qcode, scode) in variants.items():
        image = nib.Nifti1Image(data.astype(np.int16), affine)
        image.set_qform(affine, code=qcode)
        image.set_sform(affine, code=scode)
        nib.save(image, folder / f"{name}.nii.gz")
    return folder


def test_masks_lie_exactly_on_their_inputs(trained_run, inputs, tmp_path):
    predictor = load_predictor(trained_run)
    paths = collect_inputs([inputs])
    results = predict_paths(predictor, paths, tmp_path, PredictConfig(step=0.5))
    assert all(r.error is None for r in results)
    for path in paths:
        source = nib.load(path)
        mask = nib.load(tmp_path / output_name(path))
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        for code in ("qform_code", "sform_code"):
            assert int(mask.header[code]) == int(source.header[code])
        np.testing.assert_allclose(mask.header.get_qform(), source.header.get_qform(),
                                   atol=1e-5)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}


def test_orientation_is_undone_exactly(trained_run, inputs, tmp_path):
    """The permuted copy holds the same voxels as the RAS copy: masks must agree voxel for
    voxel once the permutation is undone."""
    predictor = load_predictor(trained_run)
    paths = [inputs / "ras_qform_only.nii.gz", inputs / "permuted.nii.gz"]
    predict_paths(predictor, paths, tmp_path, PredictConfig())
    ras = np.asarray(nib.load(tmp_path / "ras_qform_only.nii.gz").dataobj)
    permuted = np.asarray(nib.load(tmp_path / "permuted.nii.gz").dataobj)
    back = np.transpose(permuted, (1, 2, 0))
    assert back.shape == ras.shape
    assert (back == ras).mean() > 0.99


def test_nifti_in_metres_is_read_in_millimetres(trained_run, inputs, tmp_path):
    """xyzt_units 'meter': the affine's numbers are metres. The mask equals the one of the
    millimetre file, and keeps the source header (units included), so it lies on its scan."""
    source = nib.load(inputs / "ras_qform_only.nii.gz")
    in_metres = nib.Nifti1Image(np.asarray(source.dataobj), None, source.header.copy())
    affine = source.affine.copy()
    affine[:3, :] /= 1000
    in_metres.set_qform(affine, code=1)
    in_metres.header.set_xyzt_units("meter")
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(in_metres, folder / "metres.nii.gz")
    predictor = load_predictor(trained_run)
    predict_paths(predictor, [inputs / "ras_qform_only.nii.gz", folder / "metres.nii.gz"],
                  tmp_path / "out", PredictConfig())
    reference = nib.load(tmp_path / "out" / "ras_qform_only.nii.gz")
    mask = nib.load(tmp_path / "out" / "metres.nii.gz")
    assert mask.header.get_xyzt_units()[0] == "meter"
    np.testing.assert_allclose(mask.affine, affine, atol=1e-9)
    assert np.asarray(reference.dataobj).any()
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(reference.dataobj))


def test_existing_outputs_are_skipped_and_failures_reported(trained_run, inputs, tmp_path):
    predictor = load_predictor(trained_run)
    broken = tmp_path / "in" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a nifti")
    paths = [inputs / "ras_qform_only.nii.gz", broken]
    out = tmp_path / "out"
    first = predict_paths(predictor, paths, out, PredictConfig())
    assert first[0].error is None and "broken.nii.gz" in first[1].error
    assert sorted(p.name for p in out.iterdir()) == ["ras_qform_only.nii.gz"]
    second = predict_paths(predictor, paths, out, PredictConfig())
    assert second[0].skipped


def test_tta_and_output_names(trained_run, inputs, tmp_path):
    predictor = load_predictor(trained_run)
    results = predict_paths(predictor, [inputs / "ras_qform_only.nii.gz"], tmp_path,
                            PredictConfig(tta=True, step=0.75))
    assert results[0].error is None
    assert output_name(inputs / "case_0000.nii.gz") == "case.nii.gz"
    assert output_name(inputs / "case.nii") == "case.nii.gz"
    # every DICOM slice suffix formats.md names (.IMA and .dicom were kept in the name)
    for name in ("IM0001.IMA", "IM0001.dicom", "IM0001.DCM"):
        assert output_name(inputs / name) == "IM0001.nii.gz"


def test_a_model_path_that_is_no_run_folder_is_named_as_such(tmp_path):
    """"--model /tmp/nonexist" read "/tmp/nonexist/plan.json: plan.json not found" and
    "--model run/plan.json" "run/plan.json/plan.json: plan.json not found"."""
    with pytest.raises(MedsegError, match="missing: model folder not found"):
        load_predictor(tmp_path / "missing")
    (tmp_path / "plan.json").write_text("{}", encoding="utf-8")
    with pytest.raises(MedsegError, match="plan.json: not a folder: --model takes the run "
                                          "folder"):
        load_predictor(tmp_path / "plan.json")


def test_tta_without_mirror_axes_says_it_averages_nothing(trained_run, inputs, tmp_path,
                                                            capsys):
    import dataclasses

    predictor = load_predictor(trained_run)
    unmirrored = dataclasses.replace(
        predictor, plan=dataclasses.replace(predictor.plan, mirror_axes=[]))
    results = predict_paths(unmirrored, [inputs / "ras_qform_only.nii.gz"], tmp_path,
                            PredictConfig(tta=True, step=0.75))
    assert results[0].error is None
    assert "--tta has nothing to average" in capsys.readouterr().err


def test_model_folder_errors(tmp_path, trained_run):
    with pytest.raises(MedsegError, match="plan.json not found"):
        load_predictor(tmp_path)
    with pytest.raises(MedsegError, match="no trained weights for fold_3"):
        load_predictor(trained_run, folds=[3])
    with pytest.raises(MedsegError, match="input not found"):
        collect_inputs([tmp_path / "nope.nii.gz"])


def test_every_input_format_gives_a_mask_on_its_exact_grid(trained_run, inputs, tmp_path):
    """The LPS oblique phantom as NRRD, MetaImage and a DICOM series: each mask lies on its
    input's grid, and all agree with the mask of the NIfTI original."""
    from dicom_factory import write_volume_as_dicom

    from medseg.io import convert_volume, read_geometry, read_volume

    source = inputs / "lps_oblique.nii.gz"
    folder = tmp_path / "in"
    paths = [convert_volume(source, folder / "nrrd_case.nrrd"),
             convert_volume(source, folder / "mha_case.mha")]
    original = read_volume(source)
    write_volume_as_dicom(tmp_path / "dicom_case", original.data, original.affine)
    paths.append(tmp_path / "dicom_case")
    predictor = load_predictor(trained_run)
    out = tmp_path / "out"
    results = predict_paths(predictor, [source, *paths], out, PredictConfig())
    assert all(r.error is None for r in results), [r.error for r in results]
    reference = np.asarray(nib.load(out / "lps_oblique.nii.gz").dataobj)
    for path in paths:
        mask = nib.load(out / output_name(path))
        geometry = read_geometry(path)
        assert mask.shape == tuple(geometry.shape)
        np.testing.assert_allclose(mask.affine, geometry.affine, atol=1e-5)
        assert int(mask.header["sform_code"]) == 1
        assert (np.asarray(mask.dataobj) == reference).mean() > 0.99


def test_tta_mirrors_only_the_plan_axes():
    from medseg.predict import _mirror_combinations

    assert _mirror_combinations([0, 2]) == [(), (2,), (4,), (2, 4)]
    assert _mirror_combinations([]) == [()]
    assert len(set(_mirror_combinations([0, 1, 2]))) == 8


def test_a_mask_is_never_written_over_its_input(trained_run, inputs, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    scan = folder / "case.nii.gz"
    scan.write_bytes((inputs / "ras_qform_only.nii.gz").read_bytes())
    before = scan.read_bytes()
    predictor = load_predictor(trained_run)
    with pytest.raises(MedsegError, match="would write a mask over this input"):
        predict_paths(predictor, collect_inputs([folder]), folder, PredictConfig(),
                      overwrite=True)
    assert scan.read_bytes() == before


def test_hidden_files_are_left_out_and_subfolders_noted(inputs, tmp_path, capsys):
    folder = tmp_path / "scans"
    (folder / "patient_dicom").mkdir(parents=True)
    (folder / "case.nii.gz").write_bytes((inputs / "ras_qform_only.nii.gz").read_bytes())
    (folder / "._case.nii.gz").write_bytes(b"macOS resource fork")
    assert [p.name for p in collect_inputs([folder])] == ["case.nii.gz"]
    assert "patient_dicom" in capsys.readouterr().err
    (folder / "pacs_export.zip").write_bytes(b"PK")  # was left out without a word
    collect_inputs([folder])
    assert (f"medseg: note: {folder} holds 1 archive(s), e.g. pacs_export.zip: medseg does "
            f"not open archives, unpack them first") in capsys.readouterr().err
    (folder / "case.nii.gz").unlink()
    (folder / "._case.nii.gz").unlink()
    with pytest.raises(MedsegError, match="pacs_export.zip: medseg does not open archives"):
        read_volume(folder)  # a folder of archives alone: read as a series, none found


def test_output_name_of_the_current_folder(tmp_path, monkeypatch):
    series = tmp_path / "patient7"
    series.mkdir()
    monkeypatch.chdir(series)
    assert output_name(Path(".")) == "patient7.nii.gz"
    assert output_name(Path("./")) == "patient7.nii.gz"


def test_a_volume_whose_spacing_is_far_off_is_refused_in_one_line(trained_run, tmp_path):
    predictor = load_predictor(trained_run)
    data = np.zeros((40, 40, 40), np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([400.0, 400.0, 400.0, 1.0])), tmp_path / "x.nii.gz")
    results = predict_paths(predictor, [tmp_path / "x.nii.gz"], tmp_path / "out",
                            PredictConfig())
    assert "is its voxel spacing (400, 400, 400 mm) right?" in results[0].error
    assert "x.nii.gz" in results[0].error and "\n" not in results[0].error


def test_a_voxel_spacing_far_from_the_models_gets_a_note(trained_run, inputs, tmp_path,
                                                         capsys):
    """A header of 0.05 mm voxels (one in other units) was resampled into a few voxels and
    segmented without a word; the usual inputs, permuted and anisotropic, get no note."""
    source = nib.load(inputs / "ras_qform_only.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), np.diag([0.05, 0.05, 0.1, 1.0])),
             tmp_path / "tiny.nii.gz")
    notes = _notes_of_batch(trained_run, [inputs / "permuted.nii.gz",
                                          inputs / "lps_oblique.nii.gz", tmp_path / "tiny.nii.gz"],
                            tmp_path / "out", capsys, "is the header")
    assert len(notes) == 1 and "tiny.nii.gz: its voxel spacing (0.05, 0.05, 0.1 mm) is more " \
        "than 8 times finer or coarser than the model's (" in notes[0], notes


def test_masks_are_labelled_as_such_in_their_header(trained_run, inputs, tmp_path):
    source = nib.load(inputs / "ras_qform_only.nii.gz")
    windowed = nib.Nifti1Image(np.asarray(source.dataobj), source.affine, source.header)
    windowed.header["cal_min"], windowed.header["cal_max"] = -1000, 3000
    windowed.header["descrip"] = b"T1 MPRAGE"
    nib.save(windowed, tmp_path / "case.nii.gz")
    predictor = load_predictor(trained_run)
    predict_paths(predictor, [tmp_path / "case.nii.gz"], tmp_path / "out", PredictConfig())
    header = nib.load(tmp_path / "out" / "case.nii.gz").header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 0.0)
    assert header["descrip"].tobytes().strip(b"\0") == b""
    assert int(header["intent_code"]) == 1002  # NIFTI_INTENT_LABEL


def test_an_output_folder_that_cannot_be_made_is_one_line(trained_run, inputs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(MedsegError, match="cannot write in the output folder"):
        predict_paths(load_predictor(trained_run), [inputs / "ras_qform_only.nii.gz"],
                      blocker / "out", PredictConfig())


def test_a_read_only_output_folder_is_refused_before_any_case(trained_run, inputs, tmp_path,
                                                              monkeypatch):
    import tempfile

    import medseg.predict

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):
        raise AssertionError("a case was predicted into a folder it cannot be written in")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # root ignores chmod
    monkeypatch.setattr(medseg.predict, "predict_prepared", never)
    with pytest.raises(MedsegError, match=r"out: cannot write in the output folder "
                                          r"\(Permission denied\)"):
        predict_paths(load_predictor(trained_run), [inputs / "ras_qform_only.nii.gz"],
                      tmp_path / "out", PredictConfig())


def test_debug_shows_each_failed_case_traceback(trained_run, tmp_path, capsys):
    from medseg.cli import main

    broken = tmp_path / "in" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    args = ["predict", "--model", str(trained_run), "--input", str(broken.parent),
            "--output", str(tmp_path / "out")]
    assert main(args) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main([*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "broken.nii.gz" in err


def test_dicom_files_given_one_by_one_get_a_note(tmp_path, capsys):
    from dicom_factory import axial_positions, write_series

    paths = write_series(tmp_path / "series", np.zeros((4, 4, 3), np.uint16),
                         axial_positions(3))
    assert collect_inputs(paths) == paths
    assert "give the folder" in capsys.readouterr().err


def test_an_output_in_a_dicom_series_folder_is_refused(trained_run, tmp_path, capsys):
    """The mask written there made the next run take the folder for one of volume files and
    segment the mask as the scan, exit 0."""
    from dicom_factory import axial_positions, write_series

    from medseg.io import read_volume

    series = tmp_path / "series"
    write_series(series, np.zeros((4, 4, 3), np.uint16), axial_positions(3))
    before = sorted(p.name for p in series.iterdir())
    predictor = load_predictor(trained_run)
    one_file = series / "IM0000.dcm"  # an enhanced multi-frame file holds a whole series
    for inputs in ([series], [one_file]):
        with pytest.raises(MedsegError, match=f"{inputs[0]}: --output {series} is this DICOM "
                                              f"series' folder"):
            predict_paths(predictor, collect_inputs(inputs), series, PredictConfig())
    assert sorted(p.name for p in series.iterdir()) == before
    # a subfolder is fine: the series' reader skips files that are not DICOM
    predict_paths(predictor, collect_inputs([series]), series / "masks", PredictConfig())
    assert (series / "masks" / "series.nii.gz").is_file()
    assert read_volume(series).data.shape == (4, 4, 3)
    (series / "series.nii.gz").write_bytes(b"a mask written there by an older version")
    assert collect_inputs([series]) == [series / "series.nii.gz"]
    assert "its 3 DICOM file(s) (IM0000.dcm, ...) are not read" in capsys.readouterr().err


def test_a_network_grid_beyond_this_machines_memory_is_refused(trained_run, monkeypatch):
    import medseg.predict as predict_module
    from medseg.io import Geometry

    plan = load_predictor(trained_run).plan
    # 1e8 voxels on the plan's grid: about 4.5 GB to predict
    extent = np.cbrt(1e8 * np.prod(plan.target_spacing))
    geometry = Geometry((100, 100, 100), np.diag([extent / 100] * 3 + [1.0]))
    monkeypatch.setattr(predict_module, "physical_memory", lambda: 64 * 2**30)
    predict_module._refuse_beyond_memory(geometry, plan, Path("x.nii.gz"))
    monkeypatch.setattr(predict_module, "physical_memory", lambda: 2 * 2**30)
    with pytest.raises(MedsegError, match=r"x.nii.gz: .*1e\+08 voxels \(about 4 GB to predict; "
                                          r"this machine has 2 GB\)"):
        predict_module._refuse_beyond_memory(geometry, plan, Path("x.nii.gz"))


def test_a_scan_too_large_to_preprocess_is_refused_before_it_is_resampled(trained_run,
                                                                          monkeypatch):
    """The guard counted network voxels only, while the peak follows the input's (a fine
    scan at a coarse model's spacing)."""
    import medseg.predict as predict_module
    from medseg.io import Geometry

    plan = load_predictor(trained_run).plan
    # 4e8 input voxels, a thousandth of that on the plan's grid
    geometry = Geometry((1000, 1000, 400),
                        np.diag([s / 10 for s in plan.target_spacing] + [1.0]))
    monkeypatch.setattr(predict_module, "physical_memory", lambda: 2 * 2**30)
    with pytest.raises(MedsegError, match=r"x.nii.gz: this volume's 4e\+08 voxels need about "
                                          r"6 GB to preprocess; this machine has 2 GB"):
        predict_module._refuse_beyond_memory(geometry, plan, Path("x.nii.gz"))
    monkeypatch.setattr(predict_module, "physical_memory", lambda: 16 * 2**30)
    predict_module._refuse_beyond_memory(geometry, plan, Path("x.nii.gz"))


def test_sheared_voxel_axes_are_named_and_cpu_0_is_a_device(trained_run, inputs, tmp_path):
    import torch

    from medseg.predict import resolve_device

    assert resolve_device("cpu:0") == torch.device("cpu:0")
    source = nib.load(inputs / "ras_qform_only.nii.gz")
    sheared = source.affine.copy()
    sheared[0, 1] = 0.5 * sheared[1, 1]  # the second voxel axis leans along the first
    image = nib.Nifti1Image(np.asarray(source.dataobj), sheared)
    nib.save(image, tmp_path / "sheared.nii.gz")
    results = predict_paths(load_predictor(trained_run), [tmp_path / "sheared.nii.gz"],
                            tmp_path / "out", PredictConfig())
    assert "sheared.nii.gz: the voxel axes are sheared (up to 26.57 degrees" in results[0].error


def test_shards_share_the_cases_out_whatever_their_order(trained_run, inputs, tmp_path):
    paths = sorted(collect_inputs([inputs]))
    predictor = load_predictor(trained_run)
    rotated = paths[1:] + paths[:1]
    predict_paths(predictor, rotated, tmp_path / "a", PredictConfig(), shard=(0, 2))
    predict_paths(predictor, paths, tmp_path / "b", PredictConfig(), shard=(1, 2))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == \
        [output_name(paths[0]), output_name(paths[2])]
    assert [p.name for p in (tmp_path / "b").iterdir()] == [output_name(paths[1])]


def test_under_torchrun_each_process_predicts_on_its_own_gpu(monkeypatch):
    import torch

    from medseg.predict import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == torch.device("cuda", 1)


def test_a_case_of_many_windows_shows_them_in_a_bar_of_its_own(trained_run, inputs, tmp_path,
                                                                 capsys, monkeypatch):
    """A large CT ran for minutes with the per-case bar at 0/1."""
    import medseg.predict
    from medseg.inference import window_count

    predictor = load_predictor(trained_run)
    config = PredictConfig(step=0.25)
    case = medseg.predict.prepare_case(predictor.plan, inputs / "ras_qform_only.nii.gz")
    box = medseg.predict._prediction_box(case.image, predictor.plan, config)
    windows = window_count(tuple(case.image[(slice(None), *box)].shape[1:]),
                           tuple(predictor.plan.patch_size), config.step)
    assert windows > 1
    monkeypatch.setattr(medseg.predict, "WINDOW_BAR_MIN", windows)
    capsys.readouterr()
    mask = medseg.predict.predict_prepared(predictor, case, config)
    err = capsys.readouterr().err
    assert "  windows:" in err and f" 0/{windows} [" in err
    monkeypatch.setattr(medseg.predict, "WINDOW_BAR_MIN", windows + 1)
    assert np.array_equal(medseg.predict.predict_prepared(predictor, case, config), mask)
    assert "window" not in capsys.readouterr().err


def test_a_scan_unlike_the_training_modality_gets_a_note(trained_run, inputs, tmp_path,
                                                          capsys):
    """An MR given to a CT model was segmented into 20 'organs' without a word."""
    source = nib.load(inputs / "ras_qform_only.nii.gz")
    mr_like = np.clip(np.asarray(source.dataobj, np.float32) + 1000, 0, None) / 10
    nib.save(nib.Nifti1Image(mr_like, source.affine), tmp_path / "mr_like.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(source.shape, np.int16), source.affine),
             tmp_path / "blank.nii.gz")
    notes = _notes_of_batch(trained_run, [inputs / "ras_qform_only.nii.gz",
                                          tmp_path / "mr_like.nii.gz", tmp_path / "blank.nii.gz"],
                            tmp_path / "out", capsys, "trained on CT")
    assert len(notes) == 2, notes
    assert any("mr_like.nii.gz: no value below -100 (its lowest is 0): not a CT in Hounsfield "
               "units? (the model was trained on CT)" in n for n in notes)
    assert any("blank.nii.gz: every voxel is 0 (the model was trained on CT)" in n
               for n in notes)


def _notes_of_batch(run: Path, paths: list[Path], out: Path, capsys, marker: str) -> list[str]:
    """Predict `paths` (each must succeed) and return the stderr lines holding `marker`."""
    capsys.readouterr()
    results = predict_paths(load_predictor(run), paths, out, PredictConfig())
    assert all(result.error is None for result in results)
    return [line for line in capsys.readouterr().err.splitlines() if marker in line]


def test_channel_suffixes_are_four_ascii_digits_as_the_dataset_reads_them():
    """`\\d` took Arabic-Indic digits (`case_١٢٣٤`) for a channel number, where the
    dataset layouts take ASCII digits only; check's orphan names took them too."""
    from medseg.check import _name_of
    from medseg.predict import CHANNEL_SUFFIX

    digits = "\u0661\u0662\u0663\u0664"
    assert CHANNEL_SUFFIX.fullmatch("case_0001")
    assert not CHANNEL_SUFFIX.fullmatch(f"case_{digits}")
    assert _name_of(Path("case_0001.nii.gz")) == "case"
    assert _name_of(Path(f"case_{digits}.nii.gz")) == f"case_{digits}"
