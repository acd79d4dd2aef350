"""nnU-Net's 'ignore' label: unannotated voxels left out of the loss, validation and scores."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, SMALL_SHAPE, SMALL_SPACING, TINY_TRAINING, as_sets
from monai.losses import DiceCELoss

from medseg.cli import main
from medseg.datasets import load_dataset, split_ignore_label
from medseg.errors import MedsegError
from medseg.losses import DiceCELossIgnoring
from medseg.metrics import leave_out_ignored
from medseg.phantoms import make_phantom

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spine": 3, "ignore": 4}


def write_sparse_dataset(root, labels=LABELS, n_cases=5):
    """Phantoms in the nnU-Net layout whose every other axial slice is unannotated (4)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for index in range(n_cases):
        phantom = make_phantom(100 + index, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        label = phantom.label.copy()
        label[:, :, ::2] = 4
        nib.save(nib.Nifti1Image(phantom.image.astype(np.float32), phantom.affine),
                 root / "imagesTr" / f"case{index}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, phantom.affine), root / "labelsTr" / f"case{index}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "labels": labels,
        "numTraining": n_cases}), encoding="utf-8")


def test_the_ignore_label_is_read_apart_from_the_structures(tmp_path):
    write_sparse_dataset(tmp_path)
    dataset = load_dataset(tmp_path, modality="CT")  # a rebuilt Dataset keeps it
    assert dataset.labels == {0: "background", 1: "liver", 2: "kidney", 3: "spine"}
    assert dataset.ignore_label == 4


@pytest.mark.parametrize("labels", [
    {"background": 0, "liver": 1, "kidney": 2, "spine": 3, "ignore": 7},  # past a gap
    {"background": 0, "liver": 1, "ignore": 2, "kidney": 3, "spine": 4},  # among them
])
def test_an_ignore_label_that_is_not_the_next_id_is_refused(tmp_path, labels):
    write_sparse_dataset(tmp_path, labels=labels, n_cases=1)
    with pytest.raises(MedsegError, match=r"'ignore' must be the id one past the "
                                          r"structures' \(\d, as nnU-Net requires\)") as error:
        load_dataset(tmp_path)
    assert error.value.args and "dataset.json" in str(error.value)


@pytest.mark.parametrize("labels, message", [
    ("{1: liver, 2: ignore, 3: spine}", "'ignore' must be the id"),
    ("{1: liver, 2: spine, 5: ignore}", "'ignore' must be the id"),  # past a gap: misplaced
    ("{1: liver, 2: ignore, 3: ignore}", "label names must be unique; repeated: ignore"),
])
def test_a_workflow_ignore_label_that_is_not_the_next_id_is_refused(tmp_path, capsys, labels,
                                                                    message):
    write_sparse_dataset(tmp_path / "data", n_cases=1)
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(tmp_path / "run"),
                 *as_sets([f"dataset.path={tmp_path / 'data'}", "dataset.layout=nnunet",
                           f"dataset.labels={labels}"])])
    err = capsys.readouterr().err
    assert code == 2 and "'dataset.labels'" in err and message in err
    assert not (tmp_path / "run").exists()


def test_a_resume_refuses_a_changed_ignore_label_and_an_old_run_that_trained_one(tmp_path):
    from types import SimpleNamespace

    from medseg.runs import refuse_changed_labels

    labels = {0: "background", 1: "liver"}
    sparse = SimpleNamespace(labels=labels, ignore_label=2)
    dense = SimpleNamespace(labels=labels, ignore_label=None)
    plan_path = tmp_path / "plan.json"
    refuse_changed_labels(sparse, sparse, plan_path)
    with pytest.raises(MedsegError, match=r"plan.json: the dataset's 'ignore' label is id 2, "
                                          r"the run's none"):
        refuse_changed_labels(sparse, dense, plan_path)
    # a run from before: a workflow named class 2 'ignore', and it was trained as one
    old = SimpleNamespace(labels={**labels, 2: "ignore"}, ignore_label=None)
    with pytest.raises(MedsegError, match=r"this run trained id 2, named 'ignore', as a "
                                          r"structure; .* give id 2 another name"):
        refuse_changed_labels(sparse, old, plan_path)


