import numpy as np
import pytest

from medseg.config import PredictConfig
from medseg.errors import MedsegError
from medseg.postprocess import keep_largest_component, postprocess, remove_small_components
from medseg.predict import collect_inputs, load_predictor, parse_shard, predict_paths


def label_map() -> np.ndarray:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 1      # 512 voxels
    labels[15:17, 15:17, 15:17] = 1   # 8 voxels, a stray island of label 1
    labels[12:14, 2:4, 2:4] = 2       # 8 voxels
    labels[2:4, 15:17, 2:3] = 2       # 4 voxels
    return labels


def test_largest_component_per_label():
    out = keep_largest_component(label_map(), [1])
    assert (out == 1).sum() == 512
    assert (out == 2).sum() == 12  # untouched
    assert (label_map() == 1).sum() == 520  # input not modified


def test_small_components_removed_by_size():
    out = remove_small_components(label_map(), {2: 5})
    assert (out == 2).sum() == 8 and (out == 1).sum() == 520


def test_postprocess_sizes_in_ml():
    # 2 mm voxels: 8 ml per 1000 voxels, so 0.05 ml is 6.25 -> 7 voxels
    out = postprocess(label_map(), (2.0, 2.0, 2.0), largest_component=[1],
                      min_component_ml={2: 0.05})
    assert (out == 1).sum() == 512 and (out == 2).sum() == 8


def test_shard_parsing(monkeypatch):
    assert parse_shard("1/3") == (1, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_shard(None) == (1, 2)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(MedsegError, match="--shard"):
            parse_shard(bad)


def test_shards_write_each_case_once(trained_run, phantom_dataset, tmp_path):
    predictor = load_predictor(trained_run)
    inputs = collect_inputs([phantom_dataset / "imagesTr"])
    written = []
    for index in range(3):
        results = predict_paths(predictor, inputs, tmp_path / "out", PredictConfig(),
                                shard=(index, 3))
        written += [r.output.name for r in results if r.output]
    assert sorted(written) == sorted(p.name for p in inputs)


def test_unknown_postprocess_label_is_refused(trained_run, phantom_dataset, tmp_path):
    predictor = load_predictor(trained_run)
    with pytest.raises(MedsegError, match=r"'predict.largest_component' names label\(s\) \[7\]"):
        predict_paths(predictor, collect_inputs([phantom_dataset / "imagesTs"]), tmp_path,
                      PredictConfig(largest_component=[7]))
