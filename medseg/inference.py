"""Memory-bounded sliding-window inference and the way back to the input grid.

MONAI's `sliding_window_inference` returns the whole classes x volume output, and `Invertd`
resamples the whole classes x input-grid array; for a 42-class model on a 512 x 512 x 600 CT
that is tens of GB of float32. No library streams both, so this module does it in planes:

1. windows run in the order of their start along the network grid's last axis; their
   Gaussian-weighted class probabilities accumulate in a buffer (float16 when float32 would
   be large, see `accumulation_dtype`) only one window
   (plus one step) deep along that axis;
2. each plane that no later window touches leaves the buffer as float32 probabilities;
3. each plane of the input grid is interpolated (linearly, class scores, not labels) from the
   two network planes around it and reduced to labels by argmax at once.

The network grid (RAS orientation and resampling of the input, see `transforms.preprocessing`)
is axis-aligned with the input grid: orientation permutes and flips axes and resampling scales
them, so every input axis maps to one network axis by `index -> scale * index + offset`. The
interpolation is therefore separable, and a plane of the input needs two planes of the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from medseg.errors import MedsegError

WindowPredictor = Callable[[torch.Tensor], torch.Tensor]
FLUSH_PLANES = 4
WINDOW_BATCH_BYTES = 128 * 2**20  # float32 class scores of one batch of windows
# an input axis may map onto a network axis with its far end this far (network voxels) off:
# the mask goes back axis by axis, so a scan sheared by 0.1 degrees (cosines rounded to 3
# decimals) stays within it up to ~290 network voxels along an axis, 0.01 degrees to ~2900
MAX_NEGLECTED_SHIFT_VOXELS = 0.5
FLOAT32_ACCUMULATOR_BYTES = 512 * 2**20


def window_batch_size(requested: int, num_classes: int, patch: tuple[int, ...]) -> int:
    """Windows per forward pass: as requested, but fewer when their class scores would pass
    WINDOW_BATCH_BYTES (a 42-class model on 96^3 windows holds 142 MB per window)."""
    per_window = num_classes * int(np.prod(patch)) * 4
    return max(1, min(requested, WINDOW_BATCH_BYTES // per_window))


@dataclass(frozen=True)
class AxisMap:
    """Input axis `input_axis` maps to network axis `network_axis`:
    network index = scale * input index + offset."""

    input_axis: int
    network_axis: int
    scale: float
    offset: float


def window_count(shape: tuple[int, ...], patch: tuple[int, ...], step: float) -> int:
    """How many windows `stream_probabilities` runs over an image of `shape`."""
    return int(np.prod([len(window_starts(max(s, p), p, step))
                        for s, p in zip(shape, patch, strict=True)]))


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """Window starts along one axis, evenly spread so that the first window starts at 0, the
    last ends at `size`, and neighbours are at most `step * patch` apart (nnU-Net's rule)."""
    if size <= patch:
        return [0]
    # a step under one voxel would repeat windows (step 0.001: 2814 starts, 91 distinct): at
    # most one start per voxel, the same starts without listing billions (step 1e-8 took
    # minutes, and 1e-320 overflowed to an infinite count)
    count = int(min(np.ceil((size - patch) / (patch * step)), size - patch)) + 1
    spacing = (size - patch) / (count - 1)
    return sorted({int(round(spacing * k)) for k in range(count)})


def gaussian_importance(patch: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """MONAI's Gaussian importance map (sigma = patch / 8), the same one its inferer uses."""
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(patch), mode="gaussian", sigma_scale=0.125,
                                  device=device).float()


def foreground_box(image: torch.Tensor, patch: tuple[int, ...],
                   background: torch.Tensor) -> tuple[slice, ...]:
    """Bounding box of voxels that differ from their channel's `background` value in any
    channel (nnU-Net's crop to the nonzero region; for CT the air floor), widened by a quarter
    patch of context, and to a whole patch where the axis has one: a box smaller than the
    patch would be padded with zeros (the normalized mean, not the background the scan has
    there), an input training never showed the network (it pads only whole images smaller
    than a patch)."""
    mask = ((image - background.reshape(-1, 1, 1, 1)).abs() > 1e-4).any(0)
    box = []
    for axis, size in enumerate(mask.shape):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = torch.nonzero(mask.any(dim=other)).flatten()
        if hits.numel() == 0:
            return tuple(slice(0, 0) for _ in mask.shape)
        margin = patch[axis] // 4
        start, stop = max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, size)
        box.append(_widened(start, stop, min(patch[axis], size), size))
    return tuple(box)


