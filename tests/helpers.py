"""Constants and helpers shared by the tests."""

from __future__ import annotations

import codecs
import sys
from pathlib import Path

import pytest

from medseg.plan import Fingerprint

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# accented file names cannot be written where the file system encoding is ASCII (CI's LC_ALL=C)
UTF8_FILE_NAMES = pytest.mark.skipif(
    codecs.lookup(sys.getfilesystemencoding()).name != "utf-8",
    reason=f"accented file names cannot be written under this process's file system encoding "
           f"({sys.getfilesystemencoding()}, an ASCII locale)")

# a coarse grid keeps every test volume at 32 x 32 x 24 voxels
SMALL_SHAPE = (32, 32, 24)
SMALL_SPACING = (4.0, 4.0, 8.0)

TINY_TRAINING = [
    "plan.patch_size=[32,32,16]",
    "plan.batch_size=2",
    "plan.base_filters=4",
    "plan.max_filters=16",
    "train.epochs=2",
    "train.iterations_per_epoch=3",
    "train.val_every=1",
    "train.num_workers=0",
    "train.optimizer=adamw",
    "train.learning_rate=0.003",
]


def as_sets(overrides: list[str]) -> list[str]:
    """['a=1', 'b=2'] -> ['--set', 'a=1', '--set', 'b=2']"""
    return [arg for item in overrides for arg in ("--set", item)]


def requires_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent")
    return path


def synthetic_fingerprint(spacings, shapes, modality="MR") -> Fingerprint:
    return Fingerprint(
        spacings=spacings, shapes=shapes,
        intensity=[{"p00_5": -100.0, "p99_5": 300.0, "mean": 80.0, "std": 50.0}],
        class_voxels={0: 1000, 1: 100, 2: 50}, modalities=[modality],
        labels={0: "background", 1: "a", 2: "b"},
    )


def zip_members(path: Path) -> dict[str, bytes]:
    """Every member of a zip file by name."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def past_folds(problems) -> tuple:
    """`medseg check`'s rows less its warning of fewer cases than train's default folds,
    which every dataset of 2 to 4 cases gets."""
    return tuple(p for p in problems if "fewer than the default" not in p.message)
