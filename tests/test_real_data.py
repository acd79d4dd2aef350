"""End-to-end on real scans from ../shared/data (skipped with a reason when absent)."""

import json

import nibabel as nib
import numpy as np
from helpers import REPO, as_sets, requires_shared

from medseg.cli import main


def test_hippocampus_brief_training_gives_masks_on_the_input_grid(tmp_path):
    source = requires_shared("Task04_Hippocampus")
    description = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    cases = description["training"][:12]
    subset = dict(description, training=[
        {key: str((source / entry[key]).resolve()) for key in ("image", "label")}
        for entry in cases])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(subset), encoding="utf-8")
    run = tmp_path / "run"
    code = main(["train", str(REPO / "workflows" / "hippocampus.yaml"), "--out", str(run),
                 *as_sets([f"dataset.path={tmp_path / 'data'}", "plan.base_filters=4",
                           "plan.max_filters=16", "train.epochs=1",
                           "train.iterations_per_epoch=4", "train.num_workers=0"])])
    assert code == 0
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    assert plan["target_spacing"] == [1.0, 1.0, 1.0] and plan["num_classes"] == 3
    splits = json.loads((run / "splits.json").read_text(encoding="utf-8"))
    inputs = [str(source / "imagesTr" / f"{name}.nii.gz") for name in splits[0]["val"]]
    assert main(["predict", "--model", str(run), "--input", *inputs, "--output",
                 str(tmp_path / "pred")]) == 0
    for path in inputs:
        image = nib.load(path)
        mask = nib.load(tmp_path / "pred" / path.split("/")[-1])
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-6)
        assert int(mask.header["sform_code"]) == int(image.header["sform_code"])
        assert int(mask.header["qform_code"]) == int(image.header["qform_code"])
    references = tmp_path / "ref"
    references.mkdir()
    for name in splits[0]["val"]:  # links, not copies, of the real labels
        (references / f"{name}.nii.gz").symlink_to(source / "labelsTr" / f"{name}.nii.gz")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(references),
                 "--labels", str(source / "dataset.json"), "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["structures"]) == {"Anterior", "Posterior"}
