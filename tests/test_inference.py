"""The streaming sliding window and the plane-by-plane way back to the input grid, against
whole-volume references computed the plain way."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.inference import (
    accumulation_dtype,
    accumulator_bytes,
    axis_maps,
    foreground_box,
    gaussian_importance,
    labels_on_input_grid,
    stream_probabilities,
    window_starts,
)

CLASSES = 3


def fake_network(batch: torch.Tensor) -> torch.Tensor:
    """Position-dependent class probabilities, so that window overlap and weighting matter."""
    torch.manual_seed(0)
    kernel = torch.randn(CLASSES, batch.shape[1], 3, 3, 3)
    logits = torch.nn.functional.conv3d(batch, kernel, padding=1)
    ramp = torch.linspace(-1, 1, batch.shape[-1])
    return torch.softmax(logits + ramp, dim=1)


def whole_volume_reference(image: torch.Tensor, patch, step) -> torch.Tensor:
    """Gaussian-weighted sliding window with a float64 classes x volume accumulator."""
    shape = image.shape[1:]
    padded = [max(s, p) for s, p in zip(shape, patch, strict=True)]
    before = [(p - s) // 2 for s, p in zip(shape, padded, strict=True)]
    pads = []
    for s, p, b in reversed(list(zip(shape, padded, before, strict=True))):
        pads += [b, p - s - b]
    image = torch.nn.functional.pad(image, pads)
    scores = torch.zeros((CLASSES, *padded), dtype=torch.float64)
    weights = torch.zeros(padded, dtype=torch.float64)
    importance = gaussian_importance(patch, torch.device("cpu")).double()
    starts = [window_starts(s, p, step) for s, p in zip(padded, patch, strict=True)]
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                box = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                window = fake_network(image[(slice(None), *box)][None])[0].double()
                scores[(slice(None), *box)] += window * importance
                weights[box] += importance
    probabilities = scores / weights
    return probabilities[:, before[0]:before[0] + shape[0], before[1]:before[1] + shape[1],
                         before[2]:before[2] + shape[2]]


@pytest.mark.parametrize("shape", [(30, 26, 41), (12, 40, 16)])
def test_streamed_planes_equal_the_whole_volume_sliding_window(shape):
    patch, step = (16, 16, 12), 0.5
    image = torch.randn((2, *shape), generator=torch.Generator().manual_seed(1))
    expected = whole_volume_reference(image, patch, step)
    seen = []
    for first, planes in stream_probabilities(fake_network, image, CLASSES, patch, step,
                                              batch_size=3):
        assert planes.shape[:3] == (CLASSES, *shape[:2])
        seen.extend(range(first, first + planes.shape[-1]))
        reference = expected[..., first:first + planes.shape[-1]]
        # float32 sums (the default; float16 only for buffers too large for float32) against
        # the float64 reference: about 2e-6 apart
        np.testing.assert_allclose(planes.numpy(), reference.numpy(), atol=1e-5)
        agree = (planes.argmax(0) == reference.argmax(0)).float().mean()
        assert agree > 0.999
    assert seen == list(range(shape[2]))


def test_window_starts_cover_the_axis_evenly():
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(16, 16, 0.5) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert max(np.diff(starts)) <= 16
    tiny = window_starts(122, 32, 0.001)  # each window once: 2814 starts were 91 distinct
    assert tiny == list(range(0, 91))


def affine(matrix, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = origin
    return out


def interpolated_labels(probabilities: torch.Tensor, network_affine: np.ndarray,
                        input_affine: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """The argmax of the network grid's probabilities interpolated (scipy, linearly) at
    every input voxel's position, flattened: what the streamed back-mapping must give."""
    network_shape = probabilities.shape[1:]
    grid = np.indices(input_shape).reshape(3, -1).astype(float)
    physical = input_affine[:3, :3] @ grid + input_affine[:3, 3:]
    network = np.linalg.inv(network_affine)[:3, :3] @ physical
    network = np.clip(network, 0, np.array(network_shape)[:, None] - 1)
    return np.stack([ndimage.map_coordinates(p, network, order=1, mode="nearest")
                     for p in probabilities.double().numpy()]).argmax(0)