def test_the_loss_without_ignored_voxels_is_dice_ce():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, 6, generator=generator)
    target = torch.randint(0, 4, (2, 1, 8, 8, 6), generator=generator)
    for batch in (True, False):
        for background in (True, False):
            expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch,
                                  include_background=background)(logits, target)
            found = DiceCELossIgnoring(4, batch=batch, include_background=background)(logits,
                                                                                      target)
            assert torch.allclose(found, expected, atol=1e-6)


@pytest.mark.parametrize("background", [True, False])
def test_a_perfect_prediction_of_a_sparse_target_loses_nothing(background):
    """MaskedDiceLoss one-hot encoded the masked indices: every ignored voxel became
    background, so a perfect prediction lost 0.25 with background in the Dice."""
    generator = torch.Generator().manual_seed(2)
    target = torch.randint(0, 3, (2, 1, 16, 16, 12), generator=generator)
    logits = 20.0 * F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    sparse = target.clone()
    sparse[..., 1::3] = 3
    sparse[..., 2::3] = 3
    loss = DiceCELossIgnoring(3, batch=True, include_background=background)(logits, sparse)
    assert float(loss) < 1e-4


def test_ignored_voxels_give_no_gradient_and_an_all_ignored_patch_no_nan():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 6, 6, 6, generator=generator, requires_grad=True)
    target = torch.randint(0, 3, (1, 1, 6, 6, 6), generator=generator)
    target[..., :3] = 3
    loss = DiceCELossIgnoring(3, batch=True, include_background=True)(logits, target)
    loss.backward()
    assert torch.all(logits.grad[..., :3] == 0) and torch.any(logits.grad[..., 3:] != 0)
    # what the annotated half alone gives: the ignored half changes nothing
    other = logits.detach().clone()
    other[..., :3] = 50.0
    again = DiceCELossIgnoring(3, batch=True, include_background=True)(other, target)
    assert torch.allclose(again, loss.detach(), atol=1e-6)
    nothing = DiceCELossIgnoring(3, batch=True, include_background=True)(
        logits, torch.full_like(target, 3))
    assert torch.isfinite(nothing)


def test_leave_out_ignored_clears_both_maps_where_the_reference_ignores():
    reference = np.array([[[0, 1, 4, 4]]])
    prediction = np.array([[[1, 1, 2, 0]]])
    pred, ref = leave_out_ignored(prediction, reference, 4)
    assert pred.tolist() == [[[1, 1, 0, 0]]] and ref.tolist() == [[[0, 1, 0, 0]]]
    assert reference.tolist() == [[[0, 1, 4, 4]]]  # the inputs are left alone
    same = leave_out_ignored(prediction, reference, None)
    assert same[0] is prediction and same[1] is reference


def test_train_predict_and_evaluate_with_an_ignore_label(tmp_path, capsys):
    data = tmp_path / "data"
    write_sparse_dataset(data)
    run = tmp_path / "run"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 *as_sets([f"dataset.path={data}", "dataset.layout=nnunet",
                           *TINY_TRAINING])]) == 0
    assert "id 4 'ignore'" in capsys.readouterr().out
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    assert plan["num_classes"] == 4 and plan["ignore_label"] == 4
    assert set(plan["labels"].values()) == {"background", "liver", "kidney", "spine"}
    lines = (run / "fold_0" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    val = [json.loads(line) for line in lines if "val_dice" in json.loads(line)]
    assert val and set(val[-1]["val_dice"]) == {"liver", "kidney", "spine"}
    assert np.isfinite(val[-1]["val_mean_dice"])

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "case0_0000.nii.gz").write_bytes((data / "imagesTr" / "case0_0000.nii.gz")
                                               .read_bytes())
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--output",
                 str(tmp_path / "pred")]) == 0
    mask = np.asarray(nib.load(tmp_path / "pred" / "case0.nii.gz").dataobj)
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3}

    # scoring: the prediction's voxels on ignored slices count neither way
    reference_dir = tmp_path / "ref"
    reference_dir.mkdir()
    reference = nib.load(data / "labelsTr" / "case0.nii.gz")
    nib.save(reference, reference_dir / "case0.nii.gz")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(reference_dir),
                 "--labels", str(data / "dataset.json"), "--out",
                 str(tmp_path / "scores")]) == 0
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text(encoding="utf-8"))
    ref = np.asarray(reference.dataobj)
    annotated = ref != 4
    counted_ignored = []
    for label_id, name in ((1, "liver"), (2, "kidney"), (3, "spine")):
        p, r = (mask == label_id) & annotated, ref == label_id
        expected = 2 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))
        assert summary["structures"][name]["dice"]["mean"] == pytest.approx(expected)
        counted_ignored.append(np.count_nonzero(mask == label_id) != np.count_nonzero(p))
    assert any(counted_ignored)  # the mask has structure voxels on the ignored slices
    assert "ignore" not in summary["structures"] and summary["ignore_label"] == 4
    page = (tmp_path / "scores" / "report.html").read_text(encoding="utf-8")
    assert "cannot draw" not in page and page.count("<img") >= 2  # box plots and an overlay
    assert "Unannotated voxels" in page
    # predict --reference scores with the plan's ignore label, as evaluate with the map
    assert main(["predict", "--model", str(run), "--input", str(inputs), "--output",
                 str(tmp_path / "pred2"), "--reference", str(reference_dir)]) == 0
    scored = json.loads((tmp_path / "pred2" / "evaluation" / "summary.json")
                        .read_text(encoding="utf-8"))
    assert scored["ignore_label"] == 4 and scored["structures"] == summary["structures"]
    capsys.readouterr()
    # without the map, id 4 is a structure no prediction has: a note points to 'ignore'
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref",
                 str(reference_dir)]) == 0
    assert "label_4 in the references but in no prediction" in capsys.readouterr().err


