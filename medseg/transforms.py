"""MONAI Compose chains built from a Plan: preprocessing (shared by training, validation and
inference, so that inference inverts exactly what training saw) and training augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai import transforms as mt
from monai.transforms.utils import map_classes_to_indices

from medseg.config import AugmentConfig
from medseg.io import Volume
from medseg.plan import Plan
from medseg.reader import LoadVolumed

IMAGE = "image"
LABEL = "label"
INDICES_POSTFIX = "_class_indices"
# patch centres kept per class and case, spread evenly over its voxels (nnU-Net keeps
# 10 000; medseg has kept twice that since its first cache, which holds them: a change
# would rebuild every cache)
SAMPLES_PER_CLASS = 20_000


def channel_keys(plan: Plan) -> list[str]:
    return [f"{IMAGE}_{c}" for c in range(plan.in_channels)]


def case_dict(images, label=None) -> dict:
    """The dict a preprocessing chain takes: one key per image channel (a path, or a Volume
    already read), plus the label."""
    data = {f"{IMAGE}_{c}": image if isinstance(image, Volume) else str(image)
            for c, image in enumerate(images)}
    if label is not None:
        data[LABEL] = str(label)
    return data


def preprocessing(plan: Plan, with_label: bool) -> mt.Compose:
    """Load (any format `read_volume` reads, a DICOM series folder too), RAS orientation,
    resampling to the target spacing, per-channel normalization, channels stacked into
    `image`."""
    image_keys = channel_keys(plan)
    all_keys = image_keys + ([LABEL] if with_label else [])
    modes = ["bilinear"] * len(image_keys) + (["nearest"] if with_label else [])
    steps: list = [
        LoadVolumed(all_keys, dtype=np.float32, reorderable=[LABEL], label_key=LABEL,
                    label_ids=range(plan.label_id_count)),
        mt.EnsureChannelFirstd(all_keys),
        mt.Orientationd(all_keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        # float32 resampling: MONAI's float64 default doubles the peak memory on large CTs
        mt.Spacingd(all_keys, pixdim=plan.target_spacing, mode=modes, dtype=torch.float32),
    ]
    steps += [_normalize(key, norm) for key, norm in zip(image_keys, plan.normalization,
                                                         strict=True)]
    steps.append(mt.ConcatItemsd(image_keys, IMAGE, dim=0))
    steps.append(mt.DeleteItemsd(image_keys))
    return mt.Compose(steps)


def augmentation(plan: Plan, augment: AugmentConfig, foreground_fraction: float) -> mt.Compose:
    """Random patch sampling with foreground oversampling, then spatial and intensity
    augmentation; image and label are transformed together so they stay aligned."""
    keys = [IMAGE, LABEL]
    patch = plan.patch_size
    classes = plan.num_classes
    rotate_range, scale_range = _spatial_ranges(patch, augment)
    # the crop is as large as a rotated and scaled patch reaches, and cut to the patch after
    # the spatial transform (nnU-Net's order): rotating a cut patch fills its corners with
    # zero padding, 14 % of an augmented patch at 15 degrees and 15 %
    crop = rotation_crop_size(patch, rotate_range, scale_range)
    return mt.Compose([
        mt.SpatialPadd(keys, spatial_size=[p + 2 * augment.shift_voxels for p in patch]),
        # voxel locations of each class, found once per case (this step is still
        # deterministic, so CacheDataset keeps it) instead of once per patch
        mt.ClassesToIndicesd(LABEL, num_classes=classes, indices_postfix=INDICES_POSTFIX,
                             max_samples_per_class=SAMPLES_PER_CLASS),
        ForegroundOversampledCropd(keys, foreground_fraction, spatial_size=patch,
                                   num_classes=classes, indices_key=LABEL + INDICES_POSTFIX,
                                   crop_size=crop),
        mt.DeleteItemsd(LABEL + INDICES_POSTFIX),
        AffinePatchd(keys, patch, prob=max(augment.rotate_prob, augment.scale_prob),
                     rotate_range=rotate_range, scale_range=scale_range,
                     mode=["bilinear", "nearest"], padding_mode="zeros"),
        *_elastic(keys, augment),
        *[mt.RandFlipd(keys, prob=augment.flip_prob, spatial_axis=axis)
          for axis in plan.mirror_axes],
        mt.RandGaussianNoised(IMAGE, prob=augment.noise_prob, std=augment.noise_std),
        mt.RandGaussianSmoothd(IMAGE, prob=augment.smooth_prob, sigma_x=(0.5, 1.0),
                               sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        # a factor and an offset of its own per channel (MR sequences vary independently,
        # as nnU-Net draws them); one channel draws exactly what it drew before
        mt.RandScaleIntensityd(IMAGE, prob=augment.contrast_prob, factors=0.25,
                               channel_wise=True),
        mt.RandShiftIntensityd(IMAGE, prob=augment.intensity_shift_prob, offsets=0.1,
                               channel_wise=True),
        *_low_resolution(augment),
        *_gamma_per_channel(plan.in_channels, augment),
        mt.EnsureTyped(keys, track_meta=False),
    ])


class ForegroundOversampledCropd(mt.RandCropByLabelClassesd):
    """MONAI's class-balanced crop with `foreground_fraction` of the patches centred on a
    foreground voxel in every case, of a structure drawn evenly among those the case has
    (nnU-Net's oversampling). MONAI's fixed per-class ratios drop the classes a case lacks
    and renormalize: a case with 1 of 4 structures got ff/4 / (1 - ff + ff/4) foreground
    patches (11 % for 33 %)."""

    def __init__(self, keys: list[str], foreground_fraction: float, spatial_size: list[int],
                 num_classes: int, indices_key: str, crop_size: list[int] | None = None
                 ) -> None:
        self.foreground_fraction = foreground_fraction
        self.crop_size = list(crop_size or spatial_size)
        super().__init__(keys, label_key=LABEL, spatial_size=spatial_size,
                         ratios=[1.0] * num_classes, num_classes=num_classes, num_samples=1,
                         warn=False, indices_key=indices_key)

    def __call__(self, data, lazy: bool | None = None) -> list[dict]:
        """A patch-sized crop as MONAI draws it, or with `crop_size` a larger crop about the
        same centre, padded with zeros where it passes the image (nnU-Net pads so too): its
        central patch is the patch MONAI would have cut, voxel for voxel."""
        if self.crop_size == list(self.cropper.spatial_size):
            return super().__call__(data, lazy)
        d = dict(data)
        self.randomize(d.get(self.label_key), d.pop(self.indices_key, None),
                       d.get(self.image_key))
        center = [int(c) for c in self.cropper.centers[0]]
        for key in self.key_iterator(d):
            d[key] = _crop_with_zero_padding(d[key], center, self.crop_size)
        return [d]

    def randomize(self, label: torch.Tensor, indices=None, image: torch.Tensor | None = None
                  ) -> None:
        if indices is None:  # as MONAI does without ClassesToIndicesd
            indices = map_classes_to_indices(label, self.cropper.num_classes)
        if not any(len(found) for found in indices):
            # no voxel of any class, background included (a label of nnU-Net's 'ignore'
            # only): a centre anywhere, where MONAI would draw from no class at all (NaN)
            indices = [np.arange(math.prod(label.shape[1:])), *indices[1:]]
        self.cropper.ratios = self.case_ratios(indices)
        super().randomize(label, indices, image)

    def case_ratios(self, indices) -> list[float]:
        """Background, then each structure: the case's structures share the foreground
        fraction; background keeps a sliver even at 1, so a case with no structure still
        gets a (random) patch instead of all-zero ratios, a NaN in MONAI."""
        present = [len(found) > 0 for found in indices[1:]]
        share = self.foreground_fraction / max(sum(present), 1)
        return [max(1.0 - self.foreground_fraction, 1e-6)] + [share if p else 0.0
                                                             for p in present]


class AffinePatchd(mt.RandAffined):
    """MONAI's RandAffined from a crop larger than the patch to the patch about its centre:
    a rotated or scaled patch is resampled on the patch's grid only (resampling the whole
    crop and cutting it after cost 3 to 7 times as much), and a patch left alone (most of
    them) is cut out without resampling. The random draws are RandAffined's own."""

    def __init__(self, keys: list[str], patch: list[int], **kwargs) -> None:
        super().__init__(keys, spatial_size=patch, **kwargs)
        self.patch = tuple(patch)

    def __call__(self, data, lazy: bool | None = None) -> dict:
        d = dict(data)
        self.randomize(None)
        self.rand_affine.randomize()
        if not self._do_transform:
            centre = mt.CenterSpatialCrop(self.patch)
            for key in self.key_iterator(d):
                d[key] = centre(d[key])
            return d
        grid = self.rand_affine.rand_affine_grid(
            self.patch, grid=self.rand_affine.get_identity_grid(self.patch, lazy=False),
            lazy=False)
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            # randomize=True as RandAffined calls it: the grid is given, so the draws go
            # unused, but they advance the random state as RandAffined's do
            d[key] = self.rand_affine(d[key], None, mode, padding_mode, True, grid, lazy=False)
        return d


