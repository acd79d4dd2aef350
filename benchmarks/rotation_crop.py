"""Per-patch cost of the spatial augmentation: rotating a patch cut first (the corners are
zero padding; medseg before 2026-11-23), resampling the whole larger crop and cutting its
centre, and medseg's AffinePatchd (the larger crop, resampled on the patch's grid only).

    .venv/bin/python benchmarks/rotation_crop.py [--threads 1] [--repeats 30]

Prints milliseconds per patch for each way and patch size (the workflow defaults: rotation
and scaling on 20 % of the patches), and checks that AffinePatchd's patches equal the
whole-crop ones voxel for voxel.
"""

from __future__ import annotations

import argparse
import time

import torch
from monai import transforms as mt

from medseg.config import AugmentConfig
from medseg.transforms import AffinePatchd, _spatial_ranges, rotation_crop_size

KEYS = ["image", "label"]
PATCHES = ([48, 56, 28], [40, 56, 40], [128, 128, 128])  # demo, hippocampus, a CT plan


def _per_patch_ms(step, case: dict, repeats: int) -> tuple[float, list[dict]]:
    step.set_random_state(1)
    started = time.perf_counter()
    outputs = [step(dict(case)) for _ in range(repeats)]
    return (time.perf_counter() - started) / repeats * 1000, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    augment = AugmentConfig()
    for patch in PATCHES:
        rotate, scale = _spatial_ranges(patch, augment)
        crop = rotation_crop_size(patch, rotate, scale)
        generator = torch.Generator().manual_seed(0)
        case = {"image": torch.randn((1, *crop), generator=generator),
                "label": (torch.rand((1, *crop), generator=generator) > 0.7).float()}
        options = dict(prob=max(augment.rotate_prob, augment.scale_prob), rotate_range=rotate,
                       scale_range=scale, mode=["bilinear", "nearest"], padding_mode="zeros")
        repeats = args.repeats if max(patch) < 100 else max(args.repeats // 5, 3)
        centre = mt.CenterSpatialCropd(KEYS, roi_size=patch)
        cut_first = mt.Compose([centre, mt.RandAffined(KEYS, spatial_size=patch, **options)])
        cut_first.transforms[1].set_random_state(1)
        whole = mt.RandAffined(KEYS, **options)
        timings = {}
        timings["cut first"], _ = _per_patch_ms(cut_first.transforms[1], centre(case), repeats)
        timings["whole crop"], expected = _per_patch_ms(whole, case, repeats)
        timings["AffinePatchd"], got = _per_patch_ms(AffinePatchd(KEYS, patch, **options),
                                                     case, repeats)
        same = all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(centre(b)[k]))
                   for a, b in zip(got, expected, strict=True) for k in KEYS)
        print(f"patch {patch}, crop {crop}: " + ", ".join(
            f"{name} {ms:.1f} ms" for name, ms in timings.items())
            + f"; AffinePatchd equals the whole crop's centre: {same}")


if __name__ == "__main__":
    main()