def test_check_takes_the_ignore_id_as_a_label_value(tmp_path, capsys):
    # a third case keeps its structures: with none in any case, check errs (as training does)
    write_sparse_dataset(tmp_path / "data", n_cases=3)
    for case, outside in (("case0", 4), ("case1", 0)):
        label = tmp_path / "data" / "labelsTr" / f"{case}.nii.gz"
        image = nib.load(label)
        nib.save(nib.Nifti1Image(np.where(np.asarray(image.dataobj) > 0, 4, outside)
                                 .astype(np.uint8), image.affine), label)
    assert main(["check", str(tmp_path / "data")]) == 0  # warnings, no error
    assert main(["check", str(tmp_path / "data"), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "not in the label map" not in out
    assert "holds no structure (background and 'ignore' only)" in out
    assert "holds no structure ('ignore' only: no voxel is annotated)" in out


def test_unannotated_voxels_are_not_foreground_for_the_intensity_statistics(tmp_path):
    """The CT clip range comes from the structures' voxels: the ignored slices hold air
    (-1000 HU) too, and counting them as foreground widened it to the air's values."""
    from medseg.plan import fingerprint

    write_sparse_dataset(tmp_path, n_cases=2)
    stats = fingerprint(load_dataset(tmp_path), progress=False).intensity[0]
    assert stats["p00_5"] > -200


@pytest.mark.parametrize("crop_size", [None, [20, 20, 20]])
def test_a_case_labelled_ignore_everywhere_still_gives_a_patch(crop_size):
    """No background and no structure voxel: MONAI drew from no class ('probabilities
    contain NaN', a ValueError naming no file) once the padding brought no background."""
    from medseg.transforms import IMAGE, LABEL, ForegroundOversampledCropd

    case = {IMAGE: torch.rand(1, 16, 16, 16), LABEL: torch.full((1, 16, 16, 16), 3.0)}
    crop = ForegroundOversampledCropd([IMAGE, LABEL], 0.33, [16, 16, 16], 3, "none",
                                      crop_size=crop_size)
    for seed in range(4):
        crop.set_random_state(seed)
        patch = crop(dict(case))[0]
        assert tuple(patch[IMAGE].shape[1:]) == tuple(crop_size or [16, 16, 16])


def test_ignore_spelt_otherwise_is_a_structure_with_a_note(capsys):
    from medseg.runs import note_ignore_spelt_otherwise

    labels = {0: "background", 1: "liver", 2: "Ignore"}
    assert split_ignore_label(labels) == (labels, None)  # nnU-Net's rule: lower case only
    note_ignore_spelt_otherwise(labels)
    assert "label 2 'Ignore' is trained as a structure" in capsys.readouterr().err
    note_ignore_spelt_otherwise({0: "background", 1: "liver"})
    assert capsys.readouterr().err == ""