def _crop_with_zero_padding(image: torch.Tensor, center: list[int], size: list[int]
                            ) -> torch.Tensor:
    """The `size` box about `center` (starting at center - size // 2, as MONAI's SpatialCrop
    places it), zeros where it lies outside the image."""
    inside, border = padded_crop_box(center, size, tuple(image.shape[1:]))
    cropped = mt.SpatialCrop(roi_start=[s.start for s in inside],
                             roi_end=[s.stop for s in inside])(image)
    return mt.BorderPad(spatial_border=[b for pair in border for b in pair], mode="constant",
                        value=0)(cropped) if any(map(any, border)) else cropped


def padded_crop_box(center: list[int], size: list[int], shape: tuple[int, ...]
                    ) -> tuple[list[slice], list[tuple[int, int]]]:
    """The part of the `size` box about `center` inside an image of `shape`, and the zero
    padding (before, after) per axis that makes it the whole box."""
    inside, border = [], []
    for c, s, extent in zip(center, size, shape, strict=True):
        start = c - s // 2
        lo, hi = max(start, 0), min(start + s, extent)
        inside.append(slice(lo, hi))
        border.append((lo - start, start + s - hi))
    return inside, border


# nnU-Net's threshold for augmenting an anisotropic patch in its plane only
IN_PLANE_PATCH_RATIO = 3.0


