"""Batched device augmentation (pipelines/augment.py), on its own: no FFCV, no DALI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.augment import ViewAug, augment_views, gaussian_kernels, random_blur, seed_generator

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFF = ViewAug(flip_p=0.0, color_p=0.0, gray_p=0.0, blur_p=0.0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(n: int = 8, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images, ``[n, side, side, 3]`` uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)  # [n, 3, 4, 4]
    x = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # [n, S, S, 3]


def normalize(x: torch.Tensor) -> torch.Tensor:
    y = (x.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)  # [n, S, S, 3]
    return y.permute(0, 3, 1, 2)  # [n, 3, S, S]


@pytest.mark.parametrize("device", DEVICES)
def test_zero_probabilities_are_identity(device):
    x = images().to(device)
    out = augment_views(x, OFF, seed_generator(device, 0), MEAN, STD)
    torch.testing.assert_close(out.cpu(), normalize(x.cpu()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_output_is_channels_last_finite_and_in_range(device):
    x = images(16, 24).to(device)
    aug = ViewAug(blur_p=0.5)
    out = augment_views(x, aug, seed_generator(device, 1), MEAN, STD, dtype=torch.float32)
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32
    assert out.device.type == device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)  # [3]
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)  # [3]
    per_channel = out.cpu().permute(1, 0, 2, 3).reshape(3, -1)  # [3, n*S*S]
    assert (per_channel.min(1).values >= lo - 1e-4).all()
    assert (per_channel.max(1).values <= hi + 1e-4).all()
    assert 0.05 < out.std().item() < 3.0  # neither collapsed nor exploded


def test_each_sample_gets_its_own_parameters():
    x = images(1).expand(12, -1, -1, -1).contiguous()  # one image, 12 times
    aug = ViewAug(flip_p=0.0, color_p=1.0, gray_p=0.0, blur_p=1.0)
    out = augment_views(x, aug, seed_generator("cpu", 2), MEAN, STD)
    flat = out.reshape(12, -1)  # [12, 3*S*S]
    dist = torch.cdist(flat, flat)  # [12, 12]
    off_diagonal = dist[~torch.eye(12, dtype=torch.bool)]
    assert (off_diagonal > 1e-3).all()


def test_grayscale_with_p1_gives_equal_channels():
    aug = ViewAug(flip_p=0.5, color_p=1.0, gray_p=1.0, blur_p=0.0)
    out = augment_views(images(), aug, seed_generator("cpu", 3), (0, 0, 0), (1, 1, 1))
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 0], out[:, 2], rtol=0, atol=1e-6)


def test_flip_with_p1_mirrors_every_image():
    x = images()
    aug = ViewAug(flip_p=1.0, color_p=0.0, gray_p=0.0, blur_p=0.0)
    out = augment_views(x, aug, seed_generator("cpu", 4), MEAN, STD)
    torch.testing.assert_close(out, normalize(x).flip(-1), rtol=1e-5, atol=1e-5)


def test_same_seed_gives_same_output_and_new_seed_differs():
    x = images()
    aug = ViewAug(blur_p=0.5)
    a = augment_views(x, aug, seed_generator("cpu", 7, 1, 0), MEAN, STD)
    b = augment_views(x, aug, seed_generator("cpu", 7, 1, 0), MEAN, STD)
    c = augment_views(x, aug, seed_generator("cpu", 7, 2, 0), MEAN, STD)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_blur_matches_per_image_reflect_convolution():
    x = torch.rand(4, 20, 28, 3)
    out = random_blur(x, 1.0, (0.5, 2.0), 7, seed_generator("cpu", 5))

    # Reference: the same sigmas (same generator draws), one conv2d per image.
    g = seed_generator("cpu", 5)
    torch.rand(4, generator=g)  # the coins
    sigma = torch.rand(4, generator=g) * 1.5 + 0.5  # [4]
    kern = gaussian_kernels(sigma, 7)  # [4, 7]
    for i in range(4):
        img = x[i].permute(2, 0, 1)[None]  # [1, 3, H, W]
        k2 = (kern[i][:, None] * kern[i][None, :]).expand(3, 1, 7, 7)  # [3, 1, 7, 7]
        ref = F.conv2d(F.pad(img, (3, 3, 3, 3), mode="reflect"), k2, groups=3)  # [1, 3, H, W]
        torch.testing.assert_close(out[i], ref[0].permute(1, 2, 0), rtol=1e-4, atol=1e-5)


def test_jitter_changes_colour_statistics_per_image():
    x = images(64)
    aug = ViewAug(flip_p=0.0, color_p=1.0, gray_p=0.0, blur_p=0.0)
    out = augment_views(x, aug, seed_generator("cpu", 6), (0, 0, 0), (1, 1, 1))
    ratio = out.mean(dim=(1, 2, 3)) / (x.float() / 255).mean(dim=(1, 2, 3))  # [64]
    assert ratio.std() > 0.05  # brightness/contrast differ from image to image
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_bfloat16_output():
    out = augment_views(images(), ViewAug(), seed_generator("cpu", 8), MEAN, STD, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
