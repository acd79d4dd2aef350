import json

import nibabel as nib
import numpy as np

from medseg.phantoms import PHANTOM_LABELS, make_phantom, write_phantom_dataset


def test_phantom_is_reproducible_and_has_every_structure():
    first, second = make_phantom(3), make_phantom(3)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    assert set(np.unique(first.label)) == set(PHANTOM_LABELS)
    assert all(64 <= s <= 96 for s in first.image.shape)


def test_phantom_geometry_is_anisotropic_and_not_identity():
    phantom = make_phantom(5)
    spacing = np.linalg.norm(phantom.affine[:3, :3], axis=0)
    assert spacing[2] > spacing[0] * 1.2
    assert not np.allclose(phantom.affine[:3, :3], np.diag(spacing))


def test_structures_have_distinct_intensities():
    phantom = make_phantom(7)
    means = [phantom.image[phantom.label == k].mean() for k in (1, 2, 3)]
    assert means[0] + 50 < means[1] < means[2] - 200


def test_dataset_layout(tmp_path):
    write_phantom_dataset(tmp_path, n_train=2, n_test=1, shape=(24, 24, 16),
                          spacing=(4.0, 4.0, 8.0))
    description = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    assert description["numTraining"] == 2 and len(description["test"]) == 1
    image = nib.load(tmp_path / "imagesTr" / "phantom_000.nii.gz")
    label = nib.load(tmp_path / "labelsTr" / "phantom_000.nii.gz")
    assert image.shape == label.shape == (24, 24, 16)
    np.testing.assert_allclose(image.affine, label.affine)
    assert (tmp_path / "labelsTs" / "phantom_002.nii.gz").is_file()
