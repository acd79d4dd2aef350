"""A plain MONAI UNet baseline for MSD Task04 Hippocampus, trained for a fixed wall time.

What a MONAI user would write from the MONAI 3D segmentation tutorials, with no nnU-Net
recipe: `monai.networks.nets.UNet` (filters 16..256, four stride-2 levels, two residual
units, batch norm), LoadImaged + EnsureChannelFirstd + NormalizeIntensityd(nonzero=True) +
SpatialPadd / RandSpatialCropd to a fixed 48 x 64 x 48 patch (every hippocampus case, about
35 x 50 x 35 voxels at 1 mm, fits one patch, so no resampling), no augmentation,
DiceLoss(to_onehot_y=True, softmax=True), Adam lr 1e-3, batch 2, CacheDataset. It trains
until `seconds` of wall time are spent (counted from the call, data caching included; the
clock is read after every iteration), then segments each validation case with
`sliding_window_inference` (roi = the patch), takes the argmax and writes the mask with
the input's affine and header to OUT_DIR/baseline_predictions/<case>.nii.gz.

Called by benchmarks/hippocampus.py (which scores the masks with `medseg evaluate`); from
elsewhere, put benchmarks/ on sys.path and call `train_and_predict`.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from monai.utils import set_determinism

PATCH = (48, 64, 48)
BATCH_SIZE = 2
LEARNING_RATE = 1e-3


def _case(data_dir: Path, name: str) -> dict:
    return {"image": str(data_dir / "imagesTr" / f"{name}.nii.gz"),
            "label": str(data_dir / "labelsTr" / f"{name}.nii.gz")}


def train_and_predict(data_dir: Path, train_names: list[str], val_names: list[str],
                      seconds: float, out_dir: Path) -> dict:
    """Train the baseline on `train_names` for `seconds` of wall time, predict `val_names`
    into out_dir/baseline_predictions; returns timings, iterations and the folder."""
    started = time.monotonic()
    deadline = started + seconds
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    set_determinism(seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    keys = ["image", "label"]
    train_transforms = Compose([
        LoadImaged(keys=keys, reader="NibabelReader"),
        EnsureChannelFirstd(keys=keys),
        NormalizeIntensityd(keys="image", nonzero=True),
        SpatialPadd(keys=keys, spatial_size=PATCH),
        RandSpatialCropd(keys=keys, roi_size=PATCH, random_size=False),
    ])
    train_ds = CacheDataset(data=[_case(data_dir, n) for n in train_names],
                            transform=train_transforms, cache_rate=1.0, num_workers=1,
                            progress=False)
    loader = DataLoader(train_ds, batch_size=BATCH_SIZE, shuffle=True, num_workers=0)

    model = UNet(spatial_dims=3, in_channels=1, out_channels=3,
                 channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
                 norm="batch").to(device)
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    iterations = epochs = 0
    last_loss = float("nan")
    loop_started = time.monotonic()
    model.train()
    while time.monotonic() < deadline:
        epochs += 1
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            iterations += 1
            last_loss = loss.item()
            if time.monotonic() >= deadline:
                break
    train_seconds = time.monotonic() - started
    print(f"baseline: {iterations} iterations ({epochs} epochs, batch {BATCH_SIZE}) in "
          f"{train_seconds:.1f} s ({time.monotonic() - loop_started:.1f} s in the loop), "
          f"last Dice loss {last_loss:.4f}")

    predictions = out_dir / "baseline_predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    val_transforms = Compose([
        LoadImaged(keys="image", reader="NibabelReader"),
        EnsureChannelFirstd(keys="image"),
        NormalizeIntensityd(keys="image", nonzero=True),
    ])
    predict_started = time.monotonic()
    model.eval()
    with torch.no_grad():
        for name in val_names:
            path = data_dir / "imagesTr" / f"{name}.nii.gz"
            image = val_transforms({"image": str(path)})["image"]
            logits = sliding_window_inference(image.unsqueeze(0).to(device), PATCH, 1, model)
            mask = torch.argmax(logits, dim=1)[0].cpu().numpy().astype(np.uint8)
            source = nib.load(path)
            if mask.shape != source.shape[:3]:
                raise RuntimeError(f"{name}: mask {mask.shape} is not on the image grid "
                                   f"{source.shape}")
            header = source.header.copy()
            header.set_data_dtype(np.uint8)
            nib.save(nib.Nifti1Image(mask, source.affine, header),
                     predictions / f"{name}.nii.gz")
    predict_seconds = time.monotonic() - predict_started
    print(f"baseline: predicted {len(val_names)} cases in {predict_seconds:.1f} s "
          f"into {predictions}")
    return {
        "budget_seconds": round(seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "iterations": iterations,
        "epochs": epochs,
        "last_loss": round(last_loss, 4),
        "predict_seconds": round(predict_seconds, 1),
        "predictions": str(predictions),
    }
