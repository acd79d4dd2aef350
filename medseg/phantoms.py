"""Synthetic CT-like volumes with known masks, for the demo and the tests.

MONAI's `create_test_image_3d` draws spheres on a flat background; a pipeline check needs more
than that (a body, HU ranges, anisotropic voxels, oblique and flipped affines), so the
phantoms are drawn here. Every volume is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.fileio import atomic_path, atomic_write_json

PHANTOM_LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "kidney", 3: "spine"}

# mean HU and in-organ texture sd for each structure; distinct ranges, as in contrast CT
_AIR_HU = -1000.0
_FAT_HU = -100.0
_SOFT_TISSUE_HU = 30.0
_ORGAN_HU = {1: (110.0, 12.0), 2: (210.0, 15.0), 3: (650.0, 60.0)}


@dataclass(frozen=True)
class Phantom:
    """One synthetic case: HU image, integer label map, and its voxel-to-world affine (RAS)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    noise_hu: float = 25.0,
) -> Phantom:
    """Draw one CT-like phantom: a body with fat, a liver, a kidney and a spine."""
    rng = np.random.default_rng(seed)
    shape = shape or tuple(int(s) for s in rng.integers(64, 97, size=3))
    spacing = spacing or (
        float(rng.uniform(1.2, 1.6)),
        float(rng.uniform(1.2, 1.6)),
        float(rng.uniform(2.0, 3.0)),
    )
    grid = _physical_grid(shape, spacing)
    extent = np.array(shape) * np.array(spacing)

    label = np.zeros(shape, dtype=np.uint8)
    body = np.broadcast_to(_ellipse_cylinder(grid, extent, rng), shape)
    fat_ring = body & ~_ellipse_cylinder(grid, extent, rng, shrink=0.85)

    organs = {
        1: _blob(grid, extent, rng, centre_frac=(0.38, 0.45), radii_mm=(30, 38, 45)),
        2: _blob(grid, extent, rng, centre_frac=(0.65, 0.55), radii_mm=(14, 18, 26)),
        3: _spine(grid, extent, rng),
    }
    for label_id, mask in organs.items():
        label[mask & body & ~fat_ring] = label_id

    image = np.full(shape, _AIR_HU, dtype=np.float32)
    image[body] = _SOFT_TISSUE_HU
    image[fat_ring] = _FAT_HU
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    texture /= texture.std() + 1e-6
    for label_id, (mean_hu, sd_hu) in _ORGAN_HU.items():
        inside = label == label_id
        image[inside] = mean_hu + sd_hu * texture[inside]
    image = ndimage.gaussian_filter(image, 0.6)  # partial-volume blur at the edges
    image += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)

    affine = _random_affine(rng, spacing, extent)
    return Phantom(image=image.astype(np.float32), label=label, affine=affine)


