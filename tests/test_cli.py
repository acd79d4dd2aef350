import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from medseg.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True,
                          encoding="utf-8", errors="replace", cwd=REPO, timeout=120)


def test_help_is_fast_and_lists_the_verbs():
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in ("demo", "train", "predict", "evaluate"):
        assert verb in result.stdout


def test_unknown_workflow_key_is_one_line_exit_2(tmp_path):
    workflow = tmp_path / "wf.yaml"
    workflow.write_text("dataset:\n  path: x\ntrain:\n  epoch: 3\n", encoding="utf-8")
    result = run_cli("train", str(workflow), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "wf.yaml" in lines[0] and "'train.epoch'" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r"),
                     "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr  # the status without it
    assert result.stderr.strip().splitlines()[-1].startswith("medseg: error: ")


def test_missing_dataset_folder(tmp_path, capsys):
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(tmp_path / "r"),
                 "--set", f"dataset.path={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere: dataset folder not found" in err


def test_existing_run_is_not_overwritten(trained_run, capsys):
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(trained_run),
                 "--set", "dataset.path=/x"])
    assert code == 2
    assert "run folder exists" in capsys.readouterr().err
    assert (trained_run / "plan.json").is_file()


@pytest.mark.parametrize("key", ["predict.largest_component=[7]",
                                 "predict.min_component_ml={7: 1.0}"])
def test_postprocessing_of_a_label_the_dataset_lacks_is_refused_before_training(
        tmp_path, capsys, key):
    """It trained the whole run (exit 0); predict then refused the run's own workflow."""
    from medseg.phantoms import write_phantom_dataset

    data = tmp_path / "data"
    write_phantom_dataset(data, n_train=6, n_test=0, seed=3, shape=(24, 24, 12))
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(tmp_path / "r"),
                 "--set", f"dataset.path={data}", "--set", key])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1] == (f"medseg: error: '{key.split('=')[0]}' names label(s) "
                                       f"[7]; the dataset's labels are [1, 2, 3]")
    assert not (tmp_path / "r").exists()


