"""Cross-checks of the numerical core against MONAI's own reference functions (review s27R):
medseg's streamed sliding window against monai.inferers.sliding_window_inference, and the
training augmentation of a two-channel image with an ignore label."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medseg.config import AugmentConfig
from medseg.inference import stream_probabilities
from medseg.plan import Plan
from medseg.transforms import IMAGE, LABEL, augmentation

CLASSES = 3


def _toy_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, CLASSES, 3, padding=1)).eval()


# sizes whose nnU-Net window starts (evenly spread) are MONAI's (a multiple of the step from
# 0, the last at the end), and sizes under a patch, which both pad with zeros about the centre
@pytest.mark.parametrize("shape", [(40, 32, 24), (10, 32, 9), (40, 11, 40)])
def test_streamed_probabilities_equal_monais_gaussian_sliding_window(shape):
    """A wrong Gaussian sigma or a zero padding placed otherwise than MONAI's would pass
    test_inference's reference, which shares gaussian_importance and the padding code."""
    network = _toy_network()

    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(network(batch), dim=1)

    image = torch.randn((2, *shape), generator=torch.Generator().manual_seed(3))
    patch = (16, 16, 16)
    planes = list(stream_probabilities(predict, image, CLASSES, patch, 0.5, batch_size=3))
    ours = torch.cat([block for _, block in planes], dim=3)
    reference = sliding_window_inference(image[None], patch, 4, predict, overlap=0.5,
                                         mode="gaussian", sigma_scale=0.125,
                                         padding_mode="constant", cval=0.0)[0]
    assert [first for first, _ in planes] == sorted(first for first, _ in planes)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1e-5)


def _two_channel_plan() -> Plan:
    return Plan(target_spacing=[1.0, 1.0, 1.0], patch_size=[32, 32, 16], batch_size=2,
                kernels=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                filters=[4, 8, 16], deep_supervision=True, in_channels=2, num_classes=4,
                labels={0: "background", 1: "a", 2: "b", 3: "c"}, modalities=["CT", "MR"],
                normalization=[{"scheme": "none"}] * 2, median_shape=[40, 40, 24],
                ignore_label=4)


def _two_channel_case() -> tuple[torch.Tensor, torch.Tensor]:
    label = np.zeros((1, 40, 40, 24), np.float32)
    label[0, 8:30, 10:26, 4:20] = 1
    label[0, 14:20, 14:20, 8:14] = 2
    label[0, 30:36, 5:12, 2:10] = 3
    label[0, 0:8, 30:40, :] = 4  # unannotated
    image = np.concatenate([label * 10.0, label * -7.0])
    return torch.from_numpy(image), torch.from_numpy(label)


def test_every_channel_and_the_ignore_label_follow_rotation_scaling_and_flips():
    image, label = _two_channel_case()
    spatial = AugmentConfig(flip_prob=0.5, rotate_prob=1.0, rotate_degrees=30, scale_prob=1.0,
                            noise_prob=0, smooth_prob=0, contrast_prob=0,
                            intensity_shift_prob=0, gamma_prob=0)
    chain = augmentation(_two_channel_plan(), spatial, foreground_fraction=0.5)
    ignored_seen = False
    for seed in range(6):
        chain.set_random_state(seed=seed)
        out = chain({IMAGE: image.clone(), LABEL: label.clone()})[0]
        assert tuple(out[IMAGE].shape) == (2, 32, 32, 16)
        assert tuple(out[LABEL].shape) == (1, 32, 32, 16)
        # nearest for the label: no value between ids, the ignore id kept as it is
        assert set(torch.unique(out[LABEL]).tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
        ignored_seen |= bool((out[LABEL] == 4).any())
        for channel, factor in ((0, 10.0), (1, -7.0)):
            recovered = torch.round(out[IMAGE][channel] / factor)
            assert (recovered == out[LABEL][0]).float().mean().item() > 0.97
    assert ignored_seen


def test_intensity_augmentations_leave_the_label_alone():
    image, label = _two_channel_case()
    intensity = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, noise_prob=1.0,
                              smooth_prob=1.0, contrast_prob=1.0, intensity_shift_prob=1.0,
                              gamma_prob=1.0, gamma_invert_prob=1.0, lowres_prob=1.0)
    plain = AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, noise_prob=0,
                          smooth_prob=0, contrast_prob=0, intensity_shift_prob=0, gamma_prob=0)
    for seed in range(3):
        outputs = []
        for augment in (intensity, plain):
            chain = augmentation(_two_channel_plan(), augment, foreground_fraction=0.5)
            chain.set_random_state(seed=seed)
            outputs.append(chain({IMAGE: image.clone(), LABEL: label.clone()})[0])
        changed, unchanged = outputs
        # the same crop (the crop draws first); only the image's intensities differ
        assert torch.equal(changed[LABEL], unchanged[LABEL])
        assert not torch.allclose(changed[IMAGE], unchanged[IMAGE])
