"""Review s27P: training and its resume."""

import pytest
from helpers import REPO, TINY_TRAINING, as_sets

from medseg.cli import main


def _train(out, dataset, *extra) -> int:
    return main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(out),
                 *as_sets([f"dataset.path={dataset}", *TINY_TRAINING, *extra])])


def test_a_hand_edited_workflow_yaml_is_refused_by_resume(tmp_path, phantom_dataset, capsys):
    run = tmp_path / "run"
    assert _train(run, phantom_dataset, "train.max_minutes=0.00001") == 0  # one epoch of two
    saved = run / "workflow.yaml"
    original = saved.read_text(encoding="utf-8")
    assert "  epochs: 2\n" in original
    # more epochs by hand: the poly schedule would change course (and a finished fold
    # would train on); the learning rate would be overridden by the restored optimizer
    saved.write_text(original.replace("  epochs: 2\n", "  epochs: 3\n"), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (f"{saved}: 'train.epochs' is 3 here, but fold_0 trained with 2: a resumed run "
            f"goes on as it began") in err
    assert "max_minutes: 5" not in saved.read_text(encoding="utf-8")  # nothing saved
    # the workers draw the augmentation: another number of them changes the course too
    saved.write_text(original.replace("  num_workers: 0\n", "  num_workers: 1\n"),
                     encoding="utf-8")
    # ... which a resume notes rather than refuses: workers that crash (a container's small
    # shared memory) must not end a run that fewer of them can finish
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=0.00001"]) == 0
    out = capsys.readouterr().out
    assert ("note: fold_0 trained with train.num_workers 0 and goes on with 1: each loader "
            "worker draws its own augmentation") in out
    # keys off the fold's course may differ (where the cases are cached)
    saved.write_text(original.replace("  cache: auto\n", "  cache: memory\n"), encoding="utf-8")
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=null"]) == 0


def test_a_refused_memory_cache_of_a_resume_is_not_saved(tmp_path, phantom_dataset,
                                                         monkeypatch, capsys):
    import medseg.fileio as fileio
    from medseg.config import load_workflow

    run = tmp_path / "run"
    assert _train(run, phantom_dataset, "train.cache=disk", "train.max_minutes=0.00001") == 0
    monkeypatch.setattr(fileio, "physical_memory", lambda: 2**10)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.cache=memory"]) == 2
    assert "'train.cache' memory would hold the cases" in capsys.readouterr().err
    # the refused value was saved: a plain --resume then chose memory and was refused again
    assert load_workflow(run / "workflow.yaml").train.cache == "disk"


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_autotunes_unless_training_is_deterministic(tmp_path, monkeypatch, deterministic):
    """MONAI's set_determinism turned cuDNN's autotuning off and pinned it to deterministic
    convolutions for every seeded run, train.deterministic false included (slower GPU
    training than nnU-Net's, which autotunes)."""
    import torch

    import medseg.train as train
    from medseg.config import TrainConfig, Workflow

    class Seeded(Exception):
        pass

    def flags_when_data_is_read(*args, **kwargs):
        raise Seeded(torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)

    for flag, value in (("deterministic", not deterministic), ("benchmark", deterministic)):
        monkeypatch.setattr(torch.backends.cudnn, flag, value)  # put back after the test
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    monkeypatch.setattr(train, "_data", flags_when_data_is_read)
    workflow = Workflow(train=TrainConfig(seed=3, deterministic=deterministic))
    with pytest.raises(Seeded) as seeded:
        train.train_fold(workflow, None, None, {}, tmp_path / "fold_0",
                         device=torch.device("cpu"))
    assert seeded.value.args == (deterministic, not deterministic)


def test_a_fold_started_by_resume_trains_as_the_run_s_other_folds(tmp_path, phantom_dataset,
                                                                   capsys):
    run = tmp_path / "run"
    assert _train(run, phantom_dataset, "train.folds=2") == 0  # fold 0
    saved = run / "workflow.yaml"
    original = saved.read_text(encoding="utf-8")
    saved.write_text(original.replace("  epochs: 2\n", "  epochs: 3\n"), encoding="utf-8")
    capsys.readouterr()
    # fold 1 would have trained 3 epochs beside fold 0's 2: folds of two different runs
    assert main(["train", "--resume", str(run), "--fold", "1"]) == 2
    assert "'train.epochs' is 3 here, but fold_0 trained with 2" in capsys.readouterr().err
    assert not (run / "fold_1").exists()


def test_a_resumed_auto_run_validates_in_the_precision_it_trains_in(tmp_path, phantom_dataset,
                                                                   monkeypatch, capsys):
    """The note said the run goes on in the precision `auto` chose when it started; its
    training did, but validation took this machine's choice, and so other scores (and
    possibly another best checkpoint) than the uninterrupted run's."""
    import torch

    import medseg.train as train

    run = tmp_path / "run"
    assert _train(run, phantom_dataset, "train.max_minutes=0.00001") == 0
    state_path = run / "fold_0" / "checkpoints" / "last_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["settings"]["precision"] = "fp32"  # started where auto chose fp32
    torch.save(state, state_path)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # bf16 here
    used = []
    window = train.sliding_window_logits

    def recording(model, image, plan, step, sw_batch_size, autocast_dtype, device):
        used.append(autocast_dtype)
        return window(model, image, plan, step, sw_batch_size, autocast_dtype, device)

    monkeypatch.setattr(train, "sliding_window_logits", recording)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "the run goes on in fp32" in capsys.readouterr().out
    assert used and set(used) == {None}  # fp32, as it trains
