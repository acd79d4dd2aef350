"""train.cache: the on-disk cache of preprocessed training cases trains the same weights as
the memory cache, is reused by later folds and resumes, rebuilt when its plan or a case
changes, and reads a patch, not a case."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_TRAINING, as_sets, synthetic_fingerprint

from medseg.cli import main
from medseg.errors import MedsegError

# a patch deeper than the 24-slice phantoms, and shifts: the cases are padded, so that the
# validation cases must be cut back out of the padded arrays
DETERMINISTIC = [*TINY_TRAINING, "train.deterministic=true", "train.num_workers=0",
                 "train.seed=3", "plan.patch_size=[32,32,32]", "augment.shift_voxels=2"]


def train(out: Path, dataset: Path, *extra: str) -> int:
    return main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={dataset}", *DETERMINISTIC, *extra])])


def final_state(run: Path, fold: int = 0) -> dict:
    return torch.load(run / f"fold_{fold}" / "checkpoints" / "last_state.pt",
                      weights_only=True)


def metrics(run: Path) -> list[dict]:
    lines = (run / "fold_0" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def cache_times(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run / "cache").iterdir()
            if p.suffix == ".npy"}


def assert_same_weights(one: Path, other: Path) -> None:
    a, b = final_state(one), final_state(other)
    assert a["epoch"] == b["epoch"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for weights in ("last.safetensors", "best.safetensors"):
        assert (one / "fold_0" / "checkpoints" / weights).read_bytes() == \
            (other / "fold_0" / "checkpoints" / weights).read_bytes(), weights


@pytest.mark.parametrize("workers", ["0", "1"])
def test_memory_and_disk_caches_train_identical_weights(tmp_path, phantom_dataset, workers):
    """The same patches in the same order: the crop from the files draws what MONAI's crop
    of the cached case draws, and validation scores the same (unpadded) cases."""
    runs = {}
    for mode in ("memory", "disk"):
        runs[mode] = tmp_path / mode
        assert train(runs[mode], phantom_dataset, f"train.cache={mode}",
                     f"train.num_workers={workers}") == 0
    assert not (runs["memory"] / "cache").exists()
    assert (runs["disk"] / "cache" / "manifest.json").is_file()
    assert_same_weights(runs["memory"], runs["disk"])
    for memory, disk in zip(metrics(runs["memory"]), metrics(runs["disk"]), strict=True):
        assert memory["train_loss"] == disk["train_loss"]
        assert memory["val_dice"] == disk["val_dice"]


def test_resume_in_disk_mode_repeats_the_uninterrupted_run_and_reuses_the_cache(
        tmp_path, phantom_dataset):
    assert train(tmp_path / "straight", phantom_dataset, "train.cache=disk") == 0
    assert train(tmp_path / "split", phantom_dataset, "train.cache=disk",
                 "train.max_minutes=0.00001") == 0
    assert [r["epoch"] for r in metrics(tmp_path / "split")] == [0]
    built = cache_times(tmp_path / "split")
    assert len(built) == 3 * 6  # image, label and indices of the 6 cases of fold 0
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert cache_times(tmp_path / "split") == built  # read again, not written again
    # another fold of the run: the same cases, the same files
    assert main(["train", "--resume", str(tmp_path / "split"), "--fold", "1"]) == 0
    assert (tmp_path / "split" / "fold_1" / "checkpoints" / "best.safetensors").is_file()
    assert cache_times(tmp_path / "split") == built


def test_a_resume_may_move_the_cases_to_disk_and_ends_as_the_straight_run(tmp_path,
                                                                          phantom_dataset):
    assert train(tmp_path / "straight", phantom_dataset, "train.cache=memory") == 0
    assert train(tmp_path / "split", phantom_dataset, "train.cache=memory",
                 "train.max_minutes=0.00001") == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--set",
                 "train.cache=disk"]) == 0
    assert (tmp_path / "split" / "cache" / "manifest.json").is_file()
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


def test_a_changed_plan_or_case_file_rebuilds_what_it_changed(tmp_path, phantom_dataset):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dataset, data)
    run = tmp_path / "run"
    assert train(run, data, "train.cache=disk", "train.max_minutes=0.00001",
                 "train.epochs=3") == 0  # an epoch a session: each resume reads the cache
    built = cache_times(run)
    manifest = json.loads((run / "cache" / "manifest.json").read_text(encoding="utf-8"))
    # one case's image rewritten (a newer time): that case alone is prepared again
    image = data / "imagesTr" / "phantom_002.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=0.00001"]) == 0
    rebuilt = {name for name, time in cache_times(run).items() if time != built[name]}
    stem = manifest["cases"]["phantom_002"]["stem"]
    assert rebuilt == {f"{stem}.{part}.npy" for part in ("image", "label", "indices")}
    # another normalization in plan.json: every case again, under a new key
    plan_path = run / "plan.json"
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    plan["normalization"][0]["mean"] += 10.0
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    before = cache_times(run)
    assert main(["train", "--resume", str(run)]) == 0
    after = json.loads((run / "cache" / "manifest.json").read_text(encoding="utf-8"))
    assert after["key"] != manifest["key"]
    assert all(time != before[name] for name, time in cache_times(run).items())


def test_a_stale_temporary_or_a_cut_file_is_not_read(tmp_path, phantom_dataset):
    """A build killed while writing leaves a temporary file (never listed: removed) or, had a
    file been cut short, one of another size than the manifest's (that case is rebuilt)."""
    run = tmp_path / "run"
    assert train(run, phantom_dataset, "train.cache=disk", "train.max_minutes=0.00001") == 0
    cache = run / "cache"
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    stem = manifest["cases"]["phantom_001"]["stem"]
    stale = cache / f".{stem}.image.npy.k3x9a.part.npy"
    stale.write_bytes(b"\x93NUMPY half of a header")
    orphan = cache / "gone_case.0badf00d.image.npy"
    orphan.write_bytes(b"left by a case the dataset no longer has")
    cut = cache / f"{stem}.label.npy"
    cut.write_bytes(cut.read_bytes()[:100])
    built = cache_times(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert not stale.exists() and not orphan.exists()
    rebuilt = {name for name, time in cache_times(run).items() if time != built.get(name)}
    assert rebuilt == {f"{stem}.{part}.npy" for part in ("image", "label", "indices")}
    assert np.load(cut, allow_pickle=False).shape[1:] == (36, 36, 36)


def _large_cached_case(tmp_path: Path, shape=(1, 160, 160, 160)):
    from medseg.cache import CachedCase

    image = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[0, 60:100, 60:100, 60:100] = 1
    indices = [np.flatnonzero(label[0] == c)[:20_000] for c in range(2)]
    paths = [tmp_path / f"case.{part}.npy" for part in ("image", "label", "indices")]
    for path, array in zip(paths, (image, label, np.concatenate(indices)), strict=True):
        np.save(path, array, allow_pickle=False)
    box = ((10, 150), (0, 160), (0, 160))
    return CachedCase(*paths, shape, tuple(len(i) for i in indices), box), image, label


def test_a_patch_from_the_disk_cache_costs_a_patch_not_a_case(tmp_path):
    from monai import transforms as mt

    from medseg.cache import INDICES_KEY, PatchFromFilesd
    from medseg.transforms import IMAGE, LABEL

    case, image, label = _large_cached_case(tmp_path)  # 16 MB of image
    del image
    arrays = case.mapped()
    assert isinstance(arrays[IMAGE], np.memmap) and isinstance(arrays[LABEL], np.memmap)
    crop = PatchFromFilesd(mt.RandCropByLabelClassesd(
        [IMAGE, LABEL], label_key=LABEL, spatial_size=[32, 32, 32], ratios=[0.5, 0.5],
        num_classes=2, num_samples=1, warn=False, indices_key=INDICES_KEY))
    crop.set_random_state(seed=0)
    tracemalloc.start()
    try:
        (patch,) = crop(case.mapped())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tuple(patch[IMAGE].shape) == tuple(patch[LABEL].shape) == (1, 32, 32, 32)
    assert patch[IMAGE].dtype == patch[LABEL].dtype == torch.float32
    patch_bytes = 2 * 4 * 32**3  # image and label patches, float32
    assert peak < 2 * patch_bytes + 2**20, peak  # a case would be 16 MB
    # the patch is where MONAI's own crop of the whole case puts it, value for value
    reference = mt.RandCropByLabelClassesd(
        [IMAGE, LABEL], label_key=LABEL, spatial_size=[32, 32, 32], ratios=[0.5, 0.5],
        num_classes=2, num_samples=1, warn=False, indices_key=INDICES_KEY)
    reference.set_random_state(seed=0)
    whole = {key: torch.from_numpy(np.array(value)) if key != INDICES_KEY else value
             for key, value in case.mapped().items()}
    (expected,) = reference(whole)
    assert torch.equal(expected[IMAGE].as_tensor(), patch[IMAGE])
    assert torch.equal(expected[LABEL].as_tensor().float(), patch[LABEL])


def test_validation_reads_the_unpadded_case(tmp_path):
    case, image, label = _large_cached_case(tmp_path)
    whole = case.whole()
    assert np.array_equal(whole["image"].numpy(), image[:, 10:150])
    assert np.array_equal(whole["label"].numpy(), label[:, 10:150])


def test_auto_chooses_memory_under_half_the_machine_and_disk_past_it():
    from medseg.cache import choose_cache

    gb = 2**30
    assert choose_cache("auto", 5 * gb, 24 * gb)[0] == "memory"
    mode, why = choose_cache("auto", 230 * gb, 24 * gb)
    assert mode == "disk" and why == ("the cases would take about 230 GB of memory, more than "
                                      "50% of this machine's 24 GB")
    assert choose_cache("auto", 5 * gb, 24 * gb, processes=4)[0] == "disk"  # a copy each
    assert choose_cache("auto", None, 24 * gb)[0] == "memory"  # nothing to go by: as before
    assert choose_cache("disk", 1.0, 24 * gb)[0] == "disk"
    assert choose_cache("memory", 230 * gb, 24 * gb)[0] == "memory"


def test_auto_goes_to_disk_on_a_small_machine_and_says_why(tmp_path, phantom_dataset,
                                                         monkeypatch, capsys):
    import medseg.fileio

    monkeypatch.setattr(medseg.fileio, "physical_memory", lambda: 2**18)  # 256 KB
    assert train(tmp_path / "memory", phantom_dataset, "train.cache=memory") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("medseg: error: the data's own spacing [4, 4, 8] mm (planned from "
                           "its median spacing; 'plan.target_spacing' is not set) would ")
    assert last.endswith("set 'train.cache' to disk (or auto) to keep the cases on disk")
    assert train(tmp_path / "auto", phantom_dataset, "train.max_minutes=0.00001") == 0
    out = capsys.readouterr().out
    assert ("train.cache auto chose disk: the cases would take about 0.0011 GB of memory, "
            "more than 50% of this machine's 0.000244 GB; the preprocessed cases go to "
            f"{tmp_path / 'auto' / 'cache'}") in out
    assert (tmp_path / "auto" / "cache" / "manifest.json").is_file()


def test_a_disk_without_room_for_the_cache_is_refused_naming_the_folder(
        tmp_path, phantom_dataset, monkeypatch, capsys):
    import shutil

    import medseg.cache

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(medseg.cache.shutil, "disk_usage",
                        lambda path: usage._replace(free=100_000))
    assert train(tmp_path / "run", phantom_dataset, "train.cache=disk") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1:]
    assert err == [f"medseg: error: {tmp_path / 'run' / 'cache'}: the disk cache of 6 case(s) "
                   f"needs about 0.00339 GB and its disk has 9.31e-05 GB free: free some space "
                   f"or put the run folder on a larger disk"]


