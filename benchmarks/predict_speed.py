"""Prediction speed: MONAI's sliding window with its defaults against `medseg predict`.

    .venv/bin/python benchmarks/predict_speed.py --out runs/bench_speed \\
        [--model RUN --images DIR --labels DIR] [--repeats 2]

Without --model, trains the demo workflow on 8 phantoms and uses 6 new phantoms. In one
process, on the same network and the same volumes, each volume from its file to a label map
on the input grid:
  (a) MONAI: the same preprocessing, `sliding_window_inference` with its defaults (overlap
      0.25, constant blending, one window per forward pass, fp32), softmax, `Invertd`, argmax;
  (b) medseg: `predict_volume` with the run's predict settings (Gaussian blending, step 0.5,
      several windows per pass, channels-last, foreground box, streamed back to the grid).
With --also-step S, medseg is timed again with step S. Reports wall time, voxels per
second, achieved GFLOP/s (network FLOPs actually run, counted by torch's FlopCounterMode per
voxel) against a measured conv3d peak, the agreement between (a) and (b), and both Dice
scores against the reference labels. Writes OUT/predict_speed.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


class VoxelCounter(torch.nn.Module):
    """Counts the voxels the network is run on (to turn FLOPs per voxel into FLOPs)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.voxels = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.voxels += x.shape[0] * int(np.prod(x.shape[2:]))
        return self.network(x)


def conv3d_peak_gflops() -> float:
    """Best GFLOP/s of a large fp32 conv3d (32 -> 32 channels, 3x3x3, 64^3), the machine's
    practical ceiling for this kind of network."""
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval()
    x = torch.randn(2, 32, 64, 64, 64).contiguous(memory_format=torch.channels_last_3d)
    conv = conv.to(memory_format=torch.channels_last_3d)
    flops = 2 * 27 * 32 * 32 * x.shape[0] * 64**3
    best = float("inf")
    with torch.inference_mode():
        conv(x)
        for _ in range(5):
            started = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - started)
    return flops / best / 1e9


def flops_per_voxel(network: torch.nn.Module, patch: tuple[int, ...], channels: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network(torch.zeros(1, channels, *patch))
    return counter.get_total_flops() / float(np.prod(patch))


def monai_predict(network, plan, path: Path) -> np.ndarray:
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Invertd

    from medseg.transforms import IMAGE, case_dict, preprocessing

    chain = preprocessing(plan, with_label=False)
    image = chain(case_dict([path]))[IMAGE]
    with torch.inference_mode():
        logits = sliding_window_inference(image[None], plan.patch_size, 1, network)
        scores = MetaTensor(torch.softmax(logits[0].as_tensor(), 0), meta=dict(image.meta),
                            applied_operations=list(image.applied_operations))
        inverted = Invertd(keys="pred", transform=chain, orig_keys=f"{IMAGE}_0",
                           nearest_interp=False)({"pred": scores, f"{IMAGE}_0": image})
    return inverted["pred"].as_tensor().argmax(0).numpy().astype(np.uint8)


def dice(prediction: np.ndarray, reference: np.ndarray, classes: int) -> float:
    scores = []
    for label in range(1, classes):
        p, r = prediction == label, reference == label
        if p.any() or r.any():
            scores.append(2 * (p & r).sum() / (p.sum() + r.sum()))
    return float(np.mean(scores))


def demo_model_and_phantoms(out: Path) -> tuple[Path, Path, Path]:
    from medseg.cli import main
    from medseg.phantoms import make_phantom, write_phantom_dataset

    model = out / "model"
    if not (model / "fold_0" / "checkpoints" / "best.safetensors").is_file():
        write_phantom_dataset(out / "train_data", n_train=8, n_test=0)
        if main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(model),
                 "--overwrite", "--set", f"dataset.path={out / 'train_data'}"]) != 0:
            raise SystemExit("training failed")
    import nibabel as nib

    images, labels = out / "images", out / "labels"
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    for seed in range(900, 906):
        phantom = make_phantom(seed)
        nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), phantom.affine),
                 images / f"phantom_{seed}.nii.gz")
        nib.save(nib.Nifti1Image(phantom.label, phantom.affine), labels / f"phantom_{seed}.nii.gz")
    return model, images, labels


