"""Review of prediction (inference, predict, postprocess), session s25d."""

import numpy as np

from medseg.postprocess import min_voxels, postprocess


def test_a_component_of_exactly_min_component_ml_stays():
    # 1.5 mm voxels hold 0.003375 ml: 0.050625 ml is 15 voxels, which float division made
    # 15.000000000000002, and its ceiling 16 removed a component of exactly 0.050625 ml
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1, 1, 0:15] = 1  # 15 voxels: 0.050625 ml
    labels[8, 8, 1:15] = 2  # 14 voxels: under it
    out = postprocess(labels, (1.5, 1.5, 1.5), [], {1: 0.050625, 2: 0.050625})
    assert int((out == 1).sum()) == 15 and not (out == 2).any()
    assert min_voxels(0.050625, 0.003375) == 15
    assert min_voxels(0.05, 0.008) == 7  # 6.25 voxels: a component needs 7
    assert min_voxels(0.008, 0.008) == 1
