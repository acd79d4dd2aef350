"""The network registry: SegResNetDS beside DynUNet, planned, trained, resumed and predicted."""

import pytest
import torch
from helpers import REPO, TINY_TRAINING, as_sets, synthetic_fingerprint

from medseg.cli import main
from medseg.config import PlanConfig
from medseg.errors import MedsegError
from medseg.model import create_model, supervised_outputs
from medseg.plan import Plan, make_plan

SEGRESNET = [*TINY_TRAINING, "plan.network=segresnet", "plan.patch_size=[32,32,32]",
             "train.deterministic=true", "train.seed=3"]


def train(out, dataset, *extra):
    return main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={dataset}", *SEGRESNET, *extra])])


def test_segresnet_is_planned_built_and_gives_deep_supervision_outputs():
    from monai.networks.nets import SegResNetDS

    fp = synthetic_fingerprint([[1.0, 1.0, 1.0]] * 3, [[32, 32, 32]] * 3)
    plan = make_plan(fp, PlanConfig(base_filters=4, network="segresnet"))
    model = create_model(plan)
    assert isinstance(model, SegResNetDS) and plan.network == "segresnet"
    uncapped = make_plan(fp, PlanConfig(base_filters=32, max_filters=64, network="segresnet"))
    assert uncapped.filters == [32, 64, 128, 256]  # what SegResNetDS builds, not capped at 64
    assert create_model(uncapped).up_layers[-1]["head"].in_channels == 32
    x = torch.randn(2, 1, *plan.patch_size)
    outputs = supervised_outputs(model.train()(x))
    # full resolution first, then one head per halving (two at most, as DynUNet's)
    assert [tuple(o.shape[2:]) for o in outputs] == [
        tuple(plan.patch_size), tuple(s // 2 for s in plan.patch_size),
        tuple(s // 4 for s in plan.patch_size)]
    assert model.eval()(x).shape == (2, plan.num_classes, *plan.patch_size)
    # a plan.json written before the registry had a choice builds DynUNet
    data = plan.to_json()
    del data["network"]
    assert Plan.from_json(data).network == "dynunet"


def test_segresnet_refuses_a_plan_that_does_not_halve_every_axis():
    fp = synthetic_fingerprint([[1.0, 1.0, 4.0]] * 3, [[64, 64, 16]] * 3)
    assert make_plan(fp, PlanConfig()).strides[1] == [2, 2, 1]
    with pytest.raises(MedsegError, match="halves every axis"):
        make_plan(fp, PlanConfig(network="segresnet"))


def test_an_unknown_network_is_refused_naming_the_choices(tmp_path, phantom_dataset, capsys):
    assert train(tmp_path / "run", phantom_dataset, "plan.network=vnet") == 2
    err = capsys.readouterr().err
    assert "'plan.network' is 'vnet'; choose one of dynunet, segresnet" in err


def test_segresnet_trains_resumes_exactly_and_predicts(tmp_path, phantom_dataset):
    assert train(tmp_path / "straight", phantom_dataset) == 0
    assert train(tmp_path / "split", phantom_dataset, "train.max_minutes=0.00001") == 0
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    states = [torch.load(tmp_path / run / "fold_0" / "checkpoints" / "last_state.pt",
                         weights_only=True) for run in ("straight", "split")]
    assert states[0]["epoch"] == states[1]["epoch"] == 1
    for name, tensor in states[0]["model"].items():
        assert torch.equal(tensor, states[1]["model"][name]), name

    out = tmp_path / "masks"
    assert main(["predict", "--model", str(tmp_path / "straight"), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (phantom_dataset / "imagesTs").iterdir())