def make_many_structure_ct(
    seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
    structures: int = 41,
) -> Phantom:
    """A large CT-like volume with many labelled structures (for memory and speed figures of
    many-class models): an elliptic body in air and `structures` ellipsoids of distinct HU
    spread through it. Drawn slice by slice, so a 512 x 512 x 600 volume needs only its own
    int16 image and uint8 label in memory. RAS affine, origin at the volume centre."""
    rng = np.random.default_rng(seed)
    extent = np.array(shape) * np.array(spacing)
    x, y = (np.arange(n, dtype=np.float32) * s for n, s in zip(shape[:2], spacing[:2],
                                                              strict=True))
    x, y = np.meshgrid(x, y, indexing="ij", sparse=True)
    body = ((x - extent[0] / 2) / (extent[0] * 0.45)) ** 2 + \
        ((y - extent[1] / 2) / (extent[1] * 0.35)) ** 2 <= 1.0
    columns = int(np.ceil(structures ** (1 / 3)))
    cells = np.stack(np.meshgrid(*[np.arange(columns)] * 3, indexing="ij"), -1).reshape(-1, 3)
    cells = cells[rng.permutation(len(cells))[:structures]]
    box_low = np.array([0.25, 0.3, 0.05]) * extent
    box_size = np.array([0.5, 0.4, 0.9]) * extent
    centres = box_low + (cells + 0.5 + rng.uniform(-0.15, 0.15, cells.shape)) / columns * box_size
    radii = np.minimum(box_size / columns * 0.4, 25.0) * rng.uniform(0.7, 1.0, cells.shape)
    hu = np.linspace(-50, 1200, structures)[rng.permutation(structures)]
    image = np.empty(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    for k in range(shape[2]):
        z = k * spacing[2]
        plane = np.where(body, 30.0, -1000.0).astype(np.float32)
        plane_label = label[:, :, k]
        for index in np.flatnonzero(np.abs(centres[:, 2] - z) < radii[:, 2]):
            (cx, cy, cz), (rx, ry, rz) = centres[index], radii[index]
            inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0 - ((z - cz) / rz) ** 2
            plane[inside] = hu[index]
            plane_label[inside] = index + 1
        plane += rng.normal(0.0, 20.0, size=plane.shape).astype(np.float32)
        image[:, :, k] = np.clip(plane, -1024, 3000)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -extent / 2
    return Phantom(image=image, label=label, affine=affine)


def write_phantom_dataset(
    root: str | Path, n_train: int = 8, n_test: int = 4, seed: int = 0,
    shape: tuple[int, int, int] | None = None, spacing: tuple[float, float, float] | None = None,
) -> Path:
    """Write an MSD-layout dataset (dataset.json, imagesTr, labelsTr, imagesTs, labelsTs).

    `shape` and `spacing` fix every case's grid (the tests use small, coarse volumes)."""
    root = Path(root)
    training, test = [], []
    for index in range(n_train + n_test):
        case = f"phantom_{index:03d}"
        phantom = make_phantom(seed * 1000 + index, shape=shape, spacing=spacing)
        is_train = index < n_train
        image_dir, label_dir = ("imagesTr", "labelsTr") if is_train else ("imagesTs", "labelsTs")
        image_path = root / image_dir / f"{case}.nii.gz"
        label_path = root / label_dir / f"{case}.nii.gz"
        _save_nifti(phantom.image.astype(np.int16), phantom.affine, image_path)
        _save_nifti(phantom.label, phantom.affine, label_path)
        if is_train:
            training.append({"image": f"./imagesTr/{case}.nii.gz",
                             "label": f"./labelsTr/{case}.nii.gz"})
        else:
            test.append(f"./imagesTs/{case}.nii.gz")
    description = {
        "name": "Phantoms",
        "description": "Synthetic CT-like phantoms generated by medseg.phantoms",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in PHANTOM_LABELS.items()},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    atomic_write_json(root / "dataset.json", description)
    return root / "dataset.json"


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def _physical_grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing, strict=True)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _ellipse_cylinder(grid, extent, rng, shrink: float = 1.0) -> np.ndarray:
    x, y, _ = grid
    cx, cy = extent[0] / 2, extent[1] / 2
    rx = extent[0] * 0.45 * shrink * float(rng.uniform(0.95, 1.0))
    ry = extent[1] * 0.38 * shrink * float(rng.uniform(0.95, 1.0))
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _blob(grid, extent, rng, centre_frac, radii_mm) -> np.ndarray:
    """An ellipsoid at a jittered position, its surface bent by smooth random noise."""
    x, y, z = grid
    centre = np.array([
        extent[0] * (centre_frac[0] + rng.uniform(-0.05, 0.05)),
        extent[1] * (centre_frac[1] + rng.uniform(-0.05, 0.05)),
        extent[2] * rng.uniform(0.4, 0.6),
    ])
    radii = np.array(radii_mm, dtype=float) * rng.uniform(0.8, 1.2, size=3)
    radii[2] = min(radii[2], extent[2] * 0.3)
    angle = rng.uniform(0, np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    level = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=6.0)
    wobble *= 0.25 / (np.abs(wobble).max() + 1e-6)
    return level + wobble <= 1.0


def _spine(grid, extent, rng) -> np.ndarray:
    """A vertebral column: a cylinder along z behind the organs, slightly curved."""
    x, y, z = grid
    cx = extent[0] * (0.5 + rng.uniform(-0.03, 0.03))
    cy = extent[1] * 0.75
    curve = 4.0 * np.sin(z / extent[2] * np.pi * rng.uniform(0.5, 1.5))
    radius = float(rng.uniform(9.0, 12.0))
    return (x - cx - curve) ** 2 + (y - cy) ** 2 <= radius**2


def _random_affine(rng, spacing, extent) -> np.ndarray:
    """Voxel-to-RAS affine: random axis flips, a small oblique rotation, a random origin."""
    flips = np.diag(rng.choice([-1.0, 1.0], size=3))
    a, b = np.deg2rad(rng.uniform(-8, 8, size=2))
    rot_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rot_z = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    linear = rot_z @ rot_x @ flips @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ (np.array(extent) / np.array(spacing) / 2) + rng.uniform(-20, 20, 3)
    return affine

