"""Per-structure volumes and scan intensities: `medseg predict --statistics`."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SHAPE, SMALL_SPACING, requires_shared

import medseg.volumetry as volumetry
from medseg.cli import main
from medseg.phantoms import make_phantom
from medseg.volumetry import CaseInputs, case_rows, structure_sums

LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "lesion"}


def _naive(mask: np.ndarray, scan: np.ndarray, label: int) -> tuple[int, float, float]:
    inside = scan[mask == label].astype(np.float64)
    return inside.size, inside.mean(), inside.std()


@pytest.mark.parametrize("slab_voxels", [7, 2**24])
def test_sums_match_numpy_over_slabs(monkeypatch, slab_voxels):
    monkeypatch.setattr(volumetry, "SLAB_VOXELS", slab_voxels)
    rng = np.random.default_rng(0)
    mask = rng.integers(-1, 6, (9, 7, 11), dtype=np.int32)  # -1 and 5: beyond the classes
    scan = rng.normal(1000.0, 300.0, mask.shape).astype(np.float32)
    counts, means, sds = structure_sums(mask, scan, 5)
    for label in range(5):
        size, mean, sd = _naive(mask, scan, label)
        assert counts[label] == size
        assert means[label] == pytest.approx(mean, rel=1e-9)
        assert sds[label] == pytest.approx(sd, rel=1e-7)
    assert counts.sum() == np.count_nonzero((mask >= 0) & (mask < 5))


def _write(path, data, spacing=(2.0, 2.0, 3.0), affine=None):
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_rows_give_volumes_in_ml_and_leave_absent_structures_empty(tmp_path):
    rng = np.random.default_rng(1)
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:3, 1:4, :2] = 1  # 12 voxels of 0.012 ml
    scan = rng.normal(50.0, 10.0, mask.shape).astype(np.float32)
    item = CaseInputs("a", _write(tmp_path / "mask.nii.gz", mask),
                      _write(tmp_path / "scan.nii.gz", scan))
    rows = {row["structure"]: row for row in case_rows(item, LABELS)}
    assert set(rows) == {"liver", "spleen", "lesion"}  # background left out
    assert rows["liver"]["voxels"] == 12 and rows["liver"]["volume_ml"] == pytest.approx(0.144)
    assert rows["liver"]["intensity_mean"] == pytest.approx(scan[mask == 1].mean(), abs=0.005)
    assert rows["spleen"]["voxels"] == 0 and rows["spleen"]["intensity_mean"] == ""
    assert all(row["note"] == "" for row in rows.values())


def test_a_scan_stored_in_another_order_is_measured_alike(tmp_path):
    """A mask and its scan from two converters: the same voxels, axes stored flipped."""
    rng = np.random.default_rng(2)
    mask = rng.integers(0, 4, (6, 5, 4)).astype(np.uint8)
    scan = rng.normal(0.0, 100.0, mask.shape).astype(np.float32)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    flipped = affine @ np.array([[-1, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    as_stored = case_rows(CaseInputs("a", _write(tmp_path / "m.nii.gz", mask),
                                     _write(tmp_path / "s.nii.gz", scan)), LABELS)
    reordered = case_rows(CaseInputs("a", tmp_path / "m.nii.gz",
                                     _write(tmp_path / "f.nii.gz", scan[::-1].copy(),
                                            affine=flipped)), LABELS)
    assert reordered == as_stored


def test_a_scan_elsewhere_keeps_the_volumes_and_says_why(tmp_path):
    mask = np.ones((4, 4, 4), np.uint8)
    item = CaseInputs("a", _write(tmp_path / "m.nii.gz", mask),
                      _write(tmp_path / "s.nii.gz", np.zeros((4, 4, 5), np.float32)))
    liver = case_rows(item, LABELS)[0]
    assert liver["voxels"] == 64 and liver["intensity_mean"] == ""
    assert liver["note"].startswith(f"scan not measured: {tmp_path / 's.nii.gz'}: not on the "
                                    f"grid of m.nii.gz: shape")
    missing = CaseInputs("a", tmp_path / "m.nii.gz", tmp_path / "gone.nii.gz")
    assert case_rows(missing, LABELS)[0]["note"].startswith("scan not read:")


@pytest.fixture(scope="module")
def two_scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    for seed, name in ((3, "p1"), (4, "p2")):
        phantom = make_phantom(seed, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        _write(folder / f"{name}.nii.gz", phantom.image.astype(np.int16), SMALL_SPACING)
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    return folder


def test_predict_writes_the_batch_statistics(trained_run, two_scans, tmp_path, capsys):
    out = tmp_path / "masks"
    code = main(["predict", "--model", str(trained_run), "--input", str(two_scans),
                 "--output", str(out), "--statistics"])
    captured = capsys.readouterr()
    assert code == 1  # the broken file failed; the table covers the others
    assert f"wrote {out / 'statistics.csv'} (2 case(s))" in captured.out
    with open(out / "statistics.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = json.loads((trained_run / "plan.json").read_text(encoding="utf-8"))["labels"]
    structures = [name for key, name in sorted(labels.items(), key=lambda kv: int(kv[0]))
                  if key != "0"]
    assert [(r["case"], r["structure"]) for r in rows] == [
        (case, name) for case in ("p1", "p2") for name in structures]
    for row in rows:  # against the mask and scan as written
        mask = np.asarray(nib.load(out / f"{row['case']}.nii.gz").dataobj)
        scan = nib.load(two_scans / f"{row['case']}.nii.gz").get_fdata()
        size, mean, _ = _naive(mask, scan, int(row["label"]))
        assert int(row["voxels"]) == size
        assert float(row["volume_ml"]) == pytest.approx(size * np.prod(SMALL_SPACING) / 1000,
                                                         abs=0.001)
        if size:
            assert float(row["intensity_mean"]) == pytest.approx(mean, abs=0.005)


def test_statistics_with_shards_are_refused_before_any_work(trained_run, two_scans, tmp_path,
                                                            capsys):
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(trained_run), "--input", str(two_scans),
                 "--output", str(out), "--statistics", "--shard", "0/2"]) == 2
    assert "--statistics writes one table for the whole batch" in capsys.readouterr().err
    assert not out.exists()


def test_dicom_series_against_its_mask_in_another_storage_order():
    """The TotalSegmentator CT series and its 31-structure mask, converted by another tool:
    the liver's mean HU is that of the series' voxels under the mask."""
    folder = requires_shared("totalseg_ct")
    labels = {int(k): v for k, v in
              json.loads((folder / "labels.json").read_text(encoding="utf-8")).items()}
    rows = case_rows(CaseInputs("ct", folder / "example_seg_dicom.nii.gz",
                                folder / "example_ct_dicom"), labels)
    liver = next(row for row in rows if row["structure"] == "liver")
    assert liver["note"] == ""
    assert liver["voxels"] == 366708  # as stored in the mask
    assert 40 < liver["intensity_mean"] < 150  # soft tissue, contrast-enhanced
    assert sum(row["voxels"] > 0 for row in rows) == 31