def run(out: Path, model: Path | None, images: Path | None, labels: Path | None,
        repeats: int, other_steps: list[float]) -> dict:
    from medseg.config import load_workflow
    from medseg.io import read_volume
    from medseg.predict import collect_inputs, load_predictor, predict_volume

    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, images, labels = demo_model_and_phantoms(out)
    predictor = load_predictor(model, folds=[0])
    config = load_workflow(model / "workflow.yaml").predict
    plan = predictor.plan
    paths = collect_inputs([images])
    references = {p.name: read_volume(labels / p.name, None).data for p in paths}
    network = predictor.models[0]
    monai_network = VoxelCounter(network.to(memory_format=torch.contiguous_format))
    medseg_network = VoxelCounter(network.to(memory_format=torch.channels_last_3d))
    per_voxel = flops_per_voxel(network, tuple(plan.patch_size), plan.in_channels)

    def time_all(predict_one) -> tuple[float, dict]:
        masks, best = {}, float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for path in paths:
                masks[path.name] = predict_one(path)
            best = min(best, time.perf_counter() - started)
        return best, masks

    predict_volume(predictor, paths[0], config)  # warm-up of both paths
    monai_predict(monai_network, plan, paths[0])
    monai_network.voxels = medseg_network.voxels = 0
    monai_seconds, monai_masks = time_all(lambda p: monai_predict(monai_network, plan, p))
    predictor = predictor.__class__(plan, (medseg_network,), predictor.folds, predictor.device)
    medseg_seconds, medseg_masks = time_all(lambda p: predict_volume(predictor, p, config))
    medseg_voxels = medseg_network.voxels
    other = {}
    for step in other_steps:  # the same engine with another step, for the trade-off
        stepped = dataclasses.replace(config, step=step)
        medseg_network.voxels = 0
        seconds, masks = time_all(lambda p, c=stepped: predict_volume(predictor, p, c))
        other[step] = (seconds, medseg_network.voxels, masks)
    voxels = sum(int(np.prod(r.shape)) for r in references.values())
    classes = plan.num_classes
    peak = conv3d_peak_gflops()

    def summary(seconds: float, network_voxels: int, masks: dict) -> dict:
        gflops = per_voxel * network_voxels / repeats / seconds / 1e9
        return {"seconds": round(seconds, 2),
                "megavoxels_per_second": round(voxels / seconds / 1e6, 2),
                "network_gflop": round(per_voxel * network_voxels / repeats / 1e9, 1),
                "gflops_per_second": round(gflops, 1),
                "fraction_of_conv3d_peak": round(gflops / peak, 3),
                "dice_vs_reference": round(float(np.mean([dice(masks[n], references[n], classes)
                                                          for n in masks])), 4)}

    result = {
        "cases": len(paths), "input_megavoxels": round(voxels / 1e6, 2),
        "torch_threads": torch.get_num_threads(), "conv3d_peak_gflops": round(peak, 1),
        "medseg_settings": {"step": config.step, "sw_batch_size": config.sw_batch_size,
                            "tta": config.tta, "crop_foreground": config.crop_foreground},
        "monai_defaults": summary(monai_seconds, monai_network.voxels, monai_masks),
        "medseg_defaults": summary(medseg_seconds, medseg_voxels, medseg_masks),
        "speedup": round(monai_seconds / medseg_seconds, 2),
        "agreement_voxels_equal": round(float(np.mean([(monai_masks[n] == medseg_masks[n]).mean()
                                                       for n in medseg_masks])), 5),
        "dice_between_a_and_b": round(float(np.mean([dice(medseg_masks[n], monai_masks[n], classes)
                                                     for n in medseg_masks])), 4),
    }
    for step, (seconds, network_voxels, masks) in other.items():
        result[f"medseg_step_{step}"] = {**summary(seconds, network_voxels, masks),
                                         "speedup": round(monai_seconds / seconds, 2)}
    (out / "predict_speed.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--also-step", type=float, action="append", default=[],
                        help="also time medseg with this window step")
    args = parser.parse_args()
    if args.model is not None and (args.images is None or args.labels is None):
        parser.error("--model needs --images and --labels")
    run(args.out, args.model, args.images, args.labels, args.repeats, args.also_step)
