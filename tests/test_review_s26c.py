"""Review of model archives and fine-tuning sources (session 26c): regressions found."""

import errno
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_TRAINING, as_sets, zip_members

import medseg.pretrained
from medseg.archive import MANIFEST, unpack
from medseg.cli import main
from medseg.fileio import sha256_of_file
from medseg.model import create_model
from medseg.plan import load_plan

WEIGHTS = "fold_0/checkpoints/best.safetensors"


def _rebuilt(model_archive: Path, target: Path, change, manifest_change=None) -> Path:
    """The archive with its members changed and a manifest that agrees with them (SHA-256
    and sizes), as one would build by hand; `manifest_change` then edits the manifest."""
    members = zip_members(model_archive)
    change(members)
    manifest = json.loads(members.pop(MANIFEST))
    manifest["files"] = {name: hashlib.sha256(data).hexdigest()
                         for name, data in sorted(members.items())}
    manifest["sizes"] = {name: len(data) for name, data in sorted(members.items())}
    if manifest_change is not None:
        manifest_change(manifest)
    members[MANIFEST] = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return target


def _predict_refusal(archive: Path, phantom_dataset: Path, tmp_path: Path, capsys) -> str:
    """predict --model ARCHIVE's one-line refusal (exit 2, no output folder)."""
    out = tmp_path / "out"
    assert main(["predict", "--model", str(archive), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(archive) in err, err
    assert not out.exists()
    return err


def _copy_fold_0(k: int):
    def change(members: dict) -> None:
        members[f"fold_{k}/checkpoints/best.safetensors"] = members[WEIGHTS]
    return change


def _metrics_only(k: int):
    def change(members: dict) -> None:
        members[f"fold_{k}/metrics.jsonl"] = members["fold_0/metrics.jsonl"]
    return change


def _set_folds(folds):
    def change(manifest: dict) -> None:
        manifest["folds"] = folds
    return change


@pytest.mark.parametrize(("change", "manifest_change", "expected"), [
    # the manifest says [0, 1], and only fold_0 is inside: predict used fold_0 alone
    (lambda m: None, _set_folds([0, 1]),
     "lists fold 1 of folds [0, 1], and the archive holds no fold_1/checkpoints"),
    # a fold_2 the manifest's folds do not list: predict averaged it in
    (_copy_fold_0(2), None, "holds fold_2, which medseg_model.json does not list"),
    # a fold listed with its metrics.jsonl but no weights
    (_metrics_only(1), _set_folds([0, 1]), "holds no fold_1/checkpoints/best.safetensors"),
    (_metrics_only(1), None, "holds fold_1, which medseg_model.json does not list"),
    (lambda m: None, _set_folds("0"), "gives no list of folds"),
    (lambda m: None, _set_folds([0, 0]), "gives no list of folds"),
    (lambda m: None, _set_folds([True]), "gives no list of folds"),
    (lambda m: None, lambda manifest: manifest.pop("folds"), "gives no list of folds"),
    # fold_01: predict does not take it for a fold, and said only 'no trained fold'
    (lambda m: m.update({"fold_01/checkpoints/best.safetensors": m.pop(WEIGHTS)}),
     _set_folds([1]), "holds 'fold_01/checkpoints/best.safetensors', which no model"),
])
def test_the_manifests_folds_are_the_folds_in_the_archive(
        model_archive, phantom_dataset, tmp_path, capsys, change, manifest_change, expected):
    changed = _rebuilt(model_archive, tmp_path / "changed.zip", change, manifest_change)
    assert expected in _predict_refusal(changed, phantom_dataset, tmp_path, capsys)


def test_an_archive_of_two_listed_folds_is_read(model_archive, phantom_dataset, tmp_path):
    two = _rebuilt(model_archive, tmp_path / "two.zip", _copy_fold_0(1), _set_folds([0, 1]))
    assert main(["predict", "--model", str(two), "--input", str(phantom_dataset / "imagesTs"),
                 "--output", str(tmp_path / "out")]) == 0


def _sizes_as_text(manifest: dict) -> None:
    manifest["sizes"] = {name: str(size) for name, size in manifest["sizes"].items()}


def _digest_as_number(manifest: dict) -> None:
    manifest["files"]["plan.json"] = 1


@pytest.mark.parametrize(("manifest_change", "expected"), [
    # was 'unpacks to 1085 bytes, and medseg_model.json says 1085: ... damaged or changed'
    (_sizes_as_text, "a size of '"),
    (_digest_as_number, "gives plan.json a SHA-256 of 1, not 64 hexadecimal digits"),
    # true == 1 in Python: a format of true was taken for format 1
    (lambda manifest: manifest.update({"format": True}), "is not of format 1"),
])
def test_a_manifest_of_other_value_types_is_refused_as_another_format(
        model_archive, phantom_dataset, tmp_path, capsys, manifest_change, expected):
    changed = _rebuilt(model_archive, tmp_path / "changed.zip", lambda m: None,
                       manifest_change)
    err = _predict_refusal(changed, phantom_dataset, tmp_path, capsys)
    assert expected in err and ("not a model archive of format 1" in err
                                or "is not of format 1" in err), err


@pytest.mark.parametrize("folder", ["../", "/etc/", "elsewhere/"])
def test_a_folder_entry_outside_the_archives_folders_is_refused(
        model_archive, phantom_dataset, tmp_path, capsys, folder):
    """Folder entries were skipped unchecked: an archive holding '../' was read."""
    changed = _rebuilt(model_archive, tmp_path / "changed.zip", lambda m: None)
    with zipfile.ZipFile(changed, "a") as zf:
        zf.writestr(folder, b"")
    assert f"holds the folder '{folder}'" in _predict_refusal(changed, phantom_dataset,
                                                             tmp_path, capsys)


def test_the_folder_entries_of_zip_r_are_read(model_archive, phantom_dataset, tmp_path):
    """An unpacked archive zipped again with `zip -r` holds fold_0/ and fold_0/checkpoints/."""
    changed = _rebuilt(model_archive, tmp_path / "again.zip", lambda m: None)
    with zipfile.ZipFile(changed, "a") as zf:
        zf.writestr("fold_0/", b"")
        zf.writestr("fold_0/checkpoints/", b"")
    assert main(["predict", "--model", str(changed), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("key", ["train.init", "train.splits_file"])
def test_the_demo_refuses_weights_or_splits_of_its_own_before_any_work(
        trained_run, tmp_path, capsys, key):
    """`demo --set train.init=RUN` wrote the phantoms and planned, then was refused for a
    network that did not fit (the demo takes no plan keys from the source, as train does),
    with --set advice that made it fine-tune the demo from those weights."""
    source = trained_run if key == "train.init" else tmp_path / "splits.json"
    (tmp_path / "splits.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}] * 2),
                                          encoding="utf-8")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", f"{key}={source}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--set {key}: the demo trains its own" in err, err
    assert not (tmp_path / "demo").exists()
    # a null value gives nothing: it is no reason to refuse
    from medseg.cli import _refuse_demo_sources
    from medseg.config import load_workflow

    _refuse_demo_sources(load_workflow(None, [f"{key}=null"]))


def test_train_init_hashes_its_weights_once_for_all_folds(trained_run, phantom_dataset,
                                                         tmp_path, monkeypatch):
    """Each fold resolved and SHA-256-hashed the source again (and each torchrun rank, though
    only rank 0 writes the hash): weights of gigabytes were read once more per fold."""
    hashed = []
    monkeypatch.setattr(medseg.pretrained, "sha256_of_file",
                        lambda path: hashed.append(path) or sha256_of_file(path))
    medseg.pretrained._sha256_of_version.cache_clear()
    quick = [*TINY_TRAINING, "train.epochs=1", "train.iterations_per_epoch=1",
             "train.val_max_cases=0", "train.folds=2"]
    out = tmp_path / "tuned"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={phantom_dataset}", *quick]), "--fold", "all",
                 "--init", str(trained_run)]) == 0
    assert len(hashed) == 1
    weights = trained_run / WEIGHTS
    for k in (0, 1):
        first = json.loads((out / f"fold_{k}" / "metrics.jsonl").read_text(
            encoding="utf-8").splitlines()[0])
        assert first["init"]["sha256"] == sha256_of_file(weights), k


def test_a_rank_that_writes_no_log_does_not_hash_the_init_weights(trained_run, monkeypatch):
    monkeypatch.setattr(medseg.pretrained, "sha256_of_file",
                        lambda path: pytest.fail("hashed on a rank that writes no log"))
    medseg.pretrained._sha256_of_version.cache_clear()
    plan = load_plan(trained_run / "plan.json")
    record = medseg.pretrained.load_init(create_model(plan), plan, str(trained_run),
                                         main_rank=False)
    assert record["sha256"] is None and record["tensors_loaded"] == 45


@pytest.mark.parametrize(("member", "content", "expected"), [
    ("plan.json", b"{", "not valid JSON"),
    (WEIGHTS, b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "not readable as safetensors weights"),
    (WEIGHTS, b"xx", "not readable as safetensors weights"),
])
def test_export_refuses_a_run_whose_plan_or_weights_cannot_be_read(
        trained_run, tmp_path, capsys, member, content, expected):
    """They were packed as they were: the archive was written (exit 0), and refused only at
    the site it was handed to."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / member).write_bytes(content)
    target = tmp_path / "model.zip"
    assert main(["export", str(run), str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run / member}: " in err and expected in err, err
    assert not target.exists() and list(tmp_path.iterdir()) == [run]


def test_an_init_source_whose_runs_plan_cannot_be_read_says_train_init(
        trained_run, phantom_dataset, tmp_path, capsys):
    """The refusal named the source run's plan.json without a word of why it was read:
    'RUN/plan.json: not a plan medseg can read: not a JSON object'."""
    source = tmp_path / "source"
    shutil.copytree(trained_run, source)
    (source / "plan.json").write_text("[]", encoding="utf-8")
    out = tmp_path / "tuned"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING]),
                 "--init", str(source / "fold_0")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"medseg: error: {source / 'plan.json'}: train.init: the plan.json of the "
                   f"source run cannot be read (not a plan medseg can read: not a JSON "
                   f"object)"), err
    assert not out.exists()


@pytest.mark.parametrize("damaged", [False, True])
def test_an_archive_named_dot_dot_zip_unpacks_inside_its_temporary_folder(
        model_archive, phantom_dataset, tmp_path, capsys, monkeypatch, damaged):
    """'...zip' was unpacked into TEMP/medseg-model-XXXX/.., the temporary folder's parent
    (/tmp), and left there; a damaged one was refused by removing that parent whole."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("another program's file", encoding="utf-8")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    archive = tmp_path / "...zip"
    if damaged:
        _rebuilt(model_archive, archive, lambda m: None, _set_folds([0, 1]))
    else:
        shutil.copy(model_archive, archive)
    assert main(["predict", "--model", str(archive), "--input",
                 str(phantom_dataset / "imagesTs"), "--output",
                 str(tmp_path / "out")]) == (2 if damaged else 0)
    assert sorted(p.name for p in scratch.iterdir()) == ["keep.txt"]


def test_unpack_refuses_a_folder_that_exists(model_archive, tmp_path):
    """Its refusal of a damaged archive removes the folder it unpacked into: one of the
    caller's would go with it."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "mine.txt").write_text("x", encoding="utf-8")
    with pytest.raises(FileExistsError):
        unpack(_rebuilt(model_archive, tmp_path / "bad.zip", lambda m: None,
                        _set_folds([0, 1])), folder)
    assert (folder / "mine.txt").is_file()


def _unfinished_with_other_step(members: dict) -> dict:
    workflow = yaml.safe_load(members["workflow.yaml"])
    workflow["train"]["epochs"] = 100
    workflow["predict"]["step"] = 0.75
    members["workflow.yaml"] = yaml.safe_dump(workflow, sort_keys=False).encode()
    return members


def _other_weights(members: dict) -> None:
    """fold_0's weights moved by seeded noise, as another seed's training would give."""
    import torch
    from safetensors.torch import load, save

    name = "fold_0/checkpoints/best.safetensors"
    generator = torch.Generator().manual_seed(3)
    members[name] = save({key: value + 0.05 * torch.randn(value.shape, generator=generator)
                          if value.is_floating_point() else value
                          for key, value in load(members[name]).items()})


def test_an_ensembles_notes_name_the_archive_not_its_temporary_folder(
        model_archive, trained_run, phantom_dataset, tmp_path, capsys):
    """They named /tmp/medseg-model-XXXX/NAME, gone when the note is read."""
    # other weights: the run's own, beside it, would be refused as a copy of it
    archive = _rebuilt(model_archive, tmp_path / "tuned.zip",
                       lambda m: _other_weights(_unfinished_with_other_step(m)))
    assert main(["predict", "--model", str(trained_run), str(archive), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "medseg-model-" not in captured.out + captured.err
    assert f"note: {archive}/fold_0 has not finished its 100 epochs" in captured.err
    assert f"note: {archive} sets predict.step otherwise than {trained_run}" in captured.err
    assert f"with {trained_run}/fold_0, {archive}/fold_0 in" in captured.out


def test_an_empty_folds_option_is_refused(trained_run, tmp_path, capsys):
    """`export RUN M.zip --folds "$FOLDS"` with FOLDS unset packed every fold (exit 0)."""
    for argv in (["export", str(trained_run), str(tmp_path / "m.zip"), "--folds", ""],
                 ["predict", "--model", str(trained_run), "--input", str(tmp_path),
                  "--output", str(tmp_path / "out"), "--folds", " "],
                 ["crossval", str(trained_run), "--folds", ""]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == ("medseg: error: --folds is empty (an unset shell variable?): give fold "
                       "numbers, or leave --folds out for every trained fold"), err
    assert list(tmp_path.iterdir()) == []


class _FullDisk:
    """A file open for writing on a disk that is full."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_temporary_disk_is_not_blamed_on_the_archive(
        model_archive, phantom_dataset, tmp_path, capsys, monkeypatch):
    """A disk that filled while the archive was unpacked (or a quota) gave 'not a readable
    model archive ([Errno 28] No space left on device)', as if the archive were broken."""
    import medseg.archive

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(medseg.archive, "open", _FullDisk, raising=False)
    err = _predict_refusal(model_archive, phantom_dataset, tmp_path, capsys)
    assert f"cannot be unpacked into the temporary folder {scratch} (" in err, err
    assert "(No space left on device): set TMPDIR to another folder" in err, err
    assert "not a readable model archive" not in err


@pytest.mark.parametrize("source", [r"C:\Users\jdoe\weights\w.safetensors",
                                    "/home/jdoe/weights/w.safetensors"])
def test_export_cuts_a_windows_init_path_to_its_file_name(trained_run, tmp_path, source):
    """A run fine-tuned on Windows kept 'C:\\Users\\jdoe\\...' whole in the archive's
    metrics.jsonl when exported on Linux (Path(...).name splits at '/' alone)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    metrics = run / "fold_0" / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
    first = json.loads(lines[0])
    first["init"] = {"source": source, "sha256": "0" * 64}
    metrics.write_text(json.dumps(first) + "\n" + "".join(lines[1:]), encoding="utf-8")
    assert main(["export", str(run), str(tmp_path / "m.zip")]) == 0
    exported = zip_members(tmp_path / "m.zip")["fold_0/metrics.jsonl"]
    assert b"jdoe" not in exported
    assert json.loads(exported.splitlines()[0])["init"]["source"] == "w.safetensors"


def test_export_refuses_weights_of_another_network(trained_run, tmp_path, capsys):
    """best.safetensors of another plan (copied in from another run) was packed, and the
    archive refused only where it was used."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    tensors = load_file(run / WEIGHTS)
    first = next(iter(tensors))
    tensors[first] = tensors[first][:1]
    save_file(tensors, run / WEIGHTS)
    assert main(["export", str(run), str(tmp_path / "m.zip")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medseg: error: {run / WEIGHTS}: these weights do not fit the "
                          f"network of {run / 'plan.json'} (1 tensor(s) of another shape"), err
    assert not (tmp_path / "m.zip").exists()


def test_an_init_run_without_any_trained_fold_is_not_told_to_give_a_fold(
        trained_run, phantom_dataset, tmp_path, capsys):
    """'this run has no fold_0/checkpoints/best.safetensors (no fold is trained): give
    RUN/fold_K', though no fold of it has weights to give."""
    source = tmp_path / "source"
    shutil.copytree(trained_run, source)
    (source / WEIGHTS).unlink()
    argv = ["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(tmp_path / "tuned"),
            *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING]), "--init"]
    assert main([*argv, str(source)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("(no fold is trained): train it first, or give another source"), err
    # with another fold trained, that fold is the way
    (source / "fold_1" / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / WEIGHTS, source / "fold_1" / "checkpoints")
    assert main([*argv, str(source)]) == 2
    assert capsys.readouterr().err.strip().endswith("(trained: fold_1): give RUN/fold_K")
    assert not (tmp_path / "tuned").exists()


def test_export_takes_files_dated_before_1980(trained_run, model_archive, tmp_path, capsys):
    """A run copied with its files' times kept as 0 (1970: a reproducible build, some
    unpackers) failed: 'ValueError: ZIP does not support timestamps before 1980' (exit 1)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    os.utime(run / WEIGHTS, (0, 0))
    os.utime(run / "plan.json", (0, 0))
    assert main(["export", str(run), str(tmp_path / "m.zip")]) == 0, capsys.readouterr().err
    assert zip_members(tmp_path / "m.zip") == zip_members(model_archive)


def test_a_symbolic_link_entry_is_unpacked_as_a_plain_file(model_archive, tmp_path):
    """A member stored as a Unix symbolic link (mode 0o120777) whose bytes are those the
    manifest lists is written as a plain file of those bytes, never as a link that would
    lead out of the unpacked folder (zipfile makes no links; this keeps it so)."""
    members = zip_members(model_archive)
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name == "plan.json":
                info.create_system, info.external_attr = 3, 0o120777 << 16
            zf.writestr(info, data)
    unpack(archive, tmp_path / "run")
    plan = tmp_path / "run" / "plan.json"
    assert not plan.is_symlink() and plan.read_bytes() == members["plan.json"]
