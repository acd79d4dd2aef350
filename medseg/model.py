"""An explicit name -> network registry. Networks come from MONAI; the plan sets topology."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save

from medseg.errors import MedsegError, one_line
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
        deep_supr_num=deep_supervision_heads(plan),
        res_block=plan.res_block,
    )


def deep_supervision_heads(plan: Plan) -> int:
    """Outputs below full resolution that the loss also scores: those of the two decoder
    levels next to full resolution, fewer in a shallow plan (DynUNet wants fewer heads than
    up-sampling levels). nnU-Net supervises every decoder level but the lowest; medseg stops
    at two: DynUNet enlarges each head to the full patch (one more full-size output per
    head), and MONAI's halving weights would give a third head an eighth of the weight."""
    return max(1, min(2, len(plan.strides) - 2))


def build_segresnet(plan: Plan) -> torch.nn.Module:
    """MONAI SegResNetDS (Auto3DSeg's SegResNet): residual encoder blocks (1, 2, 2, 4, ...),
    one level per plan stride, instance norm. In training with deep supervision it returns
    a list of outputs, the full-resolution one first; in eval mode only that one."""
    from monai.networks.nets import SegResNetDS

    levels = len(plan.strides)  # isotropic halvings: checked by make_plan
    return SegResNetDS(
        spatial_dims=3,
        init_filters=plan.filters[0],
        in_channels=plan.in_channels,
        out_channels=plan.num_classes,
        norm="instance",
        blocks_down=tuple([1, 2, 2, 4] + [4] * max(0, levels - 4))[:levels],
        dsdepth=1 + deep_supervision_heads(plan) if plan.deep_supervision else 1,
    )


NETWORKS: dict[str, Callable[[Plan], torch.nn.Module]] = {
    "dynunet": build_dynunet,
    "segresnet": build_segresnet,
}


def create_model(plan: Plan) -> torch.nn.Module:
    if plan.network not in NETWORKS:
        raise MedsegError(f"unknown network '{plan.network}'; known: {', '.join(NETWORKS)}")
    return NETWORKS[plan.network](plan)


# the layers that map features to class scores: DynUNet's output block and deep-supervision
# heads, SegResNetDS's head at each decoder level. Fine-tuning (medseg.pretrained) leaves them
# out, as nnU-Net does, so that the number of classes may differ
SEGMENTATION_HEADS = re.compile(
    r"(output_block|deep_supervision_heads\.\d+|up_layers\.\d+\.head)\.")


def is_segmentation_head(name: str) -> bool:
    """Whether a state-dict tensor (by its name) belongs to a segmentation head."""
    return SEGMENTATION_HEADS.match(name) is not None


def supervised_outputs(output: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """A training forward's outputs with deep supervision, full resolution first, in fp32:
    DynUNet stacks its heads (upsampled) along dim 1, SegResNetDS returns a list."""
    if isinstance(output, list | tuple):
        return [o.float() for o in output]
    return list(torch.unbind(output.float(), dim=1))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Weights as safetensors (no pickle), written atomically; the same weights give the
    same bytes."""
    save_weight_tensors(_unaliased_state(model), path)


def save_weight_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """What save_weights writes, from a snapshot of it (weight_snapshot)."""
    with atomic_path(path) as tmp:
        # safetensors' save_file renames a temporary file of its own (mode 0600) onto `tmp`:
        # the bytes are written into the one atomic_path made, with the umask's mode
        tmp.write_bytes(save(tensors, metadata={"format": "pt"}))


def weight_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what save_weights would write now, which later steps do not change."""
    return {name: tensor.clone() for name, tensor in _unaliased_state(model).items()}


def _unaliased_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once, under its first name in sorted order: DynUNet
    registers the same tensors under two names (its skip_layers chain), which safetensors
    refuses. load_model matches the aliases up again from the model. (save_model does this
    too, but records the aliases in an order that changes from run to run.)"""
    state = model.state_dict()
    return {name: state[name].detach().cpu().contiguous()
            for name in sorted(set(canonical_names(model).values()))}


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Each state-dict name of the model -> the name save_weights stores its tensor under
    (DynUNet's aliases -> the first name in sorted order)."""
    state = model.state_dict()
    first_name: dict[tuple, str] = {}
    names = {}
    for name in sorted(state):
        tensor = state[name]
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tensor.stride())
        names[name] = first_name.setdefault(key, name)
    return names


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """A safetensors file's tensor shapes by name, from its header alone (safetensors' own
    errors raised for a file it cannot open)."""
    with safe_open(str(path), framework="pt") as stored:
        return {name: tuple(stored.get_slice(name).get_shape()) for name in stored.keys()}


def weights_file_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be opened (cut short, emptied, not safetensors), from its
    header alone; None when it opens."""
    try:
        with safe_open(str(path), framework="pt") as stored:
            stored.keys()
    except Exception as exc:  # safetensors raises its own error types
        return one_line(str(exc))
    return None


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise MedsegError("weights file not found", path)
    try:
        shapes = stored_shapes(path)
    except Exception as exc:  # safetensors raises its own error types
        raise MedsegError(f"not readable as this plan's weights ({one_line(str(exc))})",
                          path) from exc
    problem = network_mismatch(model, shapes)
    if problem:
        raise MedsegError(f"weights do not fit the plan's network: {problem} (trained with "
                          f"another plan.json?)", path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    except Exception as exc:
        raise MedsegError(f"not readable as this plan's weights ({one_line(str(exc))})",
                          path) from exc
    if missing or unexpected:
        raise MedsegError(f"weights do not fit the plan's network (missing {len(missing)}, "
                          f"unexpected {len(unexpected)} tensors)", path)
    return model


def network_mismatch(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """How saved tensor shapes (by name) differ from the model's, in a few words (None when
    they fit): safetensors' and torch's own errors list every tensor, kilobytes on one line."""
    expected = {name: tuple(t.shape) for name, t in _unaliased_state(model).items()}
    aliases = set(model.state_dict()) - set(expected)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - aliases)
    wrong = [name for name in sorted(set(expected) & set(shapes)) if expected[name] != shapes[name]]
    if wrong:
        first = wrong[0]
        return (f"{len(wrong)} tensor(s) of another shape ({first}: {list(shapes[first])} "
                f"saved, {list(expected[first])} expected)")
    if missing or unexpected:
        return f"{len(missing)} tensor(s) missing, {len(unexpected)} unexpected"
    return None
