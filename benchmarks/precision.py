"""fp32 against bf16 autocast for one DynUNet training step and one inference window.

    .venv/bin/python benchmarks/precision.py

Uses the demo's network (filters 8..64, patch 48 x 56 x 32, batch 2) and the hippocampus
network (filters 16..128, patch 40 x 56 x 40). Reports seconds per step for each precision
and the bf16/fp32 ratio, measured in the same run, and whether the CPU has native bf16.
"""

from __future__ import annotations

import time

import torch
from monai.networks.nets import DynUNet

CASES = {
    "demo": ((48, 56, 32), [8, 16, 32, 64], 4),
    "hippocampus": ((40, 56, 40), [16, 32, 64, 128], 4),
}


def network(filters: list[int], levels: int) -> DynUNet:
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (levels - 1)
    return DynUNet(3, 1, 3, [[3, 3, 3]] * levels, strides, strides[1:], filters=filters,
                   norm_name=("INSTANCE", {"affine": True}))


def seconds_per_step(model, patch, dtype, train: bool, repeats: int = 4) -> float:
    x = torch.randn(2 if train else 4, 1, *patch)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            if train:
                model(x).float().mean().backward()
            else:
                with torch.no_grad():
                    model(x)
        times.append(time.perf_counter() - started)
    return min(times[1:])


def main() -> None:
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    print(f"native bf16 (AVX512-BF16 or AMX): {native}; torch threads {torch.get_num_threads()}")
    for name, (patch, filters, levels) in CASES.items():
        model = network(filters, levels)
        for train in (True, False):
            fp32 = seconds_per_step(model, patch, None, train)
            bf16 = seconds_per_step(model, patch, torch.bfloat16, train, repeats=2)
            kind = "train step (batch 2)" if train else "inference (4 windows)"
            print(f"{name:12s} {kind:22s} fp32 {fp32:7.3f} s  bf16 {bf16:7.3f} s  "
                  f"bf16/fp32 {bf16 / fp32:5.2f}")


if __name__ == "__main__":
    main()
