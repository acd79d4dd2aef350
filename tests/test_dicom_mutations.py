"""DICOM series checks that a mutation audit found unguarded: slices that drift off a regular
grid a little at each gap, and one slice whose PixelSpacing differs from the rest."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import slice_dataset, write_series

from medseg.errors import MedsegError
from medseg.io import read_volume

ROWS, COLUMNS = 6, 5
SPACING = (0.8, 0.7)  # DICOM PixelSpacing: between rows, between columns


def stored_values(slices: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, (ROWS, COLUMNS, slices)).astype(
        np.uint16)


def test_slices_drifting_off_a_regular_grid_are_refused(tmp_path):
    """20 slices: 10 gaps of 2.50 mm, then 9 of 2.54 mm. Each gap is within the per-gap
    tolerance (0.04 mm off the 2.50 mm median, tolerance max(0.05, 1% of 2.50) = 0.05 mm),
    but against the regular grid (step 47.86 / 19 = 2.519 mm) slice 11 lies 0.19 mm off.
    Kills: dicom.spacing_problem's `drift = _grid_drift(stack)` -> `drift = 0.0`."""
    gaps = [2.50] * 10 + [2.54] * 9
    depths = np.concatenate([[0.0], np.cumsum(gaps)])
    positions = [[-20.0, -30.0, round(40.0 + z, 2)] for z in depths]
    stored = stored_values(len(positions))
    folder = tmp_path / "drifting_series"
    write_series(folder, stored, positions, spacing=SPACING)
    with pytest.raises(MedsegError) as caught:
        read_volume(folder)
    message = str(caught.value)
    assert caught.value.path == folder
    assert message.startswith(f"{folder}: ")
    assert ("uneven slice spacing: slices drift up to 0.19 mm from a regular grid "
            "(tolerance 0.05 mm)") in message
    assert "gap of" not in message  # no single gap is to blame
    assert "--resample-irregular" in message
    # asked to, it is resampled onto a regular grid instead
    assert read_volume(folder, resample_irregular=True).spatial_shape[:2] == (COLUMNS, ROWS)


def test_a_slice_with_another_pixel_spacing_is_refused_naming_it(tmp_path):
    """One slice of five says PixelSpacing 0.9 where the rest say 0.8 (between rows).
    Kills: dicom._order's PixelSpacing agreement check disabled."""
    stored = stored_values(5, seed=1)
    positions = [[0.0, 0.0, 2.5 * k] for k in range(5)]
    paths = write_series(tmp_path, stored, positions, spacing=SPACING)
    odd = paths[2]
    slice_dataset(stored[:, :, 2], positions[2], instance=3, spacing=(0.9, 0.7)).save_as(
        odd, enforce_file_format=True)
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    assert caught.value.path == odd
    message = str(caught.value)
    assert message.startswith(f"{odd}: pixel spacing (0.9, 0.7) differs from (0.8, 0.7) in ")
    assert paths[0].name in message or paths[1].name in message  # the typical slice named
