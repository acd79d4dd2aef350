"""Shared fixtures: small synthetic datasets with fixed seeds, and one tiny trained run."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from helpers import REPO, SMALL_SHAPE, SMALL_SPACING, TINY_TRAINING, as_sets

from medseg.phantoms import write_phantom_dataset

# a suite started in the background by a shell without job control (`pytest &` in a script)
# has SIGINT ignored (POSIX), and so would every process the stop tests start: Python then
# never raises KeyboardInterrupt, and those tests fail for the shell's sake
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """An MSD-layout phantom dataset: 6 training and 2 test cases (with labelsTs)."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, n_train=6, n_test=2, seed=1, shape=SMALL_SHAPE,
                          spacing=SMALL_SPACING)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, phantom_dataset) -> Path:
    """A run folder trained for a few iterations (enough to test the plumbing)."""
    from medseg.cli import main

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run_dir),
                 "--set", f"dataset.path={phantom_dataset}", *as_sets(TINY_TRAINING)])
    assert code == 0
    return run_dir


@pytest.fixture(scope="session")
def two_fold_run(trained_run, tmp_path_factory) -> Path:
    """The tiny run with a fold 1 as well: fold 0's weights moved by seeded noise (tests
    that change it copy it first)."""
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path_factory.mktemp("crossval") / "two"
    shutil.copytree(trained_run, run)
    tensors = load_file(run / "fold_0" / "checkpoints" / "best.safetensors")
    generator = torch.Generator().manual_seed(1)
    moved = {key: value + 0.05 * torch.randn(value.shape, generator=generator)
             if value.is_floating_point() else value for key, value in tensors.items()}
    (run / "fold_1" / "checkpoints").mkdir(parents=True)
    save_file(moved, run / "fold_1" / "checkpoints" / "best.safetensors")
    return run


@pytest.fixture(scope="session")
def model_archive(trained_run, tmp_path_factory) -> Path:
    """`medseg export` of the tiny run (tests that change it copy it first)."""
    from medseg.cli import main

    target = tmp_path_factory.mktemp("archive") / "tiny_model.zip"
    assert main(["export", str(trained_run), str(target)]) == 0
    return target