def _widened(start: int, stop: int, length: int, size: int) -> slice:
    """[start, stop) widened about its middle to `length` voxels, kept within 0..size."""
    missing = length - (stop - start)
    if missing <= 0:
        return slice(start, stop)
    start = min(max(start - missing // 2, 0), size - length)
    return slice(start, start + length)


def accumulator_bytes(num_classes: int, shape: tuple[int, ...], patch: tuple[int, ...],
                      accumulate: torch.dtype = torch.float32) -> int:
    """Bytes of the class-score ring buffer `stream_probabilities` keeps for an image of
    `shape` (X, Y, Z): classes x X x Y x patch depth, each axis at least a patch."""
    x, y = (max(s, p) for s, p in zip(shape[:2], patch[:2], strict=True))
    return num_classes * x * y * patch[2] * torch.tensor([], dtype=accumulate).element_size()


def accumulation_dtype(num_classes: int, shape: tuple[int, ...], patch: tuple[int, ...]
                       ) -> torch.dtype:
    """float32 class-score sums where their buffer stays small (most models and scans),
    float16 only where float32 would pass FLOAT32_ACCUMULATOR_BYTES (many classes on a large
    CT): float16 sums drift by a few units in the last place per window, enough to flip
    voxels whose classes are within 0.02 of each other when windows overlap densely."""
    if accumulator_bytes(num_classes, shape, patch, torch.float32) <= FLOAT32_ACCUMULATOR_BYTES:
        return torch.float32
    return torch.float16


def stream_probabilities(predict_windows: WindowPredictor, image: torch.Tensor,
                         num_classes: int, patch: tuple[int, int, int], step: float,
                         batch_size: int, accumulate: torch.dtype = torch.float32,
                         on_windows: Callable[[int], object] | None = None
                         ) -> Iterator[tuple[int, torch.Tensor]]:
    """Gaussian-weighted sliding window over a (C, X, Y, Z) image, yielding `(z, planes)`:
    the class probabilities (classes, X, Y, n) float32 of planes z..z+n-1, in order.

    `predict_windows` maps a (B, C, *patch) batch to (B, classes, *patch) probabilities;
    `on_windows` hears how many windows each batch ran (for a progress bar).
    Memory: one `accumulate` buffer of classes x X x Y x patch depth."""
    shape = tuple(image.shape[1:])
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch, strict=True))
    before = [(p - s) // 2 for s, p in zip(shape, padded_shape, strict=True)]
    if padded_shape != shape:  # smaller than a window: pad with zeros (the normalized mean)
        pads = []
        for s, p, b in reversed(list(zip(shape, padded_shape, before, strict=True))):
            pads += [b, p - s - b]
        image = torch.nn.functional.pad(image, pads)
    starts = [window_starts(s, p, step) for s, p in zip(padded_shape, patch, strict=True)]
    px, py, pz = patch
    importance = gaussian_importance(patch, image.device)
    # a ring of pz planes: window rows start at z0 in turn, and while row z0 runs only planes
    # z0 .. z0 + pz - 1 are open (plane z sits at z % pz)
    scores = torch.zeros((num_classes, padded_shape[0], padded_shape[1], pz), dtype=accumulate)
    weights = torch.zeros((padded_shape[0], padded_shape[1], pz), dtype=torch.float32)
    plane_box = (slice(before[0], before[0] + shape[0]), slice(before[1], before[1] + shape[1]))
    corners = [(x0, y0) for x0 in starts[0] for y0 in starts[1]]
    for index, z0 in enumerate(starts[2]):
        ring = torch.arange(z0, z0 + pz) % pz
        for first in range(0, len(corners), batch_size):
            chunk = corners[first:first + batch_size]
            batch = torch.stack([image[:, x0:x0 + px, y0:y0 + py, z0:z0 + pz]
                                 for x0, y0 in chunk])
            probabilities = predict_windows(batch).float().mul_(importance)
            for (x0, y0), window in zip(chunk, probabilities, strict=True):
                scores[:, x0:x0 + px, y0:y0 + py].index_add_(3, ring, window.to(accumulate))
                weights[x0:x0 + px, y0:y0 + py].index_add_(2, ring, importance)
            if on_windows is not None:
                on_windows(len(chunk))
        done = starts[2][index + 1] if index + 1 < len(starts[2]) else padded_shape[2]
        # finished planes leave in small groups: float32 copies of a whole step would be as
        # large as a float16 buffer itself
        for lo in range(max(z0, before[2]), min(done, before[2] + shape[2]), FLUSH_PLANES):
            kept = torch.arange(lo, min(lo + FLUSH_PLANES, done, before[2] + shape[2])) % pz
            planes = scores[:, plane_box[0], plane_box[1]].index_select(3, kept).float()
            planes /= weights[plane_box].index_select(2, kept).clamp_min(1e-6)
            yield lo - before[2], planes
        finished = torch.arange(z0, done) % pz
        scores.index_fill_(3, finished, 0)
        weights.index_fill_(2, finished, 0)


def merged_planes(streams: list[Iterator[tuple[int, torch.Tensor]]], shares: list[float]
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """The share-weighted sum of several `stream_probabilities` over one region (windows of
    other sizes flush planes in other groups: they are met plane by plane, so each stream
    holds at most one flush group beyond the merged planes), in groups of FLUSH_PLANES."""
    singles = [_single_planes(stream) for stream in streams]
    pending: list[torch.Tensor] = []
    first = 0
    for parts in zip(*singles, strict=True):
        z = parts[0][0]
        if any(other != z for other, _ in parts[1:]):  # the streams cover one region
            raise RuntimeError(f"window groups out of step at plane {z}")
        plane = parts[0][1].mul(shares[0])
        for (_, other), share in zip(parts[1:], shares[1:], strict=True):
            plane.add_(other, alpha=share)
        if not pending:
            first = z
        pending.append(plane)
        if len(pending) == FLUSH_PLANES:
            yield first, torch.stack(pending, dim=3)
            pending = []
    if pending:
        yield first, torch.stack(pending, dim=3)


def _single_planes(stream: Iterator[tuple[int, torch.Tensor]]
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    for z, planes in stream:
        for offset in range(planes.shape[3]):
            yield z + offset, planes[..., offset]


def axis_maps(input_affine: np.ndarray, network_affine: np.ndarray,
              input_shape: tuple[int, int, int]) -> list[AxisMap]:
    """How each input axis maps onto the network grid; refuses grids that are not
    axis-aligned (preprocessing only permutes, flips and scales axes, so they are, up to
    the input's own rounding: a DICOM series' cosines written to 4 decimals are 0.005
    degrees off a right angle, which moves no voxel by more than a sliver)."""
    voxel_map = np.linalg.inv(network_affine) @ input_affine
    linear = voxel_map[:3, :3]
    maps = []
    for input_axis in range(3):
        column = np.abs(linear[:, input_axis])
        network_axis = int(np.argmax(column))
        # how far (network voxels) mapping this axis alone moves its far end off its place
        neglected = np.delete(column, network_axis).max() * max(input_shape[input_axis] - 1, 1)
        if neglected > MAX_NEGLECTED_SHIFT_VOXELS:
            raise MedsegError(f"the voxel axes are too far from right angles to put the mask "
                              f"back onto this scan's grid ({neglected:.2f} network voxels "
                              f"off at the far end); resample it onto an orthogonal grid "
                              f"first")
        maps.append(AxisMap(input_axis, network_axis, float(linear[network_axis, input_axis]),
                            float(voxel_map[network_axis, 3])))
    if sorted(m.network_axis for m in maps) != [0, 1, 2]:
        raise MedsegError("the voxel axes are too far from right angles to put the mask back "
                          "onto this scan's grid; resample it onto an orthogonal grid first")
    return sorted(maps, key=lambda m: m.network_axis)


def labels_on_input_grid(planes: Iterator[tuple[int, torch.Tensor]],
                         network_shape: tuple[int, int, int], box: tuple[slice, ...],
                         num_classes: int, maps: list[AxisMap],
                         input_shape: tuple[int, int, int]) -> np.ndarray:
    """Argmax labels on the input grid from streamed network planes (of the region `box`;
    outside it everything is background), interpolating class probabilities linearly."""
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    labels = np.zeros(input_shape, dtype=dtype)
    x_map, y_map, z_map = maps
    x_coords = _coordinates(x_map, input_shape, network_shape)
    y_coords = _coordinates(y_map, input_shape, network_shape)
    indices = np.arange(input_shape[z_map.input_axis])
    z_coords = np.clip(z_map.scale * indices + z_map.offset, 0, network_shape[2] - 1)
    order = np.argsort(z_coords, kind="stable")
    out = np.moveaxis(labels, z_map.input_axis, 0)  # a view: writes land in labels
    transpose = x_map.input_axis > y_map.input_axis
    # only input voxels whose interpolation reaches into the box can be anything but
    # background: the rest stays 0 without interpolating classes x plane (most of the time
    # of a many-class model on a large CT)
    plane_shape = (len(x_coords), len(y_coords))
    x_inside, y_inside = _reaching(x_coords, box[0]), _reaching(y_coords, box[1])
    x_coords, y_coords = x_coords[x_inside], y_coords[y_inside]
    cache: dict[int, torch.Tensor] = {}
    full_planes = _full_planes(planes, network_shape, box, num_classes)
    for index in order:
        coordinate = z_coords[index]
        low = int(np.floor(coordinate))
        high = min(low + 1, network_shape[2] - 1)
        while high not in cache:
            z, plane = next(full_planes)
            cache[z] = plane
        for stale in [z for z in cache if z < low]:
            del cache[stale]
        if high < box[2].start or low >= box[2].stop or not len(x_coords) or not len(y_coords):
            continue  # between background planes: background
        weight = float(coordinate - low)
        plane = cache[low] if weight == 0 else torch.lerp(cache[low], cache[high], weight)
        plane = _lerp_along(_lerp_along(plane, x_coords, 1), y_coords, 2)
        plane_labels = np.zeros(plane_shape, dtype=dtype)
        plane_labels[x_inside.start:x_inside.stop, y_inside.start:y_inside.stop] = \
            plane.argmax(0).numpy().astype(dtype)
        out[index] = plane_labels.T if transpose else plane_labels
    return labels


def _reaching(coords: torch.Tensor, box: slice) -> slice:
    """The input indices (a range: `coords` is monotonic) whose network coordinate lies less
    than one voxel from the box [start, stop - 1], so that linear interpolation reads it."""
    near = torch.nonzero((coords > box.start - 1) & (coords < box.stop)).flatten()
    if near.numel() == 0:
        return slice(0, 0)
    return slice(int(near.min()), int(near.max()) + 1)


def _coordinates(axis_map: AxisMap, input_shape, network_shape) -> torch.Tensor:
    indices = np.arange(input_shape[axis_map.input_axis])
    coords = axis_map.scale * indices + axis_map.offset
    return torch.from_numpy(np.clip(coords, 0, network_shape[axis_map.network_axis] - 1))


def _lerp_along(tensor: torch.Tensor, coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of `tensor` along `dim` at fractional indices `coords` (inside
    [0, size - 1]: the edges repeat, as MONAI's border padding)."""
    low = coords.floor().long()
    high = (low + 1).clamp(max=tensor.shape[dim] - 1)
    shape = [1] * tensor.ndim
    shape[dim] = -1
    weight = (coords - low).float().reshape(shape)
    return torch.lerp(tensor.index_select(dim, low), tensor.index_select(dim, high), weight)


def _full_planes(planes: Iterator[tuple[int, torch.Tensor]], network_shape, box, num_classes
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """Every plane of the network grid in order: the streamed planes pasted into a background
    plane where `box` lies, pure background elsewhere."""
    background = torch.zeros((num_classes, network_shape[0], network_shape[1]))
    background[0] = 1.0
    z = 0
    for first, block in planes:
        for offset in range(block.shape[-1]):
            target = box[2].start + first + offset
            while z < target:
                yield z, background
                z += 1
            plane = background.clone()
            plane[:, box[0], box[1]] = block[..., offset]
            yield z, plane
            z += 1
    while z < network_shape[2]:
        yield z, background
        z += 1
