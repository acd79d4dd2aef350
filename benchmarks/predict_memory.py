"""Peak memory of prediction with a 42-class model on a 512 x 512 x 600 CT (0.8 x 0.8 x 1 mm).

    .venv/bin/python benchmarks/predict_memory.py --out runs/bench_memory [--slices 100]

1. Trains a 42-class model briefly (4 synthetic CTs with 41 structures at 1.5 mm, the
   TotalSegmentator resolution; a few iterations: the figure is about memory, not accuracy).
2. Draws a synthetic 512 x 512 x 600 CT at 0.8 x 0.8 x 1.0 mm with the same 41 structures,
   and a 512 x 512 x SLICES slab of it.
3. Measures, each in a fresh process, peak RSS and wall time of
   (a) MONAI's way: the same preprocessing, `sliding_window_inference` (its defaults) over the
       whole volume, softmax, `Invertd` back to the input grid, argmax;
   (b) `medseg predict` with its defaults.
   (b) runs on the full CT and on the slab; (a) on the slab only, and on the full CT with
   `--monai-full` (its class-score arrays alone need about 30 GB there).
Writes OUT/predict_memory.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

CLASSES = 42
TRAIN_SHAPE, TRAIN_SPACING = (273, 273, 100), (1.5, 1.5, 1.5)
BIG_SHAPE, BIG_SPACING = (512, 512, 600), (0.8, 0.8, 1.0)
TRAINING = ["plan.patch_size=[96,96,96]", "plan.batch_size=2", "plan.base_filters=8",
            "plan.max_filters=64", "train.epochs=1", "train.iterations_per_epoch=6",
            "train.val_max_cases=0", "train.num_workers=0", "train.folds=2",
            "predict.largest_component=[]"]


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def make_dataset(root: Path) -> None:
    from medseg.phantoms import make_many_structure_ct

    training = []
    for index in range(4):
        case = make_many_structure_ct(index, TRAIN_SHAPE, TRAIN_SPACING)
        for folder, data in (("imagesTr", case.image), ("labelsTr", case.label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            save(data, case.affine, root / folder / f"ct_{index:03d}.nii.gz")
        training.append({"image": f"./imagesTr/ct_{index:03d}.nii.gz",
                         "label": f"./labelsTr/ct_{index:03d}.nii.gz"})
    labels = {"0": "background", **{str(k): f"structure_{k:02d}" for k in range(1, CLASSES)}}
    (root / "dataset.json").write_text(json.dumps({
        "name": "ManyStructureCT", "modality": {"0": "CT"}, "labels": labels,
        "numTraining": len(training), "training": training}, indent=2), encoding="utf-8")


def make_inputs(folder: Path, slices: int) -> tuple[Path, Path, Path]:
    """The full CT, a slab of it, and the slab's reference labels (uncompressed NIfTI)."""
    from medseg.phantoms import make_many_structure_ct

    folder.mkdir(parents=True, exist_ok=True)
    case = make_many_structure_ct(100, BIG_SHAPE, BIG_SPACING)
    full, slab = folder / "ct_full.nii", folder / "ct_slab.nii"
    slab_label = folder / "slab_label.nii"
    save(case.image, case.affine, full)
    middle = (BIG_SHAPE[2] - slices) // 2
    slab_affine = case.affine.copy()
    slab_affine[:3, 3] += slab_affine[:3, 2] * middle
    save(np.ascontiguousarray(case.image[..., middle:middle + slices]), slab_affine, slab)
    save(np.ascontiguousarray(case.label[..., middle:middle + slices]), slab_affine, slab_label)
    return full, slab, slab_label


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: across fork and exec that
    keeps the parent's high-water mark."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_medseg(model: Path, image: Path, output: Path) -> None:
    from medseg.cli import main

    if main(["predict", "--model", str(model), "--input", str(image), "--output", str(output),
             "--overwrite"]) != 0:
        raise SystemExit("medseg predict failed")


