"""The scans drawn under report.html's overlay montages: pairing, windowing, orientation,
fallbacks, and reading each montage case's scan once."""

import base64
import io
import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.cli import main
from medseg.errors import MedsegError
from medseg.evaluate import LoadedPair, evaluate_pairs, pair_cases
from medseg.report import write_reports
from medseg.report_figures import (
    BACKGROUND_RGB,
    GAP,
    HEADER_H,
    MONTAGE_DENSITY,
    PREDICTION_RGB,
    REFERENCE_RGB,
    STRUCTURE_RGB,
    TILE,
    TISSUE_RGB,
    TITLE_H,
    montage_png,
)
from medseg.report_scans import Underlay, scan_file, scans_in_folder

ONE = {0: "background", 1: "a"}
LABEL_ONLY = {BACKGROUND_RGB, TISSUE_RGB, STRUCTURE_RGB, REFERENCE_RGB, PREDICTION_RGB}
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def scored(dice):
    return {"a": {"dice": dice, "iou": dice, "hd95_mm": 1.0, "hd_mm": 1.0, "assd_mm": 1.0,
                  "nsd": dice, "ref_ml": 1.0, "pred_ml": 1.0, "diff_ml": 0.0}}


def picture(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def view(montage, number):
    """The first structure's tile of view `number` (axial, coronal, sagittal), a pixel per
    displayed pixel (the montage is drawn at MONTAGE_DENSITY)."""
    d = MONTAGE_DENSITY
    top, left = (HEADER_H + TITLE_H) * d, number * (TILE + GAP) * d
    return montage[top:top + TILE * d:d, left:left + TILE * d:d]


def touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_a_case_pairs_with_its_scan_or_its_channel_0(tmp_path):
    """MSD names the scan as the case (`case.nii.gz`), nnU-Net as its channel 0
    (`case_0000.nii.gz`); other channels, hidden files and other cases are not its scan."""
    folder = touch(tmp_path / "images", "msd.nii.gz", "nn_0000.nii.gz", "nn_0001.nii.gz",
                   "other.nrrd", "._msd.nii.gz", "both.nii.gz", "both_0000.nii.gz",
                   "named_0000.nii.gz", "notes.txt")
    (folder / "series").mkdir()  # a DICOM series folder is a scan too
    scans = scans_in_folder(folder)
    assert scan_file(scans, "msd") == folder / "msd.nii.gz"
    assert scan_file(scans, "nn") == folder / "nn_0000.nii.gz"
    assert scan_file(scans, "other") == folder / "other.nrrd"
    assert scan_file(scans, "series") == folder / "series"
    assert scan_file(scans, "named_0000") == folder / "named_0000.nii.gz"  # the case's name
    with pytest.raises(MedsegError, match=r"no scan named nn_0001x or nn_0001x_0000 in "):
        scan_file(scans, "nn_0001x")
    with pytest.raises(MedsegError, match=r"2 scans of case both .*both.nii.gz, "
                                          r"both_0000.nii.gz"):
        scan_file(scans, "both")
    with pytest.raises(MedsegError, match="folder not found"):
        scans_in_folder(tmp_path / "typo")
    with pytest.raises(MedsegError, match="not a folder"):
        scans_in_folder(folder / "msd.nii.gz")


def corner_case(affine_flips=(1, 1, 1)):
    """A structure in the right-anterior-superior corner of a 40^3 volume (RAS), the scan
    bright exactly there, stored with the given axes flipped (and the affine to match)."""
    label = np.zeros((40, 40, 40), np.uint8)
    label[30:, 30:, 30:] = 1
    scan = np.full(label.shape, 100.0, np.float32)
    scan[30:, 30:, 30:] = 900.0
    scan += 5.0 * np.indices(label.shape).sum(axis=0)  # texture in every view
    flips = tuple(axis for axis, sign in enumerate(affine_flips) if sign < 0)
    affine = np.diag([*affine_flips, 1.0]).astype(float)
    for axis in flips:
        affine[axis, 3] = 39.0  # the same voxel centres, stored the other way round
    return np.flip(label, flips).copy(), np.flip(scan, flips).copy(), affine


@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, -1, 1), (-1, 1, -1)])
def test_the_scan_is_drawn_under_the_contours_oriented_as_they_are(flips):
    """On the scan, the montage keeps its radiological views: where the structure is drawn
    (the upper left of each view), the scan's bright voxels are too, whatever the storage
    order; the old flat structure grey is gone."""
    label, scan, affine = corner_case(flips)
    pair = LoadedPair(label, label.copy(), affine, (1.0, 1.0, 1.0), False)
    underlay = Underlay(scan, False, None)
    montage = picture(montage_png(pair, ONE, scored(1.0), "corner", underlay))
    for number in range(3):
        tile = view(montage, number).astype(int)
        grey = (tile[..., 0] == tile[..., 1]) & (tile[..., 1] == tile[..., 2])
        rows, cols = np.nonzero(grey & (tile[..., 0] > 200))
        assert rows.size > 50, number
        assert rows.mean() < TILE / 2 and cols.mean() < TILE / 2, number
        contour = np.nonzero((tile == REFERENCE_RGB).all(axis=-1))
        assert contour[0].mean() < TILE / 2 and contour[1].mean() < TILE / 2, number
        assert not (tile == STRUCTURE_RGB).all(axis=-1).any(), number
        assert len(np.unique(tile[grey][:, 0])) > 5, number  # the scan's texture


