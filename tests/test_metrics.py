"""PSNR/SSIM against scikit-image's implementations, on random and structured images."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from guidesr.metrics import max_abs, psnr, rgb_to_y, ssim


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 37, 53, generator=g)
    b = (a + 0.05 * torch.randn(3, 37, 53, generator=g)).clamp(0, 1)
    return a, b


def test_psnr_matches_skimage(pair):
    a, b = pair
    expected = peak_signal_noise_ratio(a.numpy().astype(np.float64), b.numpy().astype(np.float64), data_range=1.0)
    assert psnr(a, b) == pytest.approx(expected, abs=1e-9)
    assert psnr(a, a) == float("inf")


def test_ssim_matches_skimage(pair):
    a, b = pair
    expected = structural_similarity(
        a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(), channel_axis=2,
        data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    # skimage crops the (11-1)/2 border of the filtered maps, as our "valid" convolution does
    assert ssim(a, b) == pytest.approx(expected, abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0)


def test_border_crop_and_y_channel(pair):
    a, b = pair
    b2 = b.clone()
    b2[:, :4, :] = 1 - a[:, :4, :]  # damage only the border
    assert psnr(a, b2, crop=4) == pytest.approx(psnr(a[:, 4:-4, 4:-4], b[:, 4:-4, 4:-4]))
    y = rgb_to_y(torch.ones(1, 3, 2, 2))
    assert torch.allclose(y, torch.full_like(y, 235 / 255), atol=1e-6)
    assert max_abs(a, b2) > 0.5


def test_y_channel_is_bt601_as_matlab_and_skimage_compute_it():
    from skimage.color import rgb2ycbcr

    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 7, 9, generator=g, dtype=torch.float64)
    expected = rgb2ycbcr(image.permute(1, 2, 0).numpy())[..., 0] / 255  # in [16, 235] / 255
    np.testing.assert_allclose(rgb_to_y(image[None])[0, 0].numpy(), expected, rtol=0, atol=1e-12)


def test_batch_scores_are_the_mean_of_per_image_scores():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 3, 24, 31, generator=g)
    noise = torch.tensor([0.01, 0.05, 0.2]).view(3, 1, 1, 1)
    b = (a + noise * torch.randn(a.shape, generator=g)).clamp(0, 1)
    for metric in (psnr, ssim):
        for y_channel in (False, True):
            per_image = [metric(a[i], b[i], crop=2, y_channel=y_channel) for i in range(3)]
            assert metric(a, b, crop=2, y_channel=y_channel) == pytest.approx(sum(per_image) / 3, rel=1e-9)


def test_max_abs_is_the_largest_difference_of_either_sign():
    a = torch.zeros(1, 3, 2, 2)
    b = a.clone()
    b[0, 1, 0, 1] = 0.75
    b[0, 2, 1, 0] = -0.25
    assert max_abs(a, b) == 0.75 and max_abs(b, a) == 0.75
