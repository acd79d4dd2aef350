"""An explicit name -> network registry. Networks come from MONAI; the plan sets topology."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from medseg.errors import MedsegError
from medseg.fileio import atomic_path
from medseg.plan import Plan


def build_dynunet(plan: Plan) -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(
        spatial_dims=3,
        in_channels=plan.in_channels,
        out_channels=plan.num_classes,
        kernel_size=plan.kernels,
        strides=plan.strides,
        upsample_kernel_size=plan.strides[1:],
        filters=plan.filters,
        norm_name=("INSTANCE", {"affine": True}),
        deep_supervision=plan.deep_supervision,
        deep_supr_num=max(1, min(2, len(plan.strides) - 2)),
        res_block=plan.res_block,
    )


NETWORKS: dict[str, Callable[[Plan], torch.nn.Module]] = {"dynunet": build_dynunet}


def create_model(plan: Plan, name: str = "dynunet") -> torch.nn.Module:
    if name not in NETWORKS:
        raise MedsegError(f"unknown network '{name}'; known: {', '.join(NETWORKS)}")
    return NETWORKS[name](plan)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights as safetensors (no pickle), written atomically."""
    # save_model/load_model (not save_file) because DynUNet registers the same tensors
    # under two names (its skip_layers chain). save_model cannot find shared tensors among
    # channels-last weights, so they are stored from the contiguous layout and put back.
    channels_last = any(p.dim() == 5 and not p.is_contiguous() for p in model.parameters())
    with atomic_path(path) as tmp:
        model.to(memory_format=torch.contiguous_format)
        try:
            save_model(model, str(tmp))
        finally:
            if channels_last:
                model.to(memory_format=torch.channels_last_3d)


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise MedsegError("weights file not found", path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise MedsegError(f"not readable as this plan's weights ({exc})", path) from exc
    if missing or unexpected:
        raise MedsegError(f"weights do not fit the plan's network (missing {len(missing)}, "
                          f"unexpected {len(unexpected)} tensors)", path)
    return model