def test_a_ct_is_shown_in_a_soft_tissue_window():
    """Hounsfield units (air at -1000): level 40, width 400, so 40 HU is mid-grey and a
    structure of 90 HU lighter; without air, the values are windowed by their percentiles."""
    label = np.zeros((40, 40, 40), np.uint8)
    label[12:28, 12:28, 12:28] = 1
    scan = np.full(label.shape, -1000.0, np.float32)
    scan[4:36, 4:36, 4:36] = 40.0
    scan[label == 1] = 90.0
    pair = LoadedPair(label, label.copy(), np.eye(4), (1.0, 1.0, 1.0), False)
    montage = picture(montage_png(pair, ONE, scored(1.0), "ct", Underlay(scan, True, None)))
    tile = view(montage, 0)
    assert (tile[TILE // 2, TILE // 2] == 159).all()  # 90 HU: (90 + 160) / 400 * 255
    assert (tile == 127).all(axis=-1).sum() > 200  # 40 HU around it
    mr = picture(montage_png(pair, ONE, scored(1.0), "mr",
                             Underlay(scan + 1000.0, False, None)))
    assert (view(mr, 0)[TILE // 2, TILE // 2] == 255).all()  # the crop's brightest values


def write_cases(root, n, shape=(30, 30, 16)):
    """`n` cases of one structure, each prediction shifted by one more voxel."""
    for folder in ("ref", "pred"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        reference = np.zeros(shape, np.uint8)
        reference[8:22, 8:22, 4:12] = 1
        prediction = np.roll(reference, k, axis=0)
        nib.save(nib.Nifti1Image(reference, AFFINE), root / "ref" / f"case{k}.nii.gz")
        nib.save(nib.Nifti1Image(prediction, AFFINE), root / "pred" / f"case{k}.nii.gz")


def mr_scan(shape=(30, 30, 16)):
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 500 + np.arange(shape[0])[:, None, None] * 20).astype(np.float32)


def montages_by_case(html):
    """case -> (the page's line about its scan, or "", its montage as RGB pixels)."""
    found = re.findall(r"<h3>[^<]*?: (\S+) \(mean Dice [^<]*</h3>\n(<p class=\"[a-z]+\">.*?"
                       r"</p>\n)?<p><img [^>]*src=\"data:image/png;base64,([A-Za-z0-9+/=]+)\"",
                       html)
    return {case: (line, picture(base64.b64decode(png))) for case, line, png in found}


def report_with_scans(root, capsys=None):
    results = evaluate_pairs(pair_cases(root / "pred", root / "ref"), ONE)
    write_reports(results, root / "out", labels=ONE, tolerance_mm=2.0,
                  scans=scans_in_folder(root / "images"))
    return results, (root / "out" / "report.html").read_text(encoding="utf-8")


def flat(montage):
    """Whether the montage's first view has the label-only look: flat greys and the
    contours, nothing else."""
    colours = np.unique(view(montage, 0).reshape(-1, 3), axis=0)
    return {tuple(c) for c in colours} <= LABEL_ONLY


def test_a_scan_missing_unreadable_or_off_the_grid_leaves_its_montage_flat_with_a_note(
        tmp_path, capsys):
    write_cases(tmp_path, 4)
    images = tmp_path / "images"
    images.mkdir()
    nib.save(nib.Nifti1Image(mr_scan(), AFFINE), images / "case0_0000.nii.gz")
    nib.save(nib.Nifti1Image(mr_scan((30, 30, 15)), AFFINE), images / "case1.nii.gz")
    (images / "case2.nii.gz").write_bytes(b"not a scan")  # case3: none
    results, html = report_with_scans(tmp_path)
    assert all(r.error is None for r in results)
    montages = montages_by_case(html)
    assert sorted(montages) == ["case0", "case2", "case3"]  # best, median, worst
    line, montage = montages["case0"]
    assert line.startswith('<p class="meta">On the scan ') and "case0_0000.nii.gz" in line
    assert "percentile" in line and not flat(montage)
    tile = view(montage, 0)
    assert not (tile == BACKGROUND_RGB).all(axis=-1).any()  # the scan fills the view
    for case, why in (("case2", "case2.nii.gz: "), ("case3", "no scan named case3 or "
                                                            "case3_0000 in ")):
        line, montage = montages[case]
        assert line.startswith('<p class="note">Drawn without its scan: ') and why in line
        assert flat(montage), case
    err = capsys.readouterr().err
    assert "report.html: case case3 drawn without its scan: no scan named case3" in err
    # the scan on another grid: its case drawn flat, said so
    (tmp_path / "ref" / "case2.nii.gz").unlink()
    (tmp_path / "ref" / "case3.nii.gz").unlink()
    _, html = report_with_scans(tmp_path)
    line, montage = montages_by_case(html)["case1"]
    assert ("case1.nii.gz: the scan is not on its reference&#x27;s grid (shape (30, 30, 15) "
            in line)
    assert flat(montage)


def test_the_scan_of_each_montage_case_is_read_once(tmp_path, monkeypatch):
    """Of five cases, the three montage cases' scans are read, each once (a 512 x 512 x 600
    CT is 630 MB as float32), and one scan stored in another axis order is used as it is."""
    import medseg.report_scans

    write_cases(tmp_path, 5)
    images = tmp_path / "images"
    images.mkdir()
    flipped = AFFINE.copy()
    flipped[0, 0], flipped[0, 3] = -1.5, 1.5 * 29  # the same voxel centres, x stored reversed
    for k in range(5):
        scan = mr_scan()
        if k == 2:
            nib.save(nib.Nifti1Image(scan[::-1].copy(), flipped), images / f"case{k}.nii.gz")
        else:
            nib.save(nib.Nifti1Image(scan, AFFINE), images / f"case{k}.nii.gz")
    reads = []
    real = medseg.report_scans.read_volume

    def counted(path, *args, **kwargs):
        reads.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(medseg.report_scans, "read_volume", counted)
    _, html = report_with_scans(tmp_path)
    montages = montages_by_case(html)
    assert sorted(reads) == sorted(f"{case}.nii.gz" for case in montages)
    assert len(reads) == 3 and "case2" in montages
    assert all(line.startswith('<p class="meta">On the scan') for line, _ in montages.values())


def test_evaluate_images_draws_the_scans_and_refuses_a_missing_folder(tmp_path, capsys):
    write_cases(tmp_path, 2)
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        nib.save(nib.Nifti1Image(mr_scan(), AFFINE), images / f"case{k}_0000.nii.gz")
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
            "--out", str(tmp_path / "out")]
    assert main([*args, "--images", str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err.strip().endswith("typo: folder not found")
    assert not (tmp_path / "out").exists()  # refused before any scoring
    assert main([*args, "--images", str(images)]) == 0
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    montages = montages_by_case(html)
    assert len(montages) == 2 and "drawn on the case's scan" in html
    assert all("On the scan" in line and not flat(m) for line, m in montages.values())
    # without --images: the label-only look, and no line about scans
    assert main(args) == 0
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert all(line == "" and flat(m) for line, m in montages_by_case(html).values())
    assert "On the scan" not in html and "drawn on the case's scan" not in html


def test_a_multichannel_scan_is_drawn_by_its_first_channel(tmp_path, capsys):
    """MSD's 4D scans (X x Y x Z x C) are drawn by channel 0, which the page names; a 4D
    file of one volume (a time axis of 1) is drawn as a 3D one; nnU-Net's other channel
    files (`case_0001`) are not the case's scan; a 4D file cut short is a note only."""
    write_cases(tmp_path, 4)
    images = tmp_path / "images"
    images.mkdir()
    first = mr_scan()
    others = [mr_scan()[::-1] * (k + 2) for k in range(3)]  # unlike channel 0 in every view
    nib.save(nib.Nifti1Image(np.stack([first, *others], axis=-1), AFFINE),
             images / "case0.nii.gz")
    nib.save(nib.Nifti1Image(first[..., None], AFFINE), images / "case2.nii.gz")
    nib.save(nib.Nifti1Image(first, AFFINE), images / "case3_0000.nii.gz")
    nib.save(nib.Nifti1Image(others[0], AFFINE), images / "case3_0001.nii.gz")
    _, html = report_with_scans(tmp_path)
    montages = montages_by_case(html)
    for case, file in (("case2", "case2.nii.gz"), ("case3", "case3_0000.nii.gz")):
        line, montage = montages[case]
        assert line.startswith('<p class="meta">On the scan ') and file in line, case
        assert "(channel" not in line and not flat(montage), case
    line, montage = montages["case0"]
    assert line.startswith('<p class="meta">On the scan ') and "(channel 0 of 4; " in line
    # the same case drawn on channel 0 alone, as a 3D file: the same picture
    nib.save(nib.Nifti1Image(first, AFFINE), images / "case0.nii.gz")
    _, html = report_with_scans(tmp_path)
    assert np.array_equal(montages_by_case(html)["case0"][1], montage)
    assert not flat(montage)
    # a multi-channel file cut short within channel 0: a note, the montage flat, the report
    # written
    raw = nib.Nifti1Image(np.stack([first, *others], axis=-1), AFFINE).to_bytes()
    (images / "case0.nii").write_bytes(raw[:len(raw) // 8])
    (images / "case0.nii.gz").unlink()
    capsys.readouterr()
    _, html = report_with_scans(tmp_path)
    line, montage = montages_by_case(html)["case0"]
    assert line.startswith('<p class="note">Drawn without its scan: ') and "case0.nii" in line
    assert flat(montage)
    assert "case case0 drawn without its scan" in capsys.readouterr().err
