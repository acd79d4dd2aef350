"""Resampling a tilted or unevenly spaced DICOM stack onto a regular grid in physical space.

The grid keeps the slices' own plane orientation and pixel spacing; its slice axis runs along
the slice normal with a step no larger than the smallest gap between slices, and it widens in
plane to hold every shifted slice. Each grid plane is interpolated linearly between the two
original slices around it, each sampled (cubic spline) where the grid plane's pixels physically
lie, so every slice lands where it belongs: nothing is stretched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.dicom import LPS_TO_RAS, MAX_VOXELS, Stack, in_plane_offsets, read_pixels
from medseg.errors import MedsegError


@dataclass(frozen=True)
class RegularGrid:
    """Where the resampled volume lies: shape, voxel -> RAS affine, and for each original
    slice its in-plane offset from the grid origin (in pixels, along columns and rows)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    slice_offsets: np.ndarray  # (n_slices, 2)
    depths: np.ndarray  # depth of each grid plane along the normal


def regular_grid(stack: Stack, path: Path) -> RegularGrid:
    """The regular grid that holds every slice of the stack (headers only, nothing read)."""
    columns, rows, n_slices = stack.shape
    if n_slices < 2:
        raise MedsegError("a single slice needs no resampling", path)
    offsets = in_plane_offsets(stack)
    shifts = np.stack([offsets @ stack.row / stack.spacing[0],
                       offsets @ stack.column / stack.spacing[1]], axis=1)
    # whole-pixel shifts stay whole: a rounding error would put an edge just off the slice
    shifts = np.where(np.abs(shifts - np.rint(shifts)) < 1e-4, np.rint(shifts), shifts)
    low = np.floor(shifts.min(axis=0) + 1e-6).astype(int)
    high = np.ceil(shifts.max(axis=0) - 1e-6).astype(int)
    extent = float(stack.depths[-1] - stack.depths[0])
    smallest_gap = float(np.diff(stack.depths).min())
    n_planes = int(np.ceil(extent / smallest_gap - 1e-3)) + 1
    step = extent / (n_planes - 1)
    shape = (columns + int(high[0] - low[0]), rows + int(high[1] - low[1]), n_planes)
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise MedsegError(f"the regular grid {shape} would hold more than 2^31 voxels", path)
    lps = np.eye(4)
    lps[:3, 0] = stack.row * stack.spacing[0]
    lps[:3, 1] = stack.column * stack.spacing[1]
    lps[:3, 2] = stack.normal * step
    lps[:3, 3] = (stack.frames[0].position + low[0] * lps[:3, 0] + low[1] * lps[:3, 1])
    return RegularGrid(shape, LPS_TO_RAS @ lps, shifts - low,
                       stack.depths[0] + step * np.arange(n_planes))


def resample_stack(stack: Stack, path: Path, dtype: np.dtype) -> tuple[np.ndarray, RegularGrid]:
    """The stack's voxels on its regular grid; outside every slice, the series' minimum.
    Within the series' value range: the cubic spline overshoots at sharp edges (air against
    bone read -1072 HU where no slice holds less than -1024)."""
    grid = regular_grid(stack, path)
    slices = read_pixels(stack, np.dtype(np.float32))
    fill, highest = float(slices.min()), float(slices.max())
    placed = [_placed(slices[:, :, k], grid, k, fill) for k in range(slices.shape[2])]
    del slices
    out = np.empty(grid.shape, dtype=dtype)
    for plane, depth in enumerate(grid.depths):
        below = int(np.clip(np.searchsorted(stack.depths, depth, side="right") - 1, 0,
                            len(stack.depths) - 2))
        gap = stack.depths[below + 1] - stack.depths[below]
        weight = float(np.clip((depth - stack.depths[below]) / gap, 0.0, 1.0))
        values = (1.0 - weight) * placed[below] + weight * placed[below + 1]
        out[:, :, plane] = _fitted(np.clip(values, fill, highest), dtype)
    return out, grid


def _fitted(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rounded and clipped for an integer type (cubic interpolation may overshoot)."""
    if not np.issubdtype(dtype, np.integer):
        return values
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max)


def _placed(values: np.ndarray, grid: RegularGrid, index: int, fill: float) -> np.ndarray:
    """One slice sampled on the grid's in-plane lattice (cubic spline, as nnU-Net resamples
    images; `fill` outside it)."""
    shift = grid.slice_offsets[index]
    return ndimage.affine_transform(values, np.eye(2), offset=-shift,
                                    output_shape=grid.shape[:2], order=3, mode="constant",
                                    cval=fill)