def test_labels_follow_a_permuted_flipped_and_scaled_grid():
    """Network grid 2 mm RAS; input grid 1 x 1 x 3 mm, stored (z, -x, y): the labels must be
    the argmax of the linearly interpolated probabilities at each input voxel's position."""
    rng = np.random.default_rng(0)
    network_shape = (10, 12, 9)
    probabilities = torch.from_numpy(rng.random((CLASSES, *network_shape))).float()
    network_affine = affine(np.diag([2.0, 2.0, 2.0]))
    # input voxel (i, j, k) lies at x = 18 - j, y = k, z = 3 i (mm)
    input_affine = affine([[0, -1.0, 0], [0, 0, 1.0], [3.0, 0, 0]], origin=(18.0, 0.0, 0.0))
    input_shape = (6, 19, 23)
    maps = axis_maps(input_affine, network_affine, input_shape)
    planes = iter([(0, probabilities[..., :4]), (4, probabilities[..., 4:])])
    box = tuple(slice(0, s) for s in network_shape)
    labels = labels_on_input_grid(planes, network_shape, box, CLASSES, maps, input_shape)

    expected = interpolated_labels(probabilities, network_affine, input_affine, input_shape)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels.reshape(-1), expected)


def test_outside_the_box_is_background():
    network_shape = (8, 8, 8)
    box = (slice(2, 6), slice(1, 7), slice(3, 5))
    planes = torch.zeros((CLASSES, 4, 6, 2))
    planes[2] = 1.0
    identity = affine(np.eye(3))
    labels = labels_on_input_grid(iter([(0, planes)]), network_shape, box, CLASSES,
                                  axis_maps(identity, identity, network_shape), network_shape)
    expected = np.zeros(network_shape, np.uint8)
    expected[box] = 2
    np.testing.assert_array_equal(labels, expected)


def test_foreground_box_has_a_margin_and_respects_the_edges():
    image = torch.full((1, 40, 40, 40), -2.0)
    image[0, 10:20, 30:35, 0:5] = 1.0
    box = foreground_box(image, (16, 16, 16), torch.tensor([-2.0]))
    # the margin gives 6:24, 26:39 and 0:9; the last two are widened to a patch within the
    # image, so that no window is padded where the scan has its own background
    assert box == (slice(6, 24), slice(24, 40), slice(0, 16))


def test_a_body_smaller_than_a_patch_is_seen_in_its_own_air_not_in_padding():
    """A CT body smaller than half a patch: its box with the margin was smaller than the
    patch, so the windows were padded with 0 (the normalized foreground mean) where the scan
    has air (-3 here): tissue-like input the network was never trained on."""
    from medseg.inference import stream_probabilities

    image = torch.full((1, 96, 96, 96), -3.0)
    image[0, 38:58, 38:58, 38:58] = 0.5
    box = foreground_box(image, (64, 64, 64), torch.tensor([-3.0]))
    seen = []

    def record(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.clone())
        return torch.ones((batch.shape[0], 2, *batch.shape[2:]))

    for _ in stream_probabilities(record, image[(slice(None), *box)], 2, (64, 64, 64), 0.5, 1):
        pass
    windows = torch.cat(seen)
    assert int((windows == 0.0).sum()) == 0, "no padding inside any window"
    assert all(b.stop - b.start == 64 for b in box)


def test_an_oblique_relation_between_grids_is_refused():
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    with pytest.raises(MedsegError, match="too far from right angles"):
        axis_maps(affine(rotation), affine(np.eye(3)), (10, 10, 10))