def child_monai(model: Path, image: Path, output: Path) -> None:
    """What a MONAI user writes: preprocess, sliding_window_inference with its defaults,
    softmax, Invertd to the input grid, argmax, save."""
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Invertd

    from medseg.io import write_mask
    from medseg.model import create_model, load_weights
    from medseg.plan import load_plan
    from medseg.transforms import IMAGE, case_dict, preprocessing

    plan = load_plan(model / "plan.json")
    network = load_weights(create_model(plan),
                           model / "fold_0" / "checkpoints" / "best.safetensors").eval()
    chain = preprocessing(plan, with_label=False)
    preprocessed = chain(case_dict([image]))[IMAGE]
    with torch.no_grad():
        logits = sliding_window_inference(preprocessed[None], plan.patch_size, 1, network)
    scores = MetaTensor(torch.softmax(logits[0].as_tensor(), 0), meta=dict(preprocessed.meta),
                        applied_operations=list(preprocessed.applied_operations))
    del logits
    inverted = Invertd(keys="pred", transform=chain, orig_keys=f"{IMAGE}_0",
                       nearest_interp=False)({"pred": scores, f"{IMAGE}_0": preprocessed})
    labels = inverted["pred"].as_tensor().argmax(0).numpy()
    output.mkdir(parents=True, exist_ok=True)
    write_mask(labels, image, output / image.name.replace(".nii", ".nii.gz"))


def measure(kind: str, model: Path, image: Path, output: Path) -> dict:
    """Run one prediction in a fresh process; its wall time and peak RSS."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, __file__, "--child", kind, "--model", str(model),
                             "--image", str(image), "--out", str(output)],
                            capture_output=True, encoding="utf-8", errors="replace")
    seconds = time.monotonic() - started
    if result.returncode != 0:
        return {"failed": (result.stderr.strip().splitlines() or ["killed"])[-1],
                "returncode": result.returncode, "seconds": round(seconds, 1)}
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return {"seconds": round(seconds, 1), "peak_rss_mb": peak}


def agreement(first: Path, second: Path, reference: Path) -> dict:
    a, b, ref = (np.asarray(nib.load(p).dataobj) for p in (first, second, reference))
    return {"voxels_equal": round(float((a == b).mean()), 5),
            "medseg_dice_vs_reference": round(mean_dice(b, ref), 4),
            "monai_dice_vs_reference": round(mean_dice(a, ref), 4)}


def mean_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    scores = []
    for label in range(1, CLASSES):
        p, r = prediction == label, reference == label
        if r.any() or p.any():
            scores.append(2 * (p & r).sum() / (p.sum() + r.sum()))
    return float(np.mean(scores))


def run(out: Path, slices: int, monai_full: bool) -> dict:
    from medseg.cli import main

    model = out / "model"
    if not (model / "fold_0" / "checkpoints" / "best.safetensors").is_file():
        make_dataset(out / "data")
        sets = [a for item in [f"dataset.path={out / 'data'}", *TRAINING] for a in ("--set", item)]
        if main(["train", str(Path(__file__).parent.parent / "workflows" / "demo.yaml"),
                 "--out", str(model), "--overwrite", *sets]) != 0:
            raise SystemExit("training failed")
    full, slab, slab_label = make_inputs(out / "inputs", slices)
    result = {
        "input": f"{BIG_SHAPE} at {BIG_SPACING} mm, {CLASSES} classes; slab {slices} slices",
        "medseg_full": measure("medseg", model, full, out / "medseg_full"),
        "medseg_slab": measure("medseg", model, slab, out / "medseg_slab"),
        "monai_slab": measure("monai", model, slab, out / "monai_slab"),
    }
    if monai_full:
        result["monai_full"] = measure("monai", model, full, out / "monai_full")
    if "failed" not in result["monai_slab"] and "failed" not in result["medseg_slab"]:
        result["slab_agreement"] = agreement(out / "monai_slab" / "ct_slab.nii.gz",
                                             out / "medseg_slab" / "ct_slab.nii.gz", slab_label)
    (out / "predict_memory.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--monai-full", action="store_true")
    parser.add_argument("--child", choices=["medseg", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        (child_medseg if args.child == "medseg" else child_monai)(args.model, args.image,
                                                                   args.out)
        print(json.dumps({"peak_rss_mb": round(peak_rss_mb())}))
    else:
        run(args.out, args.slices, args.monai_full)