def _spatial_ranges(patch: list[int], augment: AugmentConfig
                    ) -> tuple[list[float] | None, list[float] | None]:
    """RandAffine's rotation (radians about each axis) and scaling ranges. A patch more
    than 3 times longer along one axis than along its shortest (thick slices) is rotated
    about that short axis only and scaled in its plane only, as nnU-Net's "dummy 2D"
    augmentation does: a tilt would interpolate across the thick slices and bring in
    padding. Two such short axes are not rotated at all."""
    radians = float(np.deg2rad(augment.rotate_degrees))
    thin = [axis for axis in range(3) if max(patch) / patch[axis] > IN_PLANE_PATCH_RATIO]
    # about the thin axis only; with two thin axes (a rod) any rotation tilts one of them
    rotate = [radians if not thin or thin == [axis] else 0.0 for axis in range(3)]
    scale = [0.0 if axis in thin else augment.scale_range for axis in range(3)]
    return (rotate if augment.rotate_prob > 0 and len(thin) < 2 else None,
            scale if augment.scale_prob > 0 else None)


def rotation_crop_size(patch: list[int], rotate_range: list[float] | None,
                       scale_range: list[float] | None) -> list[int]:
    """The region a patch rotated and scaled by RandAffine (at most `rotate_range` radians
    about each axis, scaled by up to 1 + `scale_range`) samples, as a crop that many voxels
    larger than the patch along each axis as is even (so that its centre patch is the patch
    cut about the same centre). nnU-Net's get_patch_size does the same from the largest
    angles only; the extent along an axis can peak at a smaller angle."""
    from monai.transforms.utils import create_rotate, create_scale

    if rotate_range is None and scale_range is None:
        return list(patch)
    half = (np.asarray(patch, float) - 1) / 2
    corners = np.array([[sx, sy, sz, 1.0] for sx in (-1, 1) for sy in (-1, 1)
                        for sz in (-1, 1)]) * np.append(half, 1.0)
    scale = create_scale(3, [1 + s for s in (scale_range or [0.0] * 3)], backend="numpy")
    rotations = list(rotate_range or [0.0] * 3)
    angles = [np.linspace(-r, r, 9) for r in rotations]
    reach = half.copy()
    for rx in angles[0]:
        for ry in angles[1]:
            for rz in angles[2]:
                moved = corners @ (create_rotate(3, (rx, ry, rz), backend="numpy") @ scale).T
                reach = np.maximum(reach, np.abs(moved[:, :3]).max(0))
    # the extent can peak between the sampled angles: by at most 0.5 % with 9 angles over
    # up to 45 degrees; past that, an axis the rotation moves reaches the scaled diagonal
    diagonal = np.linalg.norm((corners @ scale.T)[0, :3])
    rotated = reach > half * np.diag(scale)[:3] + 1e-6
    widened = np.minimum(reach * 1.005, diagonal) if max(rotations) < np.pi / 4 else diagonal
    reach = np.where(rotated, widened, reach)
    crop = []
    for size, extent in zip(patch, reach, strict=True):
        needed = int(np.ceil(2 * extent - 1e-6)) + 1
        crop.append(needed + (needed - size) % 2)
    return crop