def test_an_unknown_cache_is_refused_naming_the_key():
    from medseg.config import load_workflow

    with pytest.raises(MedsegError) as caught:
        load_workflow(None, ["train.cache=ssd"])
    assert str(caught.value) == ("--set train.cache=ssd: 'train.cache' is 'ssd'; choose one of "
                                 "auto, memory, disk")


def test_the_data_s_own_spacing_is_not_blamed_on_the_key():
    from medseg.config import PlanConfig
    from medseg.plan import make_plan, refuse_unaffordable_spacing

    # 300 CTs of 512 x 512 x 400 at their own spacing: about 230 GB in memory
    fp = synthetic_fingerprint([[0.8, 0.8, 1.5]] * 300, [[512, 512, 400]] * 300, "CT")
    plan = make_plan(fp, PlanConfig())
    memory = 24 * 2**30
    with pytest.raises(MedsegError) as caught:
        refuse_unaffordable_spacing(fp, plan, memory, "memory", spacing_given=False)
    message = str(caught.value)
    assert message.startswith("the data's own spacing [0.8, 0.8, 1.5] mm (planned from its "
                              "median spacing; 'plan.target_spacing' is not set)")
    assert message.endswith("this machine has 24 GB: set 'train.cache' to disk (or auto) to "
                            "keep the cases on disk")
    assert "coarser" not in message
    refuse_unaffordable_spacing(fp, plan, memory, "auto", spacing_given=False)  # disk then
    refuse_unaffordable_spacing(fp, plan, memory, "disk", spacing_given=False)
    # a case beyond 2^31 voxels is refused whatever the cache
    fine = make_plan(fp, PlanConfig(target_spacing=[0.1, 0.1, 0.1]))
    for cache in ("memory", "auto", "disk"):
        with pytest.raises(MedsegError, match=r"more than 2\^31: choose a coarser spacing"):
            refuse_unaffordable_spacing(fp, fine, memory, cache, spacing_given=True)