def test_axes_a_rounding_error_off_a_right_angle_are_mapped_others_refused():
    """A DICOM series' cosines written to 4 decimals (dot product 9e-5) made predict fail
    while convert read it: the old bound compared network voxels of a 4 mm axis with those
    of an 8 mm one. What counts is how far the far end of an axis lands off."""
    network = affine(np.diag([4.0, 4.0, 8.0]))
    sheared = np.eye(3)
    sheared[0, 2] = 9e-5  # the 3 mm slice axis leans towards x
    maps = axis_maps(affine(sheared @ np.diag([1.0, 1.0, 3.0])), network, (32, 32, 20))
    assert [(m.input_axis, m.network_axis) for m in maps] == [(0, 0), (1, 1), (2, 2)]
    # 0.01 degrees over a long CT: 1000 slices of 1.5 mm onto 0.8 mm
    sheared[0, 2] = np.sin(np.deg2rad(0.01))
    axis_maps(affine(sheared @ np.diag([0.8, 0.8, 1.5])), affine(np.diag([0.8] * 3)),
              (512, 512, 1000))
    # 0.1 degrees (cosines rounded to 3 decimals): 200 voxels are mapped, 400 are not
    sheared[0, 2] = np.sin(np.deg2rad(0.1))
    axis_maps(affine(sheared), affine(np.eye(3)), (200, 200, 200))
    with pytest.raises(MedsegError, match=r"\(0.70 network voxels off at the far end\)"):
        axis_maps(affine(sheared), affine(np.eye(3)), (400, 400, 400))
    sheared[0, 2] = 0.1  # 5.7 degrees: the far end of 20 slices lands 1.4 voxels off
    with pytest.raises(MedsegError, match=r"too far from right angles .* \(1.4\d network "
                                          r"voxels off at the far end\)"):
        axis_maps(affine(sheared @ np.diag([1.0, 1.0, 3.0])), network, (32, 32, 20))


def test_accumulator_bytes_count_the_padded_ring_buffer_float32_unless_told():
    patch = (16, 16, 12)
    # (classes x X x Y x patch depth) float16; axes smaller than a patch are padded to it
    half = torch.float16
    assert accumulator_bytes(CLASSES, (30, 10, 41), patch, half) == CLASSES * 30 * 16 * 12 * 2
    assert accumulator_bytes(42, (273, 273, 400), (96, 96, 96), half) == 42 * 273 * 273 * 96 * 2
    assert accumulator_bytes(42, (273, 273, 400), (96, 96, 96)) == 42 * 273 * 273 * 96 * 4


def test_class_scores_accumulate_in_float32_unless_the_buffer_would_be_large():
    """float16 sums at a small step flipped 0.5 % of the voxels of near-tied classes."""
    assert accumulation_dtype(3, (200, 200, 200), (96, 96, 96)) == torch.float32
    assert accumulation_dtype(42, (273, 273, 400), (96, 96, 96)) == torch.float16

    def near_tie(batch: torch.Tensor) -> torch.Tensor:
        probabilities = torch.empty((batch.shape[0], 2, *batch.shape[2:]))
        probabilities[:, 0], probabilities[:, 1] = 0.495, 0.505
        return probabilities

    image = torch.zeros((1, 40, 40, 40))
    for dtype, wrong in ((torch.float32, 0), (torch.float16, None)):
        flipped = sum(int((planes.argmax(0) == 0).sum()) for _, planes in stream_probabilities(
            near_tie, image, 2, (16, 16, 16), 0.05, batch_size=8, accumulate=dtype))
        if wrong is None:
            assert flipped > 0  # the drift this guards against
        else:
            assert flipped == wrong


@pytest.mark.parametrize("box", [
    (slice(2, 7), slice(3, 10), slice(1, 6)),
    (slice(0, 10), slice(11, 12), slice(8, 9)),  # one network voxel at the far edges
    (slice(4, 5), slice(0, 12), slice(0, 9)),
])
def test_a_partial_box_gives_the_labels_of_the_whole_grid(box):
    """Only input voxels whose interpolation reaches into the box are interpolated; the
    labels must be those of interpolating the whole grid, background outside the box."""
    rng = np.random.default_rng(1)
    network_shape = (10, 12, 9)
    probabilities = torch.zeros((CLASSES, *network_shape))
    probabilities[0] = 1.0  # background outside the box
    inside = torch.from_numpy(rng.random((CLASSES, *(b.stop - b.start for b in box)))).float()
    probabilities[(slice(None), *box)] = inside
    network_affine = affine(np.diag([2.0, 2.0, 2.0]))
    input_affine = affine([[0, -1.0, 0], [0, 0, 1.0], [3.0, 0, 0]], origin=(18.0, 0.0, 0.0))
    input_shape = (6, 19, 23)
    maps = axis_maps(input_affine, network_affine, input_shape)
    labels = labels_on_input_grid(iter([(0, inside)]), network_shape, box, CLASSES, maps,
                                  input_shape)

    expected = interpolated_labels(probabilities, network_affine, input_affine, input_shape)
    np.testing.assert_array_equal(labels.reshape(-1), expected)
    assert (labels > 0).sum() < labels.size  # background around the box