def _low_resolution(augment: AugmentConfig) -> list[mt.MapTransform]:
    """nnU-Net's low-resolution simulation, only when asked for: even a transform of
    probability 0 draws, which would change every later transform's draws."""
    if augment.lowres_prob == 0:
        return []
    return [mt.RandSimulateLowResolutiond(IMAGE, prob=augment.lowres_prob,
                                          zoom_range=(0.5, 1.0))]


def _gamma_per_channel(channels: int, augment: AugmentConfig) -> list[mt.MapTransform]:
    """Inverted gamma (when asked for) and gamma, per channel: RandAdjustContrastd has no
    channel-wise mode, and over several channels it would scale all of them by one
    intensity range and one gamma."""
    def gammas(key: str) -> list[mt.MapTransform]:
        steps = []
        if augment.gamma_invert_prob > 0:  # not even at probability 0: it would draw
            steps.append(mt.RandAdjustContrastd(key, prob=augment.gamma_invert_prob,
                                                gamma=(0.7, 1.5), invert_image=True,
                                                retain_stats=True))
        steps.append(mt.RandAdjustContrastd(key, prob=augment.gamma_prob, gamma=(0.7, 1.5),
                                            retain_stats=augment.gamma_retain_stats))
        return steps

    if channels == 1:
        return gammas(IMAGE)
    keys = [f"{IMAGE}_gamma_{c}" for c in range(channels)]
    return [mt.SplitDimd(IMAGE, output_postfixes=[k.removeprefix(IMAGE + "_") for k in keys],
                         dim=0, keepdim=True, update_meta=False),
            *[step for key in keys for step in gammas(key)],
            mt.ConcatItemsd(keys, IMAGE, dim=0),
            mt.DeleteItemsd(keys)]


def _elastic(keys: list[str], augment: AugmentConfig) -> list[mt.MapTransform]:
    if augment.elastic_prob == 0:
        return []  # not even a no-op: its random draws would change every later transform's
    return [mt.Rand3DElasticd(keys, sigma_range=(9, 13),
                              magnitude_range=(0, augment.elastic_magnitude),
                              prob=augment.elastic_prob, mode=["bilinear", "nearest"],
                              padding_mode="zeros")]


def _normalize(key: str, norm: dict) -> mt.MapTransform:
    if norm["scheme"] == "ct":
        # clip to the foreground 0.5/99.5 percentiles, then z-score with the foreground
        # mean and sd: one linear map with clipping
        low, high = norm["clip"]
        mean, std = norm["mean"], norm["std"]
        if high <= low:
            # a foreground of one intensity clips every voxel to it; ScaleIntensityRange
            # would divide by zero and return the input unclipped: map any range to it
            constant = (low - mean) / std
            return mt.ScaleIntensityRanged(key, a_min=low, a_max=low + 1.0, b_min=constant,
                                           b_max=constant, clip=True)
        return mt.ScaleIntensityRanged(key, a_min=low, a_max=high, b_min=(low - mean) / std,
                                       b_max=(high - mean) / std, clip=True)
    if norm["scheme"] == "none":  # nnU-Net's noNorm: a mask or a map already scaled
        return mt.Identityd(key)
    if norm["scheme"] == "rescale_to_0_1":  # each image's own minimum and maximum
        return mt.ScaleIntensityd(key, minv=0.0, maxv=1.0)
    if norm["scheme"] == "rgb_to_0_1":
        return mt.ScaleIntensityRanged(key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0,
                                       clip=True)
    return mt.NormalizeIntensityd(key, nonzero=True)
