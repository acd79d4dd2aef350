"""Review of model archives and fine-tuning sources (session 25g): regressions found."""

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from helpers import zip_members

import medseg.fileio
from medseg.archive import MANIFEST, unpack
from medseg.cli import main
from medseg.errors import MedsegError


def _padded(model_archive: Path, target: Path, name: str, pad: int) -> Path:
    """The archive with `name` padded by `pad` spaces (still valid JSON or YAML), its
    manifest's SHA-256 and size made to agree: an archive built to inflate."""
    members = zip_members(model_archive)
    members[name] = members[name] + b" " * pad
    manifest = json.loads(members[MANIFEST])
    manifest["files"][name] = hashlib.sha256(members[name]).hexdigest()
    manifest["sizes"][name] = len(members[name])
    members[MANIFEST] = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return target


@pytest.mark.parametrize("name", ["plan.json", "fold_0/metrics.jsonl"])
def test_a_zip_bomb_is_refused_before_anything_is_unpacked(
        model_archive, phantom_dataset, tmp_path, capsys, monkeypatch, name):
    """An archive of 0.2 MB whose plan.json inflated to 24 MB of spaces (manifest agreeing)
    was unpacked, and plan.json read whole into memory: only the free disk bounded it (a
    66 MB archive fills 66 GB, and the reading of plan.json needs as much memory)."""
    bomb = _padded(model_archive, tmp_path / "bomb.zip", name, 24 << 20)
    assert bomb.stat().st_size < (1 << 20)
    copied = []
    monkeypatch.setattr("medseg.archive._copy_hashed", lambda *args: copied.append(args))
    with pytest.raises(MedsegError, match="zip bomb"):
        unpack(bomb, tmp_path / "run")
    assert copied == [] and not (tmp_path / "run").exists()
    assert main(["predict", "--model", str(bomb), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "zip bomb" in err and str(bomb) in err and len(err.strip().splitlines()) == 1, err


def test_a_text_file_too_large_to_read_is_refused(model_archive, tmp_path, monkeypatch):
    monkeypatch.setattr("medseg.archive.TEXT_LIMIT", 1 << 20)
    monkeypatch.setattr("medseg.archive.RATIO_LIMIT", 10 ** 6)
    big = _padded(model_archive, tmp_path / "big.zip", "workflow.yaml", 2 << 20)
    with pytest.raises(MedsegError, match="more than a model archive's text file can be"):
        unpack(big, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_honest_archive_still_unpacks(model_archive, tmp_path):
    unpack(model_archive, tmp_path / "run")
    assert (tmp_path / "run" / "fold_0" / "checkpoints" / "best.safetensors").is_file()


def test_init_from_a_zip_that_is_no_model_archive_says_what_it_is(phantom_dataset, tmp_path,
                                                                   capsys):
    """`--init MODEL.zip` was refused as 'not readable as safetensors weights (Error while
    deserializing header: header too large)'; a model archive is now read (test_review_s26i),
    and a zip of other files is refused as no model archive."""
    import zipfile

    from helpers import REPO, TINY_TRAINING, as_sets

    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("notes.txt", "not a model")
    out = tmp_path / "tuned"
    assert main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 "--set", f"dataset.path={phantom_dataset}", *as_sets(TINY_TRAINING),
                 "--init", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not a model archive of `medseg export`" in err, err
    assert "header too large" not in err and str(other) in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_export_while_a_fold_appends_to_its_metrics_gives_a_usable_archive(
        trained_run, tmp_path, monkeypatch):
    """export took each file's SHA-256 and size first and copied it afterwards: a fold still
    training appends a line to metrics.jsonl each epoch, and an epoch ending in between gave
    an archive whose manifest disagreed with its own files (refused by predict as damaged)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    metrics = run / "fold_0" / "metrics.jsonl"
    original_hash = medseg.fileio.sha256_of_file

    def hash_then_epoch(path, *args, **kwargs):  # the epoch ends just after the hash
        digest = original_hash(path, *args, **kwargs)
        if Path(path) == metrics:
            with open(metrics, "a", encoding="utf-8") as handle:
                handle.write('{"epoch": 98, "elapsed_seconds": 1.0}\n')
        return digest

    monkeypatch.setattr("medseg.archive.sha256_of_file", hash_then_epoch, raising=False)
    target = tmp_path / "model.zip"
    assert main(["export", str(run), str(target)]) == 0
    unpack(target, tmp_path / "unpacked")  # the manifest agrees with the files
    assert (tmp_path / "unpacked" / "fold_0" / "metrics.jsonl").is_file()


def test_export_onto_a_folder_or_under_a_file_is_one_line_naming_the_target(
        trained_run, model_archive, tmp_path, capsys):
    """`export RUN d.zip --overwrite` with d.zip a folder said 'IsADirectoryError: ...
    /.d.zip.XXXX.part.zip -> d.zip' (exit 1), and a target under a file 'FileExistsError'."""
    folder = tmp_path / "d.zip"
    folder.mkdir()
    plain = tmp_path / "plain.zip"
    plain.write_bytes(b"")
    for target, expected in [(folder, "a folder: the model archive is a file"),
                             (plain / "m.zip", "cannot write")]:
        assert main(["export", str(trained_run), str(target), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert expected in err and str(target) in err, err
        assert "Error:" not in err and ".part" not in err and len(err.strip().splitlines()) == 1
    assert folder.is_dir() and not any(folder.iterdir()) and plain.read_bytes() == b""


def test_a_fine_tuned_runs_archive_names_no_local_path(trained_run, tmp_path):
    """A run trained with --init logs {"init": {"source": "/home/.../best.safetensors"}} in
    each fold's first metrics.jsonl record; export shipped that line as it was, though it
    empties train.init in workflow.yaml for the same reason."""
    run = tmp_path / "tuned"
    shutil.copytree(trained_run, run)
    metrics = run / "fold_0" / "metrics.jsonl"
    source = "/home/jdoe/hospital_x/runs/base/fold_0/checkpoints/best.safetensors"
    lines = metrics.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["init"] = {"source": source, "sha256": "ab" * 32, "tensors_loaded": 45,
                     "tensors_skipped": []}
    metrics.write_text("\n".join([json.dumps(first), *lines[1:], '{"epoch": 9, "tra'])
                       + "\n", encoding="utf-8")  # a half-written last line kept as it was
    target = tmp_path / "model.zip"
    assert main(["export", str(run), str(target)]) == 0
    for name, data in zip_members(target).items():
        assert b"/home" not in data and b"jdoe" not in data and b"hospital" not in data, name
    shipped = zip_members(target)["fold_0/metrics.jsonl"].decode().splitlines()
    assert json.loads(shipped[0])["init"] == {**first["init"], "source": "best.safetensors"}
    assert shipped[1:] == [*lines[1:], '{"epoch": 9, "tra']
    unpack(target, tmp_path / "unpacked")


def test_a_run_folder_given_as_a_link_is_trained_into_and_overwritten(
        phantom_dataset, tmp_path, capsys):
    """`train --out LINK` with LINK a symbolic link to an empty folder (or to a run, with
    --overwrite) stopped after planning with 'OSError: Cannot call rmtree on a symbolic
    link' (exit 1)."""
    from helpers import REPO, TINY_TRAINING, as_sets

    real = tmp_path / "disk" / "run"
    real.mkdir(parents=True)
    outside = tmp_path / "keep.txt"
    outside.write_text("kept", encoding="utf-8")
    link = tmp_path / "run_link"
    link.symlink_to(real, target_is_directory=True)
    argv = ["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(link), "--set",
            f"dataset.path={phantom_dataset}", *as_sets(TINY_TRAINING),
            "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=1"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (real / "plan.json").is_file() and (real / "fold_0" / "metrics.jsonl").is_file()
    (real / "fold_9").symlink_to(outside)  # a link inside: removed, not followed
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    assert link.is_symlink() and (real / "fold_0" / "checkpoints" / "best.safetensors").is_file()
    assert not (real / "fold_9").exists() and outside.read_text(encoding="utf-8") == "kept"