def test_under_torchrun_rank_0_builds_the_cache_and_both_train_on_it(tmp_path,
                                                                     phantom_dataset):
    """Rank 0 writes the cache while rank 1 waits; both then read it, and the run ends with
    the weights of the same run on the memory cache."""
    from test_ddp import run_files, torchrun

    runs = {}
    for mode in ("memory", "disk"):
        runs[mode] = tmp_path / mode
        done = torchrun(str(REPO / "workflows" / "demo.yaml"), "--out", str(runs[mode]),
                        *as_sets([f"dataset.path={phantom_dataset}", *DETERMINISTIC,
                                  f"train.cache={mode}"]))
        assert done.returncode == 0, done.stderr[-3000:]
    cached = {name for name in run_files(runs["disk"]) if name.startswith("cache/")}
    assert len(cached) == 1 + 3 * 6  # the manifest and each case's three files, once
    assert run_files(runs["disk"]) - cached == run_files(runs["memory"])
    assert_same_weights(runs["memory"], runs["disk"])


def two_channel_csv_dataset(root: Path) -> Path:
    """Six two-channel cases of several sizes, some smaller than the patch (padded)."""
    import csv

    import nibabel as nib

    from medseg.phantoms import make_phantom

    root.mkdir(parents=True)
    rows = []
    for index, shape in enumerate([(32, 32, 24), (20, 18, 6), (40, 36, 30), (16, 16, 4),
                                   (32, 28, 20), (24, 24, 12)]):
        phantom = make_phantom(100 + index, shape=shape, spacing=(4.0, 4.0, 8.0))
        noise = np.random.default_rng(index).standard_normal(shape).astype(np.float32)
        for channel, data in enumerate((phantom.image, phantom.image + 37.0 * noise)):
            nib.save(nib.Nifti1Image(data.astype(np.float32), phantom.affine),
                     str(root / f"c{index}_{channel}.nii.gz"))
        nib.save(nib.Nifti1Image(phantom.label.astype(np.uint8), phantom.affine),
                 str(root / f"c{index}_label.nii.gz"))
        rows.append({"case": f"case{index}", "image": f"c{index}_0.nii.gz",
                     "t2": f"c{index}_1.nii.gz", "label": f"c{index}_label.nii.gz"})
    with open(root / "dataset.csv", "w", newline="", encoding="utf-8") as table:
        writer = csv.DictWriter(table, fieldnames=["case", "image", "t2", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_memory_and_disk_caches_give_identical_batches_with_every_augmentation(tmp_path):
    """Loader batches compared directly (a review's check, seconds instead of trainings):
    two channels, cases smaller than the patch, shifts, a thick-slice patch (in-plane
    rotation), elastic deformation, low resolution and inverted gamma all drawn."""
    import dataclasses

    from medseg.config import load_workflow
    from medseg.datasets import load_dataset
    from medseg.plan import fingerprint, make_plan, save_fingerprint
    from medseg.train import Ranks, _data, _reseed

    data = two_channel_csv_dataset(tmp_path / "data")
    workflow = load_workflow(None, [
        f"dataset.path={data}", "plan.patch_size=[32,32,8]", "augment.shift_voxels=3",
        "augment.elastic_prob=0.5", "augment.lowres_prob=0.5", "augment.gamma_invert_prob=0.5",
        "augment.rotate_prob=0.5", "augment.scale_prob=0.5", "train.iterations_per_epoch=4",
        "plan.base_filters=4", "plan.max_filters=8"])
    dataset = load_dataset(workflow.dataset.path, "csv")
    fp = fingerprint(dataset, progress=False)
    plan = make_plan(fp, workflow.plan)
    names = [case.name for case in dataset.cases]
    split = {"train": names[:5], "val": names[5:]}
    run = tmp_path / "run"
    run.mkdir()
    save_fingerprint(fp, run / "fingerprint.json")
    drawn = {}
    for mode in ("memory", "disk"):
        chosen = dataclasses.replace(workflow, train=dataclasses.replace(
            workflow.train, cache=mode, num_workers=0))
        train_data, loader, val_data = _data(chosen, dataset, plan, split, Ranks(), run)
        batches = []
        for epoch in range(2):
            _reseed(workflow.train.seed, epoch, train_data, loader)
            batches += [(torch.as_tensor(b["image"]), torch.as_tensor(b["label"]).float())
                        for b in loader]
        batches += [(torch.as_tensor(v["image"]), torch.as_tensor(v["label"]).float())
                    for v in val_data]
        drawn[mode] = batches
    assert len(drawn["memory"]) == len(drawn["disk"]) == 2 * 4 + 1
    for (image, label), (disk_image, disk_label) in zip(*drawn.values(), strict=True):
        assert torch.equal(image, disk_image) and torch.equal(label, disk_label)


def test_the_key_follows_medseg_s_own_preprocessing_code(monkeypatch):
    """A review: a fix in the reading or preprocessing code left a resumed run on the old
    arrays (the memory cache would make new ones)."""
    from monai import transforms as mt

    import medseg.cache as cache
    from medseg.config import PlanConfig
    from medseg.plan import make_plan

    plan = make_plan(synthetic_fingerprint([[1.0, 1.0, 1.0]], [[32, 32, 32]]), PlanConfig())
    steps = mt.Compose([mt.Identityd("image")])
    before = cache.cache_key(plan, steps, [32, 32, 32])
    monkeypatch.setattr(cache, "_code_digest", lambda: "another")
    assert cache.cache_key(plan, steps, [32, 32, 32]) != before
    assert set(cache._library_versions()) == set(cache.PREPROCESSING_LIBRARIES)


def test_fewer_cases_are_prepared_at_once_than_memory_holds():
    from medseg.cache import build_threads

    case = [[512.0, 512.0, 400.0]]  # 0.8 GB of float32 image and label
    assert build_threads(6, case, 1, 64 * 2**30) == 6
    assert build_threads(6, case, 1, 8 * 2**30) == 1
    assert build_threads(0, None, 1, None) == 1


def test_a_container_s_memory_limit_is_the_machine_s_memory(tmp_path, monkeypatch):
    import medseg.fileio as fileio

    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    unlimited, limited = tmp_path / "max", tmp_path / "limit"
    unlimited.write_text("max\n", encoding="ascii")
    limited.write_text(f"{2**30}\n", encoding="ascii")
    monkeypatch.setattr(fileio, "CGROUP_MEMORY_LIMITS", (unlimited, tmp_path / "absent"))
    assert fileio.physical_memory() == machine
    monkeypatch.setattr(fileio, "CGROUP_MEMORY_LIMITS", (unlimited, limited))
    assert fileio.physical_memory() == 2**30


def test_a_memory_cache_a_resume_sets_beyond_memory_is_refused(tmp_path, phantom_dataset,
                                                              monkeypatch, capsys):
    import medseg.fileio as fileio

    run = tmp_path / "run"
    assert train(run, phantom_dataset, "train.cache=disk", "train.max_minutes=0.00001") == 0
    monkeypatch.setattr(fileio, "physical_memory", lambda: 2**10)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.cache=memory"]) == 2
    assert "workflow.yaml: 'train.cache' memory would hold the cases in about " in \
        capsys.readouterr().err


def test_a_full_disk_names_the_cache_folder_and_a_hand_edited_entry_is_rebuilt(
        tmp_path, phantom_dataset, monkeypatch, capsys):
    import medseg.cache as cache

    run = tmp_path / "run"
    real_save = np.save

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "save", full)
    assert train(run, phantom_dataset, "train.cache=disk") == 2
    assert f"{run / 'cache'}: cannot write the disk cache (No space left on device)" in \
        capsys.readouterr().err
    monkeypatch.setattr(cache.np, "save", real_save)
    run2 = tmp_path / "run2"
    assert train(run2, phantom_dataset, "train.cache=disk", "train.max_minutes=0.00001") == 0
    manifest = run2 / "cache" / "manifest.json"
    data = json.loads(manifest.read_text(encoding="utf-8"))
    name = sorted(data["cases"])[0]
    data["cases"][name]["stem"] = "../elsewhere"
    manifest.write_text(json.dumps(data), encoding="utf-8")
    built = cache_times(run2)
    assert main(["train", "--resume", str(run2), "--set", "train.max_minutes=0.00001"]) == 0
    changed = {file for file, time in cache_times(run2).items() if built.get(file) != time}
    assert len(changed) == 3  # that case's image, label and indices, written again


def test_a_case_rewritten_with_its_time_put_back_is_built_again(tmp_path, phantom_dataset):
    """`cp -p` and `rsync -a` keep the modification time, and an uncompressed label its
    size: the change time tells."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dataset, data)
    run = tmp_path / "run"
    assert train(run, data, "train.cache=disk", "train.max_minutes=0.00001") == 0
    built = cache_times(run)
    image = data / "imagesTr" / "phantom_002.nii.gz"
    status = image.stat()
    image.write_bytes(image.read_bytes())
    os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=0.00001"]) == 0
    changed = {file for file, time in cache_times(run).items() if built.get(file) != time}
    assert len(changed) == 3


def test_a_stop_during_the_build_keeps_the_cases_written_by_then(tmp_path, phantom_dataset,
                                                                   monkeypatch):
    """The stop was checked before the finished cases were recorded: Ctrl-C left a case's
    three files without a manifest entry, and the resume built it again."""
    import medseg.cache as cache

    def stop_at_once():
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "raise_if_stopped", stop_at_once)
    run = tmp_path / "run"
    assert train(run, phantom_dataset, "train.cache=disk") == 130
    data = json.loads((run / "cache" / "manifest.json").read_text(encoding="utf-8"))
    assert len(data["cases"]) >= 1


def test_weights_are_written_with_the_umasks_mode(tmp_path):
    """safetensors' save_file wrote best/last.safetensors 0600 (its own temporary file),
    which colleagues on a shared machine could not read."""
    import torch

    from medseg.model import save_weight_tensors

    previous = os.umask(0o022)
    try:
        save_weight_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_damaged_cache_file_is_refused_without_numpy_s_advice(tmp_path):
    """numpy read it as pickled data, its message going on: "If you trust the file you can
    load it unsafely using the `allow_pickle=` keyword argument" -- advice against the
    project's no-pickle rule."""
    from medseg.cache import _mapped

    path = tmp_path / "case.image.npy"
    path.write_bytes(b"overwritten " * 20)
    with pytest.raises(MedsegError) as refusal:
        _mapped(path)
    assert str(refusal.value) == (f"{path}: cannot read this file of the disk cache (not a "
                                  f"NumPy array file: damaged or overwritten); delete "
                                  f"{tmp_path} to rebuild it")