def test_postprocessing_labels_of_a_dataset_without_a_label_map_are_read_from_its_labels(
        tmp_path, capsys):
    """Folder pairs without labels.json name no labels: every largest_component id was
    refused, though the label files hold them."""
    import shutil

    from helpers import TINY_TRAINING, as_sets

    from medseg.phantoms import write_phantom_dataset

    msd = tmp_path / "msd"
    write_phantom_dataset(msd, n_train=6, n_test=0, seed=3, shape=(24, 24, 12))
    folders = tmp_path / "folders"
    shutil.copytree(msd / "imagesTr", folders / "images")
    shutil.copytree(msd / "labelsTr", folders / "labels")
    args = ["train", str(REPO / "workflows" / "demo.yaml"), "--set", f"dataset.path={folders}",
            "--set", "dataset.layout=auto", *as_sets(TINY_TRAINING)]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0  # largest_component [1, 2, 3]
    assert main([*args, "--out", str(tmp_path / "r7"), "--set",
                 "predict.largest_component=[7]"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "names label(s) [7]; the dataset's labels are [1, 2, 3]")
    assert not (tmp_path / "r7").exists()


@pytest.mark.parametrize("cases", [1, 3])
def test_too_few_cases_for_the_folds_is_refused_before_any_work(tmp_path, capsys, cases):
    from medseg.phantoms import write_phantom_dataset

    data = tmp_path / "data"
    write_phantom_dataset(data, n_train=cases, n_test=0, seed=3, shape=(24, 24, 12))
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(tmp_path / "r"),
                 "--set", f"dataset.path={data}"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"{data}: {cases} labelled case" in lines[0]
    assert ("--set train.folds=3" in lines[0]) == (cases == 3)
    assert "fingerprint" not in captured.out + captured.err  # refused before reading volumes
    assert not (tmp_path / "r").exists()


def test_bad_fold(tmp_path, phantom_dataset, capsys):
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(tmp_path / "r"),
                 "--set", f"dataset.path={phantom_dataset}", "--fold", "9"])
    assert code == 2 and "--fold 9 is outside 0..4" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["predict", "--model", "/nonexistent", "--input", "/nonexistent.nii.gz", "--output",
      "OUT"], "input not found"),
    (["evaluate", "--pred", "/nonexistent", "--ref", "/nonexistent"], "folder not found"),
])
def test_predict_and_evaluate_errors(args, message, capsys, tmp_path):
    # OUT in tmp_path: a fixed /tmp/x was a file on a machine, another error
    assert main([str(tmp_path / a) if a == "OUT" else a for a in args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--step", "0"], "--step: 'predict.step' must be above 0 and at most 1, got 0.0"),
    (["--step", "nan"], "--step: 'predict.step' must be above 0 and at most 1, got nan"),
    (["--folds", "0,x"], "--folds takes comma-separated fold numbers, got '0,x'"),
    (["--device", "tpu"], "--device takes cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_predict_options_are_one_line(tmp_path, option, message, capsys):
    code = main(["predict", "--model", str(tmp_path), "--input", str(tmp_path), "--output",
                 str(tmp_path / "out"), *option])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"medseg: error: {message}"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    code = main(["predict", "--model", str(tmp_path), "--input", str(tmp_path), "--output",
                 str(tmp_path / "out"), "--device", "cuda"])
    assert code == 2
    assert "--device cuda: this torch sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["predict", "--model", "m", "--input", "i", "--output"],
                                     ["demo", "--out"]])
def test_an_output_folder_that_is_a_file_is_refused(tmp_path, command, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("not a folder", encoding="utf-8")
    assert main([*command, "taken"]) == 2
    assert "taken: output folder path is a file" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text(encoding="utf-8") == "not a folder"


def test_failed_training_setup_leaves_no_run_folder(tmp_path, phantom_dataset, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dataset, data)
    (data / "imagesTr" / "phantom_003.nii.gz").write_bytes(b"garbage")
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(tmp_path / "r"),
                 "--set", f"dataset.path={data}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("medseg: error:") and "phantom_003.nii.gz" in err[-1]
    assert not (tmp_path / "r").exists()


def test_predict_of_one_unreadable_volume_exits_2(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b truncated")
    code = main(["predict", "--model", str(trained_run), "--input", str(bad), "--output",
                 str(tmp_path / "out")])
    assert code == 2
    assert "bad.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # made by predict, so removed again


def test_errors_inside_monai_transforms_are_unwrapped():
    from medseg.errors import unwrap_transform_error

    cause = MemoryError("you tried to allocate 59303909136 bytes")
    try:
        try:
            raise cause
        except MemoryError as exc:
            raise RuntimeError("applying transform <Spacingd object at 0x7f>") from exc
    except RuntimeError as wrapped:
        assert unwrap_transform_error(wrapped) is cause
    plain = RuntimeError("applying nothing")
    assert unwrap_transform_error(plain) is plain


def test_demo_refuses_a_bad_override_before_any_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "train.epoch=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'train.epoch'" in err
    assert not (tmp_path / "demo").exists()
    # the demo's dataset is its own: a dataset.path given to it was silently ignored
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set",
                 f"dataset.path={tmp_path}"]) == 2
    assert "the demo writes and trains its own phantom dataset" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_under_torchrun_only_rank_0_reports_a_refusal(tmp_path, capsys, monkeypatch):
    args = ["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 2
    assert "missing.yaml: workflow file not found" in capsys.readouterr().err


def test_a_refusal_reaches_torchruns_failure_summary_from_any_rank(tmp_path, capsys,
                                                                    monkeypatch):
    """A mistake only rank 1 met was printed by no one: torchrun stops rank 0 when rank 1
    exits, and shows each rank's error file as its failure, empty before."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == ""
    line = f"medseg: error: {tmp_path / 'missing.yaml'}: workflow file not found"
    record = json.loads(error_file.read_text(encoding="utf-8"))
    assert record["message"]["message"] == line
    assert record["message"]["extraInfo"]["py_callstack"] == line + "\n"
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    # torchrun reads it as it reads its own error files (the summary prints py_callstack)
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == line + "\n"


def test_an_unexpected_error_reaches_torchruns_summary_and_a_lost_peer_says_so(
        tmp_path, capsys, monkeypatch):
    """An unexpected error on rank 1 left torchrun's summary without a cause, and rank 0,
    whose collective then failed, printed gloo's "Connection closed by peer" as its error."""
    import medseg.cli

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def fails(_args):
        raise ValueError("a bug")

    monkeypatch.setattr(medseg.cli, "cmd_check", fails)
    monkeypatch.setenv("RANK", "1")
    assert main(["check", str(tmp_path)]) == 1
    line = "medseg: error (rank 1): ValueError: a bug (rerun with --debug for the traceback)"
    assert capsys.readouterr().err.strip() == line
    assert json.loads(error_file.read_text(encoding="utf-8"))["message"]["message"] == line

    def loses_its_peer(_args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                           "closed by peer [127.0.0.1]:29500")

    error_file.unlink()
    monkeypatch.setattr(medseg.cli, "cmd_check", loses_its_peer)
    monkeypatch.setenv("RANK", "0")
    assert main(["check", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("medseg: error: another process of this torchrun run failed (its "
                          "error is in torchrun's summary); this one lost its connection: ")
    # written too: torchrun shows the earliest error file, the process that failed first
    assert json.loads(error_file.read_text(encoding="utf-8"))["message"]["message"] == err

    def times_out(_args):  # every process alive, one hung: this one's own error
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out "
                           "waiting 1800000ms for recv operation to complete")

    monkeypatch.setattr(medseg.cli, "cmd_check", times_out)
    assert main(["check", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("medseg: error: RuntimeError: [../third_party")


def test_main_gives_back_the_sigterm_handler_it_found(tmp_path):
    import signal

    def own_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        assert main(["check", str(tmp_path / "missing")]) == 2
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_demo_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    """Each process ran a whole demo into the same folder, and each scored half the
    cases (the other shard's) as missing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "demo runs in one process: under torchrun, run `medseg train`" in \
        capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_an_unwritable_run_folder_is_refused_before_the_dataset_is_read(tmp_path, capsys):
    """`--out` under a file (or on a read-only mount) failed with a NotADirectoryError after
    the whole dataset had been read and fingerprinted."""
    blocker = tmp_path / "afile"
    blocker.write_text("x", encoding="utf-8")
    workflow = str(REPO / "workflows" / "demo.yaml")
    args = ["train", workflow, "--out", str(blocker / "run"), "--set",
            f"dataset.path={tmp_path / 'no_dataset'}"]  # named only if it were read first
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"medseg: error: {blocker / 'run'}: cannot make the output folder: {blocker} is not "
        f"a folder")
    assert main(["demo", "--out", str(blocker / "demo")]) == 2
    assert f"cannot make the output folder: {blocker} is not a folder" in \
        capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo"), "--seed", "-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "medseg: error: --seed must be between 0 and 4294967295, got -1")
    assert not (tmp_path / "demo").exists()


def test_the_demo_saves_an_absolute_dataset_path(tmp_path, monkeypatch):
    """`medseg demo --out rel` saved `path: rel/data` in the run's workflow.yaml, so the
    resume it suggests failed from any other folder."""
    import medseg.runs

    seen = {}

    def stop_before_training(workflow, run_dir, folds, **kwargs):
        seen["path"] = workflow.dataset.path
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(medseg.runs, "train_run", stop_before_training)
    main(["demo", "--out", "rel"])
    assert seen["path"] == str(tmp_path / "rel" / "data")


def test_version_names_medseg_and_the_libraries_behind_its_results(capsys, monkeypatch):
    """On one line even in a narrow terminal or a CI log (argparse's version action wrapped
    it at 80 columns)."""
    from importlib.metadata import version

    monkeypatch.setenv("COLUMNS", "40")
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"medseg {version('medseg')}, torch {version('torch')}, monai ")
    assert out.count("\n") == 1 and "highdicom" in out


def test_python_dash_m_medseg_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "medseg", "--version"], capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("medseg "), done.stderr


def test_train_help_names_every_key_a_resume_may_set():
    """The --help text listed two of the three keys --resume takes (train.cache was left out)."""
    from medseg.cli import _parser
    from medseg.runs import RESUME_OVERRIDES

    train = _parser()._subparsers._group_actions[0].choices["train"]
    help_text = " ".join(train.format_help().split())
    assert all(key in help_text for key in RESUME_OVERRIDES), help_text


def test_torchrun_max_restarts_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    """A restarted worker ran `train --out RUN` again, and the restarted processes hung."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "torchrun --max-restarts is not supported: a stopped run continues with "
        "`medseg train --resume RUN_DIR`")


@pytest.mark.parametrize("argv", [
    ["predict", "--model", "run", "--input", "scans", "--output", ""],
    ["predict", "--model", "run", "--input", "scans", " ", "--output", "masks"],
    ["train", "workflow.yaml", "--out", ""],
    ["train", "--resume", ""],
    ["evaluate", "--pred", "", "--ref", "labels"],
    ["convert", "scan.nii.gz", ""],
    ["demo", "--out", ""],
], ids=["predict-output", "predict-input", "train-out", "resume", "evaluate", "convert",
        "demo"])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(argv, tmp_path, capsys,
                                                                     monkeypatch):
    """`--output "$OUT"` with OUT unset wrote the masks into the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert "an empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_long_label_map_is_printed_in_brief():
    """TotalSegmentator's 118 names made the dataset line 3000 characters long."""
    from medseg.runs import labels_in_brief

    labels = {k: f"structure_{k}" for k in range(118)}
    brief = labels_in_brief(labels)
    assert brief == "{0: 'structure_0', 1: 'structure_1', 2: 'structure_2', ..., " \
                    "117: 'structure_117'} (118 ids)"
    assert labels_in_brief({0: "background", 1: "liver"}) == "{0: 'background', 1: 'liver'}"
    assert labels_in_brief(None) == "from the label files"


@pytest.mark.parametrize("code, ignored", [(130, True), (143, True), (0, False), (2, False)])
def test_a_stopped_command_ignores_a_second_ctrl_c_while_the_process_exits(code, ignored):
    """After "medseg: interrupted" a second Ctrl-C during the interpreter's teardown (the
    pools' atexit joins) printed "Exception ignored ... KeyboardInterrupt"."""
    import signal

    from medseg.cli import _exit

    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stop:
            _exit(code)
        assert stop.value.code == code
        assert (signal.getsignal(signal.SIGINT) is signal.SIG_IGN) == ignored
    finally:
        signal.signal(signal.SIGINT, before)
