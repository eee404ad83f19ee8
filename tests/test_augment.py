"""Batched device augmentation (pipelines/augment.py), on its own: no FFCV, no DALI.

Both ways of applying the parameters are tested on the CPU: `select=True` (the CPU's
default: only the images a coin picks, chunk by chunk) and `select=False` (the masked path,
CUDA's default, which must read nothing back from the device).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_optim import HostReadProbe

import pipelines.augment as augment
from pipelines.augment import (
    LUMA,
    RGB_TO_YIQ,
    YIQ_TO_RGB,
    ViewAug,
    augment_views,
    blur_kernel_size,
    draw_params,
    gaussian_kernels,
    random_blur,
    seed_generator,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFF = ViewAug(flip_p=0.0, color_p=0.0, gray_p=0.0, blur_p=0.0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SELECT = pytest.mark.parametrize("select", [True, False], ids=["selected", "masked"])


def images(n: int = 8, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images, ``[n, side, side, 3]`` uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)  # [n, 3, 4, 4]
    x = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # [n, S, S, 3]


def normalize(x: torch.Tensor) -> torch.Tensor:
    y = (x.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)  # [n, S, S, 3]
    return y.permute(0, 3, 1, 2)  # [n, 3, S, S]


@SELECT
@pytest.mark.parametrize("device", DEVICES)
def test_zero_probabilities_are_identity(device, select):
    x = images().to(device)
    out = augment_views(x, OFF, seed_generator(device, 0), MEAN, STD, select=select)
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


@SELECT
def test_grayscale_with_p1_gives_equal_channels(select):
    aug = ViewAug(flip_p=0.5, color_p=1.0, gray_p=1.0, blur_p=0.5)
    g = seed_generator("cpu", 3)
    out = augment_views(images(), aug, g, (0, 0, 0), (1, 1, 1), select=select)
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 0], out[:, 2], rtol=0, atol=1e-6)


@SELECT
def test_flip_with_p1_mirrors_every_image(select):
    x = images()
    aug = ViewAug(flip_p=1.0, color_p=0.0, gray_p=0.0, blur_p=0.0)
    out = augment_views(x, aug, seed_generator("cpu", 4), MEAN, STD, select=select)
    torch.testing.assert_close(out, normalize(x).flip(-1), rtol=1e-5, atol=1e-5)


def test_same_seed_gives_same_output_and_new_seed_differs():
    x = images()
    aug = ViewAug(blur_p=0.5)
    a = augment_views(x, aug, seed_generator("cpu", 7, 1, 0), MEAN, STD)
    b = augment_views(x, aug, seed_generator("cpu", 7, 1, 0), MEAN, STD)
    c = augment_views(x, aug, seed_generator("cpu", 7, 2, 0), MEAN, STD)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@SELECT
def test_blur_matches_per_image_reflect_convolution(select):
    x = torch.rand(4, 20, 28, 3)
    out = random_blur(x, 1.0, (0.5, 2.0), 7, seed_generator("cpu", 5), select=select)

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


# ------------------------------------------------------- against the step-by-step definition


def reference_view(img: torch.Tensor, p, i: int, k: int) -> torch.Tensor:
    """Image i ``[H, W, 3]`` (uint8, or float in [0, 1]) augmented one step at a time, as
    the augmentation is defined, with its drawn parameters p: ``[3, H, W]``."""
    luma = torch.tensor(LUMA)  # [3]
    u = img.float() / 255 if img.dtype == torch.uint8 else img.clone()  # [H, W, 3]
    if p.flip[i]:
        u = u.flip(1)
    if p.jitter[i]:
        b, c, s, hue = p.brightness[i], p.contrast[i], p.saturation[i], p.hue[i]
        u = (u * b).clamp(0, 1)
        u = (c * u + (1 - c) * (u @ luma).mean()).clamp(0, 1)
        u = s * u + (1 - s) * (u @ luma)[..., None]  # saturation: blend with the gray image
        yiq = u @ torch.tensor(RGB_TO_YIQ).T  # [H, W, 3]: hue rotates the (I, Q) plane
        cos, sin = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
        i_, q_ = yiq[..., 1].clone(), yiq[..., 2].clone()
        yiq[..., 1], yiq[..., 2] = cos * i_ - sin * q_, sin * i_ + cos * q_
        u = (yiq @ torch.tensor(YIQ_TO_RGB).T).clamp(0, 1)
    if p.gray[i]:
        u = (u @ luma)[..., None].expand(-1, -1, 3)
    u = u.permute(2, 0, 1)  # [3, H, W]
    if p.blur[i]:
        kern = gaussian_kernels(p.sigma[i : i + 1], k)[0]  # [k]
        k2 = (kern[:, None] * kern[None, :]).expand(3, 1, k, k)  # [3, 1, k, k]
        padded = F.pad(u[None], (k // 2,) * 4, mode="reflect")  # [1, 3, H+k-1, W+k-1]
        u = F.conv2d(padded, k2, groups=3)[0]  # [3, H, W]
    return (u - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@SELECT
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["uint8", "float"])
@pytest.mark.parametrize("strength", [1.0, 1.5])
@pytest.mark.parametrize("small_image", [augment.SMALL_IMAGE, 0], ids=["gather", "per-image"])
def test_views_match_step_by_step_definition(select, dtype, strength, small_image, monkeypatch):
    # Noise and smooth images, so brightness and contrast clip often; every coin mixed; chunks
    # of 5 images in the selected path (the last one partial), flipped by one gather (40 px
    # images are small) or one image at a time (as large images are).
    monkeypatch.setattr(augment, "CHUNK_BYTES", 5 * 40 * 40 * 12)
    monkeypatch.setattr(augment, "SMALL_IMAGE", small_image)
    noise = torch.randint(0, 256, (12, 40, 40, 3), generator=torch.Generator().manual_seed(0))
    x = torch.cat([noise.to(torch.uint8), images(11, 40)])  # [23, 40, 40, 3]
    if dtype != torch.uint8:
        x = x.float() / 255
    aug = ViewAug(color_strength=strength, color_p=0.7, gray_p=0.3, blur_p=0.5)
    out = augment_views(x, aug, seed_generator("cpu", 9), MEAN, STD, select=select)

    p = draw_params(len(x), aug, seed_generator("cpu", 9), torch.device("cpu"))
    assert 0 < p.flip.sum() < len(x) and 0 < p.jitter.sum() < len(x)
    assert 0 < p.gray.sum() < len(x) and 0 < p.blur.sum() < len(x)
    k = blur_kernel_size(40)
    ref = torch.stack([reference_view(x[i], p, i, k) for i in range(len(x))])  # [23, 3, 40, 40]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


@SELECT
def test_several_batches_are_augmented_as_their_concatenation(select, monkeypatch):
    # Chunks of 4 images: the first batch's last chunk is partial, so chunks stop at a batch's end.
    monkeypatch.setattr(augment, "CHUNK_BYTES", 4 * 24 * 24 * 12)
    a, b = images(7, 24, seed=1), images(3, 24, seed=2)
    aug = ViewAug(color_p=0.5, gray_p=0.5, blur_p=0.5)
    joined = augment_views(torch.cat([a, b]), aug, seed_generator("cpu", 11), MEAN, STD)
    parts = augment_views([a, b], aug, seed_generator("cpu", 11), MEAN, STD, select=select)
    torch.testing.assert_close(parts, joined, rtol=0, atol=1e-5)
    assert parts.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="different sizes"):
        augment_views([a, images(2, 16)], aug, seed_generator("cpu", 11), MEAN, STD)
    with pytest.raises(ValueError, match="no batch"):
        augment_views([], aug, seed_generator("cpu", 11), MEAN, STD)


def test_masked_path_reads_nothing_on_the_host():
    x = images(6, 24)
    aug = ViewAug(color_p=0.5, gray_p=0.5, blur_p=0.5)
    with HostReadProbe() as probe:
        augment_views(x, aug, seed_generator("cpu", 10), MEAN, STD, select=False)
    assert probe.reads == []
