"""Time of putting a 42-class prediction back onto the input grid (`labels_on_input_grid`):
a box over the whole network grid against a body-sized box (70 % x 60 % in plane), whose
outside input voxels stay background without interpolating classes x plane.

    .venv/bin/python benchmarks/back_mapping.py
"""

import time

import numpy as np
import torch

from medseg.inference import axis_maps, labels_on_input_grid

CLASSES = 42
NETWORK_SHAPE = (160, 160, 40)  # 1.5 mm
INPUT_SHAPE = (300, 300, 60)  # 0.8 x 0.8 x 1 mm


def seconds(box: tuple[slice, ...]) -> float:
    maps = axis_maps(np.diag([0.8, 0.8, 1.0, 1.0]), np.diag([1.5, 1.5, 1.5, 1.0]), INPUT_SHAPE)
    block = torch.rand((CLASSES, *(b.stop - b.start for b in box)))
    started = time.perf_counter()
    labels_on_input_grid(iter([(0, block)]), NETWORK_SHAPE, box, CLASSES, maps, INPUT_SHAPE)
    return time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(2)
    whole = (slice(0, 160), slice(0, 160), slice(0, 40))
    body = (slice(24, 136), slice(32, 128), slice(0, 40))
    print(f"whole-grid box {seconds(whole):.2f} s, body box {seconds(body):.2f} s")


if __name__ == "__main__":
    main()
